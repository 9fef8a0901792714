"""`hanlm ppo`: InstructGPT-style PPO with a per-token KL penalty and the pretraining mix (ptx).

No maintained library ships PPO-ptx (trl dropped its PPO trainer in 1.13), so this is hanlm's
own loop, written to be read top to bottom. The math is in `hanlm.losses`; `run()` is:

  models    policy (full or LoRA) from the SFT model; a frozen reference (a copy, or the policy
            with its adapter disabled); a frozen reward model and/or rule rewards; a value model
            initialised from the reward model (InstructGPT), with a scalar head on every token.
  each step 1. rollout: sample answers from the policy on a batch of prompts
            2. score: reward model (re-rendered conversation) + rule rewards, minus the SFT
               policy's mean score when `normalize_score` (so the SFT model starts at 0)
            3. old log-probs, reference log-probs, values (no grad)
            4. per-token reward -β·KL_t, plus the score at the last token; GAE; whitening
            5. `ppo_epochs` passes over minibatches: clipped policy loss (+ ptx_coef x LM loss
               on pretraining text), clipped value loss
            6. adaptive β toward `kl_target` (when set), log, evaluate, checkpoint

Checkpoints (`checkpoints/step-N`, written atomically) hold the trainable weights, optimiser
and scheduler states, β, the score shift, the data positions and every process's random state;
`resume=true` continues from the newest one.

Launched with torchrun or `accelerate launch`, the loop is data-parallel through accelerate:
each of the W processes samples and scores its own `rollout_batch` prompts (a global batch of
rollout_batch x W, disjoint slices of one shared prompt order); the policy and value models are
wrapped for DDP, so each optimiser step averages the gradients of all processes once; the score
shift, advantage whitening, β and the logged metrics use statistics over all processes; only
the main process evaluates and writes.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hanlm.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    TemplateName,
    TrainConfig,
    opt,
)
from hanlm.rewards import RuleConfig
from hanlm.runs import Run

if TYPE_CHECKING:
    import torch

CHECKPOINTS = "checkpoints"


@dataclass
class PPOConfig(OutputConfig):
    model: ModelConfig = opt(ModelConfig, "the SFT model: the policy's start and the reference")
    reward_model: str = opt("", "reward model dir (from hanlm reward); empty = rule rewards only")
    value_model: str = opt(
        "", "value model start; empty = the reward model (InstructGPT), else the policy + new head"
    )
    rules: RuleConfig = opt(RuleConfig, "rule rewards, added to the reward model's score")
    data: DataConfig = opt(
        DataConfig, "prompts: preference or chat records (no paths: the demo preference prompts)"
    )
    template: TemplateName = opt("auto", "chat template; auto = the model's own")
    max_prompt_len: int = opt(256, "prompts with more tokens are dropped (counted)")
    max_new_tokens: int = opt(64, "most tokens per sampled answer")
    temperature: float = opt(1.0, "sampling temperature of the rollouts (log-probs use it too)")
    rollout_batch: int = opt(
        16, "prompts (answers) per PPO step, per process (global batch = rollout_batch x processes)"
    )
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    gamma: float = opt(1.0, "GAE discount γ")
    lam: float = opt(0.95, "GAE λ")
    clip_eps: float = opt(0.2, "policy ratio clip ε")
    value_clip: float = opt(0.2, "value clip ε_v around the rollout's values")
    value_lr: float = opt(0.0, "value model learning rate (0 = train.lr)")
    entropy_coef: float = opt(0.0, "entropy bonus weight (0 = off, as InstructGPT)")
    kl_coef: float = opt(0.02, "β of the per-token KL penalty (InstructGPT: 0.02)")
    kl_target: float = opt(0.0, "adapt β toward this KL per answer, in nats (0 = fixed β)")
    kl_horizon: int = opt(10000, "adaptive β horizon (Ziegler et al.), in answers")
    normalize_score: bool = opt(
        True, "subtract the SFT policy's mean score (first rollout) so it starts at 0"
    )
    missing_stop_penalty: float = opt(
        -1.0,
        "added to the score of answers that never stop (the reward model cannot see it: it"
        " scores the re-rendered conversation); 0 = off",
    )
    ptx_coef: float = opt(0.0, "weight of the pretraining LM loss (PPO-ptx; 0 = plain PPO)")
    ptx_data: DataConfig = field(
        default_factory=lambda: DataConfig(max_records=4000),
        metadata={"help": "pretraining text for ptx and its held-out loss (default: demo corpus)"},
    )
    ptx_batch: int = opt(4, "pretraining blocks per minibatch when ptx_coef > 0")
    ptx_block: int = opt(128, "tokens per pretraining block")
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=100,
            batch_size=8,
            lr=1e-5,
            warmup_ratio=0.0,
            scheduler="constant",
            eval_steps=25,
            logging_steps=1,
        ),
        metadata={"help": "optimisation: max_steps = PPO steps, batch_size = minibatch"},
    )
    lora: LoraConfig = opt(LoraConfig, "LoRA on the policy (and the value model)")
    eval_prompts: int = opt(64, "held-out prompts answered greedily and scored")
    eval_ptx_blocks: int = opt(32, "held-out pretraining blocks for the ptx loss (0 = skip)")

    def validate(self) -> None:
        if self.train.max_steps <= 0:
            raise ConfigError("train.max_steps must be > 0: it is the number of PPO steps")
        if self.rollout_batch < 2:
            raise ConfigError("rollout_batch must be at least 2 (advantages are whitened)")
        if not 0 < self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ConfigError("gamma and lam must be in (0, 1]")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0: PPO needs sampled answers")


# --------------------------------------------------------------------------- data


def prompts_of(records: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """The conversation before the answer: a preference record's prompt, or a chat record up to
    its last assistant turn."""
    out = []
    for rec in records:
        if "prompt" in rec:
            out.append(rec["prompt"])
        else:
            msgs = rec["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            out.append(msgs[:last] if last is not None else msgs)
    return out


def load_prompts(
    data_cfg: DataConfig, tok: Any, max_prompt_len: int, eval_prompts: int, stage: str
) -> tuple[Any, list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """Prompts for rollouts (PPO, GRPO): (loaded data, train prompts, held-out prompts), keeping
    those that fit `max_prompt_len` tokens once rendered."""
    from hanlm.data import load, or_demo
    from hanlm.data.templates import prompt_ids

    data = load(or_demo(data_cfg, "preference"))
    if data.kind == "text":
        raise ValueError(f"{stage} prompts come from chat or preference data, not plain text")

    def fitting(records: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
        return [p for p in prompts_of(records) if len(prompt_ids(tok, p)) <= max_prompt_len]

    return data, fitting(data.train), fitting(data.valid)[:eval_prompts]


class Cycler:
    """Endless shuffled passes over range(n); its state (pass, position) resumes exactly."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm()


def pack_blocks(texts: list[str], tok: Any, block: int) -> list[list[int]]:
    """Documents joined with EOS and cut into full blocks of `block` tokens (the tail dropped)."""
    if not texts:
        return []
    eos = tok.eos_token_id
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream += [*ids, eos]
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


# --------------------------------------------------------------------------- model pieces


@dataclass
class Rollout:
    prompts: list[list[dict[str, str]]]
    seq: torch.Tensor  # [B, P + R]: left-padded prompts, then right-padded answers
    attn: torch.Tensor  # [B, P + R]
    ctx: int  # P, the padded prompt width
    mask: torch.Tensor  # [B, R] float, 1 on answer tokens up to and including the stop token
    texts: list[str]
    ids: list[list[int]]  # answer ids, the stop token included when the answer ended on one
    stopped: list[bool]


def position_ids(attn: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as generate() numbers left-padded prompts."""
    pos = attn.long().cumsum(-1) - 1
    return pos.masked_fill(attn == 0, 1)


def rollout(
    model: Any,
    tok: Any,
    prompts: list[list[dict[str, str]]],
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float,
) -> Rollout:
    """Answers to `prompts` from `model` (sampled at `temperature`, greedy when it is 0)."""
    import torch
    from transformers import GenerationConfig

    from hanlm.data.templates import prompt_ids

    device = next(model.parameters()).device
    pad = tok.pad_token_id
    batch = [prompt_ids(tok, p) for p in prompts]
    width = max(len(x) for x in batch)
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=device)
    attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
    # A fresh config: sampling must follow the policy's own distribution (no top-k/p, no
    # repetition penalty), or the log-probs PPO uses would not be those of the sampled tokens.
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        top_p=1.0 if temperature > 0 else None,
        eos_token_id=stop_ids,
        pad_token_id=pad,
    )
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
    answer = out[:, width:]
    is_stop = torch.isin(answer, torch.tensor(stop_ids, device=device))
    before = is_stop.long().cumsum(1) - is_stop.long()  # stops strictly before each position
    mask = (before == 0).float()
    texts, id_lists, stopped = [], [], []
    for row, m, s in zip(answer.tolist(), mask.tolist(), is_stop.any(1).tolist()):
        kept = row[: int(sum(m))]
        id_lists.append(kept)
        stopped.append(bool(s))
        body = kept[:-1] if s else kept
        texts.append(tok.decode(body, skip_special_tokens=True))
    full_attn = torch.cat([attn, mask.long()], dim=1)
    return Rollout(prompts, out, full_attn, width, mask, texts, id_lists, stopped)


def answer_logits(model: Any, seq: torch.Tensor, attn: torch.Tensor, ctx: int) -> torch.Tensor:
    """Logits at the positions that predict the answer tokens: [B, R, V]."""
    out = model(
        input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False
    )
    return out.logits[:, ctx - 1 : -1]


def _value_parts(value_model: Any) -> tuple[Any, Any]:
    base = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    return getattr(base, base.base_model_prefix), base.score


def token_values(value_model: Any, seq: torch.Tensor, attn: torch.Tensor, ctx: int) -> torch.Tensor:
    """V(s_t) for every answer token: the value head applied to each position's hidden state."""
    backbone, head = _value_parts(value_model)
    hidden = backbone(
        input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False
    ).last_hidden_state
    return head(hidden[:, ctx - 1 : -1]).squeeze(-1).float()


def token_value_module(value_model: Any) -> torch.nn.Module:
    """The value model as a module whose forward is `token_values`. DDP averages gradients only
    through the wrapped module's own forward, and the value model's forward gives one score per
    sequence, so this is what goes through `accelerator.prepare`."""
    import torch

    class TokenValues(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, seq: torch.Tensor, attn: torch.Tensor, ctx: int) -> torch.Tensor:
            return token_values(self.model, seq, attn, ctx)

    return TokenValues(value_model)


def lm_loss(model: Any, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss on full pretraining blocks (the ptx term)."""
    return model(input_ids=blocks, labels=blocks, use_cache=False).loss


@contextlib.contextmanager
def reference_of(policy: Any, ref_model: Any | None):
    """The frozen reference: a separate copy, or the LoRA policy with its adapter disabled."""
    if ref_model is not None:
        yield ref_model
    else:
        with policy.disable_adapter():
            yield policy


# --------------------------------------------------------------------------- scoring


class Scorer:
    """Scores answers: reward models (each on the re-rendered conversation, with its own
    tokenizer) + weighted rule rewards + a penalty for answers that never stopped."""

    def __init__(
        self,
        models: list[tuple[Any, Any, float]],
        rules: list[Any],
        rule_weights: list[float],
        missing_stop_penalty: float = 0.0,
    ) -> None:
        self.models, self.rules, self.weights = models, rules, rule_weights
        self.missing_stop_penalty = missing_stop_penalty
        if not self.models and not self.rules:
            raise ConfigError("no reward: name a reward model and/or rules.funcs=[...]")

    @classmethod
    def build(
        cls,
        reward_models: list[str],
        rules: RuleConfig,
        tok: Any,
        stop_ids: list[int],
        device: Any,
        base: ModelConfig | None = None,
        missing_stop_penalty: float = 0.0,
    ) -> Scorer:
        """Load the reward models (frozen, on `device`) and build the rule functions."""
        from hanlm.modeling import load_tokenizer
        from hanlm.rewards import build_rules
        from hanlm.stages.reward import load_reward_model

        models = []
        for path in reward_models:
            rm_tok = load_tokenizer(path)
            rm = load_reward_model(replace(base or ModelConfig(), path=path)).to(device)
            rm.config.pad_token_id = rm_tok.pad_token_id
            models.append((rm.requires_grad_(False).eval(), rm_tok, 1.0))
        fns = build_rules(rules, tok, stop_ids)
        return cls(models, fns, rules.weights, missing_stop_penalty)

    def __call__(self, r: Rollout, batch_size: int = 16) -> tuple[list[float], dict[str, float]]:
        from hanlm.rewards import score_rules
        from hanlm.stages.reward import score_conversations

        n = len(r.texts)
        total, parts = [0.0] * n, {}
        convs = [[*p, {"role": "assistant", "content": t}] for p, t in zip(r.prompts, r.texts)]
        for i, (rm, rm_tok, weight) in enumerate(self.models):
            scores = score_conversations(rm, rm_tok, convs, batch_size)
            parts["rm_score" if i == 0 else f"rm{i}_score"] = sum(scores) / n
            total = [a + weight * b for a, b in zip(total, scores)]
        if self.rules:
            completions = [[{"role": "assistant", "content": t}] for t in r.texts]
            rule, means = score_rules(self.rules, self.weights, r.prompts, completions, r.ids)
            parts.update(means)
            total = [a + b for a, b in zip(total, rule)]
        if self.missing_stop_penalty:
            total = [
                s + (0.0 if stop else self.missing_stop_penalty)
                for s, stop in zip(total, r.stopped)
            ]
        return total, parts


def held_out_scores(
    model: Any,
    tok: Any,
    prompts: list[list[dict[str, str]]],
    stop_ids: list[int],
    scorer: Scorer,
    max_new_tokens: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """Greedy answers to held-out prompts: mean score, answer length (tokens) and stop rate."""
    scores: list[float] = []
    parts: dict[str, float] = {}
    lengths = stopped = 0
    for i in range(0, len(prompts), batch_size):
        r = rollout(model, tok, prompts[i : i + batch_size], stop_ids, max_new_tokens, 0.0)
        s, p = scorer(r, batch_size)
        scores += s
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v * len(s)
        lengths += sum(len(x) for x in r.ids)
        stopped += sum(r.stopped)
    n = max(len(scores), 1)
    return {
        "score": sum(scores) / n,
        **{k: v / n for k, v in parts.items()},
        "length": lengths / n,
        "stop_rate": stopped / n,
    }


# --------------------------------------------------------------------------- run


def run(cfg: PPOConfig) -> Path:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import gather_object
    from transformers import get_scheduler, set_seed

    from hanlm import losses, training
    from hanlm.data import load, or_demo
    from hanlm.data.templates import require_template, stop_token_ids
    from hanlm.modeling import load_model, load_tokenizer, pick_precision, save_model
    from hanlm.runs import atomic_dir
    from hanlm.stages.reward import load_reward_model

    started = time.time()
    on_cpu = not torch.cuda.is_available()
    precision = pick_precision(cfg.train.precision)
    if on_cpu and precision != "fp32":
        raise ValueError(f"train.precision={cfg.train.precision}: bf16/fp16 needs a GPU here")
    # One process, or one of W under torchrun / accelerate launch; accelerate picks the device
    # (the CPU when there is no GPU, as the Trainer stages) and provides the autocast. Its state
    # is per process: drop what an earlier run in this process set, as the Trainer does (the
    # process group stays).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=on_cpu, mixed_precision=precision if precision in ("bf16", "fp16") else "no"
    )
    sharded = accelerator.distributed_type.name
    if sharded in ("DEEPSPEED", "FSDP"):
        raise ValueError(  # generation on sharded weights and two trained models: not handled
            f"hanlm ppo runs data-parallel (DDP) only, not under {sharded}; launch it with"
            " torchrun or a plain `accelerate launch` config"
        )
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process

    with Run(
        "ppo", cfg, cfg.output_dir, cfg.overwrite, resume=cfg.resume, seed=cfg.train.seed
    ) as run:
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.path)
        require_template(tok, cfg.template, cfg.model.path, "PPO")
        stops = stop_token_ids(tok, cfg.template)

        # ---- prompts and pretraining text
        data, train_prompts, eval_prompts = load_prompts(
            cfg.data, tok, cfg.max_prompt_len, cfg.eval_prompts, "PPO"
        )
        if len(train_prompts) < cfg.rollout_batch * world:
            raise ValueError(
                f"{len(train_prompts)} prompts fit max_prompt_len={cfg.max_prompt_len};"
                f" need at least rollout_batch={cfg.rollout_batch} x {world} processes"
            )
        pcfg = or_demo(cfg.ptx_data, "zh_corpus")
        ptx_train: list[list[int]] = []
        ptx_valid: list[list[int]] = []
        if cfg.ptx_coef > 0 or cfg.eval_ptx_blocks > 0:
            ptx = load(pcfg, kind="text")
            if cfg.ptx_coef > 0:
                ptx_train = pack_blocks([r["text"] for r in ptx.train], tok, cfg.ptx_block)
                if not ptx_train:
                    raise ValueError("the ptx data gives no full block; lower ptx_block")
            ptx_valid = pack_blocks([r["text"] for r in ptx.valid], tok, cfg.ptx_block)
            ptx_valid = ptx_valid[: cfg.eval_ptx_blocks]
            if not ptx_valid and main:  # say so: a missing figure should not pass unnoticed
                print(
                    "[hanlm] note: no held-out pretraining text, so the held-out ptx loss is not"
                    " measured; set ptx_data.valid_paths or ptx_data.valid_fraction",
                    file=sys.stderr,
                )
        run.set(
            "data",
            {
                **data.stats.as_dict(),
                "train_prompts": len(train_prompts),
                "eval_prompts": len(eval_prompts),
                "ptx_train_blocks": len(ptx_train),
                "ptx_valid_blocks": len(ptx_valid),
            },
        )

        # ---- models: policy, reference, value, reward
        policy = load_model(cfg.model).to(device)
        policy.config.pad_token_id = tok.pad_token_id
        if precision == "fp16" and policy.dtype != torch.float32:
            raise ValueError(  # accelerate's fp16 loss scaler cannot unscale half gradients
                f"train.precision=fp16 trains fp32 weights, these are {policy.dtype}: set"
                " model.dtype=float32, or train.precision=bf16"
            )
        ref_model = None
        value_path = cfg.value_model or cfg.reward_model or cfg.model.path
        value = load_reward_model(replace(cfg.model, path=value_path)).to(device)
        value.config.pad_token_id = tok.pad_token_id
        if value.get_input_embeddings().weight.shape[0] < len(tok):
            raise ValueError(
                f"value model {value_path} has a smaller vocabulary than the policy's tokenizer;"
                " start it from a reward model trained on this SFT model"
            )
        if cfg.lora.enabled:
            policy = training.apply_lora(policy, cfg.lora)
            value = training.apply_lora(
                value,
                replace(cfg.lora, modules_to_save=sorted({*cfg.lora.modules_to_save, "score"})),
                task="SEQ_CLS",
            )
        else:
            ref_model = load_model(cfg.model).to(device).requires_grad_(False).eval()
        policy.eval()  # no dropout anywhere (see step 5); gradients flow in eval mode too
        value.eval()
        scorer = Scorer.build(
            [cfg.reward_model] if cfg.reward_model else [],
            cfg.rules,
            tok,
            stops,
            device,
            base=cfg.model,
            missing_stop_penalty=cfg.missing_stop_penalty,
        )
        summary: dict[str, Any] = {
            "policy": training.describe_trainable(policy),
            "value_init": value_path,
            "world_size": world,
            "global_rollout_batch": cfg.rollout_batch * world,
        }

        # ---- optimisers (one step per minibatch), schedulers
        updates_per_step = cfg.ppo_epochs * math.ceil(cfg.rollout_batch / cfg.train.batch_size)
        total_updates = cfg.train.max_steps * updates_per_step

        def optimiser(model: Any, lr: float) -> tuple[Any, Any]:
            params = [p for p in model.parameters() if p.requires_grad]
            opt_ = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
            sched = get_scheduler(
                cfg.train.scheduler,
                opt_,
                num_warmup_steps=int(cfg.train.warmup_ratio * total_updates),
                num_training_steps=total_updates,
            )
            return opt_, sched

        opt_p, sched_p = optimiser(policy, cfg.train.lr)
        opt_v, sched_v = optimiser(value, cfg.value_lr or cfg.train.lr)
        prompt_cycle = Cycler(len(train_prompts), cfg.train.seed)
        ptx_cycle = Cycler(max(len(ptx_train), 1), cfg.train.seed + 1)
        beta, score_shift, start = cfg.kl_coef, None, 0
        # Every process samples its own answers: once the models are built alike, the others than
        # the first re-seed (seed + rank), so that one process keeps the seed's numbers.
        if rank:
            set_seed(cfg.train.seed + rank)

        # ---- resume
        ckpt = _last_checkpoint(run.dir) if cfg.resume else None
        if ckpt is not None:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
            for model_, name in ((policy, "policy.pt"), (value, "value.pt")):
                # Only trainable tensors are saved; any saved key this model lacks is an error.
                bad = model_.load_state_dict(
                    torch.load(ckpt / name, map_location="cpu"), strict=False
                ).unexpected_keys
                if bad:
                    raise ValueError(
                        f"{ckpt / name} does not fit this model (e.g. {bad[0]}); was it written"
                        " with other lora settings?"
                    )
            opt_p.load_state_dict(state["opt_policy"])
            opt_v.load_state_dict(state["opt_value"])
            sched_p.load_state_dict(state["sched_policy"])
            sched_v.load_state_dict(state["sched_value"])
            prompt_cycle.load(state["prompts"])
            ptx_cycle.load(state["ptx"])
            beta, score_shift, start = state["beta"], state["score_shift"], state["step"]
            summary.update(state["initial"])
            if accelerator.scaler is not None and state.get("scaler"):
                accelerator.scaler.load_state_dict(state["scaler"])
            # each process's own random state (checkpoints before these had one: the first's)
            rngs = state.get("rng") or [
                {"py": state["py_rng"], "torch": state["torch_rng"], "cuda": state.get("cuda_rng")}
            ]
            if rank < len(rngs):
                random.setstate(rngs[rank]["py"])
                torch.set_rng_state(rngs[rank]["torch"])
                if rngs[rank]["cuda"] is not None and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(rngs[rank]["cuda"])
            if main:
                print(f"[hanlm] resuming PPO from {ckpt} (step {start})")
                if len(rngs) != world:
                    print(
                        f"[hanlm] note: the checkpoint is from {len(rngs)} processes, this run"
                        f" has {world}: the sampling does not repeat the interrupted run's",
                        file=sys.stderr,
                    )

        # ---- processes: DDP wraps what is trained, so that the backward outside `no_sync`
        # averages the gradients of all processes (one process: the models themselves). The
        # unwrapped models serve generation, the no-grad passes, evaluation and saving.
        dp_policy, dp_values, opt_p, opt_v = accelerator.prepare(
            policy, token_value_module(value), opt_p, opt_v
        )
        policy = accelerator.unwrap_model(dp_policy)
        value = accelerator.unwrap_model(dp_values).model
        dp_policy.eval()
        dp_values.eval()

        mb, accum = cfg.train.batch_size, max(1, cfg.train.grad_accum)

        def mine(ids: list[int], k: int) -> list[int]:
            """This process's k of `ids`, drawn alike by every process (k per process)."""
            return ids[rank * k : (rank + 1) * k]

        def sync_last(model_: Any, k: int, count: int) -> Any:
            """Only the last micro-batch's backward averages the gradients across processes."""
            return contextlib.nullcontext() if k == count - 1 else accelerator.no_sync(model_)

        def update(model_: Any, opt_: Any, sched_: Any) -> None:
            if cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model_.parameters(), cfg.train.max_grad_norm)
            opt_.step()
            sched_.step()  # not prepared: one step per update in every process, as in one
            opt_.zero_grad(set_to_none=True)

        def mean_over_processes(values: dict[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
            """Each figure's mean over the processes (each holds rollout_batch answers)."""
            keys = [k for k in values if k not in keep]
            t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
            return {**values, **dict(zip(keys, accelerator.reduce(t, "mean").tolist()))}

        def evaluate() -> dict[str, float]:
            """Greedy answers to held-out prompts, scored; held-out pretraining loss. On the main
            process only (nothing in it waits for the others; they wait at their next
            collective)."""
            out: dict[str, float] = {}
            if not main:
                return out
            if eval_prompts:
                out.update(
                    held_out_scores(
                        policy, tok, eval_prompts, stops, scorer, cfg.max_new_tokens, mb
                    )
                )
            if ptx_valid:
                policy.eval()
                with torch.no_grad(), accelerator.autocast():
                    vals = [
                        lm_loss(policy, torch.tensor(ptx_valid[i : i + 8], device=device)).item()
                        for i in range(0, len(ptx_valid), 8)
                    ]
                out["ptx_loss"] = sum(vals) / len(vals)
            return out

        if ckpt is None:
            initial = evaluate()
            summary.update({f"initial_eval_{k}": v for k, v in initial.items()})
            run.log(0, **{f"eval_{k}": v for k, v in initial.items()})
            if main:
                print(f"[hanlm] before PPO: {_fmt(initial)}")

        # ---- the loop
        metrics: dict[str, float] = {}
        for step in range(start + 1, cfg.train.max_steps + 1):
            t0 = time.time()
            # 1. rollout: this process's rollout_batch prompts of the shared order
            ids = mine(prompt_cycle.take(cfg.rollout_batch * world), cfg.rollout_batch)
            batch_prompts = [train_prompts[i] for i in ids]
            r = rollout(policy, tok, batch_prompts, stops, cfg.max_new_tokens, cfg.temperature)
            # 2. score (the shift: the mean over every process's first rollout)
            raw, parts = scorer(r, mb)
            if score_shift is None:
                every = accelerator.gather(torch.tensor(raw, dtype=torch.float64, device=device))
                every = every.tolist()
                score_shift = sum(every) / len(every) if cfg.normalize_score else 0.0
            scores = torch.tensor(raw, device=device) - score_shift
            # 3. old log-probs, reference log-probs, values, entropy (no grad)
            n = len(r.texts)
            old_logp, ref_logp, old_values, entropy = [], [], [], []
            with torch.no_grad(), accelerator.autocast():
                for i in range(0, n, mb):
                    seq, attn = r.seq[i : i + mb], r.attn[i : i + mb]
                    labels = seq[:, r.ctx :]
                    logits = answer_logits(policy, seq, attn, r.ctx) / cfg.temperature
                    old_logp.append(losses.logprobs_from_logits(logits, labels))
                    entropy.append(losses.entropy_from_logits(logits))
                    with reference_of(policy, ref_model) as ref:
                        ref_logits = answer_logits(ref, seq, attn, r.ctx) / cfg.temperature
                    ref_logp.append(losses.logprobs_from_logits(ref_logits, labels))
                    old_values.append(token_values(value, seq, attn, r.ctx))
            old_logp, ref_logp = torch.cat(old_logp), torch.cat(ref_logp)
            old_values, entropy = torch.cat(old_values), torch.cat(entropy)
            mask = r.mask
            # 4. rewards, advantages, returns; the advantages are whitened over all processes'
            # answers (gathered, padded to one answer width), then each takes its own rows back
            kl = losses.kl_k1(old_logp, ref_logp) * mask
            rewards = losses.per_token_rewards(kl, scores, mask, beta)
            advantages, returns = losses.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            every_adv = accelerator.gather(accelerator.pad_across_processes(advantages, dim=1))
            every_mask = accelerator.gather(accelerator.pad_across_processes(mask, dim=1))
            advantages = losses.whiten(every_adv, every_mask)[rank * n : (rank + 1) * n]
            advantages = advantages[:, : mask.size(1)]
            # 5. PPO epochs over minibatches. The models stay in eval mode: dropout would make
            # the new log-probs differ from the old ones by noise alone (ratio != 1 at the start).
            # Per minibatch, each model sums its micro-batches' gradients, averaged across
            # processes once (in the last backward), then takes one optimiser step.
            stats: dict[str, list[float]] = {}
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(n).tolist()
                for i in range(0, n, mb):
                    idx = order[i : i + mb]
                    micro = math.ceil(len(idx) / accum)
                    subs = [
                        torch.tensor(idx[j : j + micro], device=device)
                        for j in range(0, len(idx), micro)
                    ]
                    # 5a. the policy: clipped surrogate (+ entropy bonus, + ptx)
                    for k, sub in enumerate(subs):
                        part = len(sub) / len(idx)
                        seq, attn, m = r.seq[sub], r.attn[sub], mask[sub]
                        if cfg.ptx_coef > 0:  # this process's ptx_batch pretraining blocks
                            ptx_ids = mine(ptx_cycle.take(cfg.ptx_batch * world), cfg.ptx_batch)
                            blocks = torch.tensor([ptx_train[j] for j in ptx_ids], device=device)
                        with sync_last(dp_policy, k, len(subs)):
                            with accelerator.autocast():
                                logits = answer_logits(dp_policy, seq, attn, r.ctx)
                                logits = logits / cfg.temperature
                                logp = losses.logprobs_from_logits(logits, seq[:, r.ctx :])
                                pg_loss, clip_frac, approx_kl = losses.clipped_policy_loss(
                                    logp, old_logp[sub], advantages[sub], m, cfg.clip_eps
                                )
                                loss = pg_loss
                                if cfg.entropy_coef:
                                    ent = losses.entropy_from_logits(logits)
                                    loss = loss - cfg.entropy_coef * losses.masked_mean(ent, m)
                                ptx_loss = lm_loss(dp_policy, blocks) if cfg.ptx_coef > 0 else None
                                loss = losses.ptx_mix(loss, ptx_loss, cfg.ptx_coef)
                            accelerator.backward(loss * part)
                        for key, val in (
                            ("loss", loss),
                            ("pg_loss", pg_loss),
                            ("clip_frac", clip_frac),
                            ("approx_kl", approx_kl),
                            ("ptx_loss", ptx_loss),
                        ):
                            if val is not None:
                                stats.setdefault(key, []).append(float(val.detach()))
                    update(dp_policy, opt_p, sched_p)
                    # 5b. the value model: clipped value loss
                    for k, sub in enumerate(subs):
                        part = len(sub) / len(idx)
                        seq, attn, m = r.seq[sub], r.attn[sub], mask[sub]
                        with sync_last(dp_values, k, len(subs)):
                            with accelerator.autocast():
                                v = dp_values(seq, attn, r.ctx)
                                vf_loss, vf_clip = losses.clipped_value_loss(
                                    v, old_values[sub], returns[sub], m, cfg.value_clip
                                )
                            accelerator.backward(vf_loss * part)
                        stats.setdefault("value_loss", []).append(float(vf_loss.detach()))
                        stats.setdefault("value_clip_frac", []).append(float(vf_clip.detach()))
                    update(dp_values, opt_v, sched_v)
            # 6. metrics (means over the processes), adaptive β from the KL of all answers
            kl_per_answer = kl.sum(1)
            metrics = {
                "score": sum(raw) / n,
                "reward": float((scores - beta * kl_per_answer).mean()),
                "kl": float(kl_per_answer.mean()),
                "kl_k3": float((losses.kl_k3(old_logp, ref_logp) * mask).sum(1).mean()),
                "beta": beta,
                "entropy": float(losses.masked_mean(entropy, mask)),
                "explained_variance": float(losses.explained_variance(old_values, returns, mask)),
                "length": float(mask.sum(1).mean()),
                "stop_rate": sum(r.stopped) / n,
                **parts,
                **{k: sum(v) / len(v) for k, v in stats.items()},
                "lr": sched_p.get_last_lr()[0],
                "seconds": time.time() - t0,
            }
            metrics = mean_over_processes(metrics, keep=("beta", "lr", "seconds"))
            beta = losses.adaptive_kl_coef(
                beta, metrics["kl"], cfg.kl_target, n * world, cfg.kl_horizon
            )
            if _due(step, cfg.train.eval_steps, cfg.train.max_steps):
                ev = evaluate()
                metrics.update({f"eval_{k}": v for k, v in ev.items()})
            run.log(step, **metrics)
            if main and (
                step % max(cfg.train.logging_steps, 1) == 0 or step == cfg.train.max_steps
            ):
                print(f"[hanlm] ppo step {step}/{cfg.train.max_steps}: {_fmt(metrics)}")
            if cfg.train.save_steps > 0 and step % cfg.train.save_steps == 0:
                # every process's random state (each samples its own answers); the main writes
                rng = gather_object(
                    [
                        {
                            "py": random.getstate(),
                            "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all()
                            if torch.cuda.is_available()
                            else None,
                        }
                    ]
                )
                accelerator.wait_for_everyone()
                if main:
                    with atomic_dir(run.dir / CHECKPOINTS / f"step-{step}") as tmp:
                        torch.save(_trainable(policy), tmp / "policy.pt")
                        torch.save(_trainable(value), tmp / "value.pt")
                        torch.save(
                            {
                                "step": step,
                                "beta": beta,
                                "score_shift": score_shift,
                                "initial": {
                                    k: v for k, v in summary.items() if k.startswith("initial")
                                },
                                "opt_policy": opt_p.state_dict(),
                                "opt_value": opt_v.state_dict(),
                                "sched_policy": sched_p.state_dict(),
                                "sched_value": sched_v.state_dict(),
                                "scaler": accelerator.scaler.state_dict()
                                if accelerator.scaler is not None
                                else None,
                                "prompts": prompt_cycle.state(),
                                "ptx": ptx_cycle.state(),
                                "rng": rng,
                            },
                            tmp / "state.pt",
                        )
                    _prune(run.dir / CHECKPOINTS, cfg.train.save_total_limit)
                accelerator.wait_for_everyone()

        # ---- final measures and save
        summary.update({k: v for k, v in metrics.items() if k.startswith("eval_")})
        summary.update(
            steps=cfg.train.max_steps,
            score_shift=score_shift,
            final_beta=beta,
            final_kl=metrics.get("kl"),
            final_score=metrics.get("score"),
        )
        if world > 1:
            # DDP keeps the processes' weights equal; say so, or say loudly that they are not
            fingerprint = [
                float(p.detach().double().sum())
                for model_ in (policy, value)
                for p in model_.parameters()
                if p.requires_grad
            ]
            summary["weights_equal_across_processes"] = same = all(
                f == fingerprint for f in gather_object([fingerprint])
            )
            if main and not same:
                print("[hanlm] warning: the processes' weights differ", file=sys.stderr)
        accelerator.wait_for_everyone()
        if main:
            final = accelerator.unwrap_model(dp_policy, keep_fp32_wrapper=False)
            final = training.finish_lora(final, cfg.lora, run.dir)
            final.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
            final.generation_config.pad_token_id = tok.pad_token_id
            if not cfg.lora.enabled or cfg.lora.merge:
                save_model(final, tok, run.dir)
            summary["seconds"] = time.time() - started
            run.finish(summary)
            print(
                f"[hanlm] ppo: held-out score {summary.get('initial_eval_score', math.nan):.4f}"
                f" -> {summary.get('eval_score', math.nan):.4f}"
            )
        accelerator.wait_for_everyone()
    return run.dir


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _fmt(metrics: dict[str, float]) -> str:
    keys = (
        "score",
        "eval_score",
        "kl",
        "reward",
        "entropy",
        "clip_frac",
        "value_loss",
        "ptx_loss",
        "eval_ptx_loss",
        "length",
    )
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if metrics.get(k) is not None)


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted(
        (int(d.name.split("-")[1]), d)
        for d in root.glob("step-*")
        if d.is_dir() and d.name.split("-")[1].isdigit()
    )


def _last_checkpoint(run_dir: Path) -> Path | None:
    found = _steps(run_dir / CHECKPOINTS)
    if not found:
        print("[hanlm] no PPO checkpoint to resume: starting")
        return None
    return found[-1][1]


def _prune(root: Path, keep: int) -> None:
    import shutil

    if keep <= 0:
        return
    for _, d in _steps(root)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
