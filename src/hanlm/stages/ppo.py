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
and scheduler states, β, the score shift and the data positions; `resume=true` continues from
the newest one.
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
    rollout_batch: int = opt(16, "prompts (answers) per PPO step")
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
    from transformers import get_scheduler, set_seed

    from hanlm import losses, training
    from hanlm.data import load, or_demo
    from hanlm.data.templates import require_template, stop_token_ids
    from hanlm.modeling import load_model, load_tokenizer, pick_precision, save_model
    from hanlm.runs import atomic_dir
    from hanlm.stages.reward import load_reward_model

    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = pick_precision(cfg.train.precision)
    if device.type == "cpu" and precision != "fp32":
        raise ValueError(f"train.precision={cfg.train.precision}: bf16/fp16 needs a GPU here")
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision != "fp32"
        else contextlib.nullcontext()
    )

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
        if len(train_prompts) < cfg.rollout_batch:
            raise ValueError(
                f"{len(train_prompts)} prompts fit max_prompt_len={cfg.max_prompt_len};"
                f" need at least rollout_batch={cfg.rollout_batch}"
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
            if not ptx_valid:  # say so: a missing figure should not pass unnoticed
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

        # ---- resume
        ckpt = _last_checkpoint(run.dir) if cfg.resume else None
        if ckpt is not None:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
            for model_, name in ((policy, "policy.pt"), (value, "value.pt")):
                # Only trainable tensors are saved; any saved key this model lacks is an error.
                bad = model_.load_state_dict(
                    torch.load(ckpt / name, map_location=device), strict=False
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
            random.setstate(state["py_rng"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            print(f"[hanlm] resuming PPO from {ckpt} (step {start})")

        mb, accum = cfg.train.batch_size, max(1, cfg.train.grad_accum)

        def evaluate() -> dict[str, float]:
            """Greedy answers to held-out prompts, scored; held-out pretraining loss."""
            out: dict[str, float] = {}
            if eval_prompts:
                out.update(
                    held_out_scores(
                        policy, tok, eval_prompts, stops, scorer, cfg.max_new_tokens, mb
                    )
                )
            if ptx_valid:
                policy.eval()
                with torch.no_grad(), amp:
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
            print(f"[hanlm] before PPO: {_fmt(initial)}")

        # ---- the loop
        metrics: dict[str, float] = {}
        for step in range(start + 1, cfg.train.max_steps + 1):
            t0 = time.time()
            # 1. rollout
            batch_prompts = [train_prompts[i] for i in prompt_cycle.take(cfg.rollout_batch)]
            r = rollout(policy, tok, batch_prompts, stops, cfg.max_new_tokens, cfg.temperature)
            # 2. score
            raw, parts = scorer(r, mb)
            if score_shift is None:
                score_shift = sum(raw) / len(raw) if cfg.normalize_score else 0.0
            scores = torch.tensor(raw, device=device) - score_shift
            # 3. old log-probs, reference log-probs, values, entropy (no grad)
            n = len(r.texts)
            old_logp, ref_logp, old_values, entropy = [], [], [], []
            with torch.no_grad(), amp:
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
            # 4. rewards, advantages, returns
            kl = losses.kl_k1(old_logp, ref_logp) * mask
            rewards = losses.per_token_rewards(kl, scores, mask, beta)
            advantages, returns = losses.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = losses.whiten(advantages, mask)
            # 5. PPO epochs over minibatches. The models stay in eval mode: dropout would make
            # the new log-probs differ from the old ones by noise alone (ratio != 1 at the start).
            stats: dict[str, list[float]] = {}
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(n).tolist()
                for i in range(0, n, mb):
                    idx = order[i : i + mb]
                    micro = math.ceil(len(idx) / accum)
                    for j in range(0, len(idx), micro):
                        sub = torch.tensor(idx[j : j + micro], device=device)
                        part = len(sub) / len(idx)
                        seq, attn, m = r.seq[sub], r.attn[sub], mask[sub]
                        with amp:
                            logits = answer_logits(policy, seq, attn, r.ctx) / cfg.temperature
                            logp = losses.logprobs_from_logits(logits, seq[:, r.ctx :])
                            pg_loss, clip_frac, approx_kl = losses.clipped_policy_loss(
                                logp, old_logp[sub], advantages[sub], m, cfg.clip_eps
                            )
                            loss = pg_loss
                            if cfg.entropy_coef:
                                ent = losses.masked_mean(losses.entropy_from_logits(logits), m)
                                loss = loss - cfg.entropy_coef * ent
                            ptx_loss = None
                            if cfg.ptx_coef > 0:
                                blocks = [ptx_train[k] for k in ptx_cycle.take(cfg.ptx_batch)]
                                ptx_loss = lm_loss(policy, torch.tensor(blocks, device=device))
                            loss = losses.ptx_mix(loss, ptx_loss, cfg.ptx_coef)
                        (loss * part).backward()
                        with amp:
                            v = token_values(value, seq, attn, r.ctx)
                            vf_loss, vf_clip = losses.clipped_value_loss(
                                v, old_values[sub], returns[sub], m, cfg.value_clip
                            )
                        (vf_loss * part).backward()
                        for key, val in (
                            ("loss", loss),
                            ("pg_loss", pg_loss),
                            ("clip_frac", clip_frac),
                            ("approx_kl", approx_kl),
                            ("value_loss", vf_loss),
                            ("value_clip_frac", vf_clip),
                            ("ptx_loss", ptx_loss),
                        ):
                            if val is not None:
                                stats.setdefault(key, []).append(float(val.detach()))
                    for model_, opt_, sched_ in ((policy, opt_p, sched_p), (value, opt_v, sched_v)):
                        if cfg.train.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(
                                [p for p in model_.parameters() if p.requires_grad],
                                cfg.train.max_grad_norm,
                            )
                        opt_.step()
                        sched_.step()
                        opt_.zero_grad(set_to_none=True)
            # 6. adaptive β, metrics
            kl_per_answer = kl.sum(1)
            mean_kl = float(kl_per_answer.mean())
            beta_used = beta
            beta = losses.adaptive_kl_coef(beta, mean_kl, cfg.kl_target, n, cfg.kl_horizon)
            metrics = {
                "score": sum(raw) / n,
                "reward": float((scores - beta_used * kl_per_answer).mean()),
                "kl": mean_kl,
                "kl_k3": float((losses.kl_k3(old_logp, ref_logp) * mask).sum(1).mean()),
                "beta": beta_used,
                "entropy": float(losses.masked_mean(entropy, mask)),
                "explained_variance": float(losses.explained_variance(old_values, returns, mask)),
                "length": float(mask.sum(1).mean()),
                "stop_rate": sum(r.stopped) / n,
                **parts,
                **{k: sum(v) / len(v) for k, v in stats.items()},
                "lr": sched_p.get_last_lr()[0],
                "seconds": time.time() - t0,
            }
            if _due(step, cfg.train.eval_steps, cfg.train.max_steps):
                ev = evaluate()
                metrics.update({f"eval_{k}": v for k, v in ev.items()})
            run.log(step, **metrics)
            if step % max(cfg.train.logging_steps, 1) == 0 or step == cfg.train.max_steps:
                print(f"[hanlm] ppo step {step}/{cfg.train.max_steps}: {_fmt(metrics)}")
            if cfg.train.save_steps > 0 and step % cfg.train.save_steps == 0:
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
                            "prompts": prompt_cycle.state(),
                            "ptx": ptx_cycle.state(),
                            "py_rng": random.getstate(),
                            "torch_rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state_all()
                            if torch.cuda.is_available()
                            else None,
                        },
                        tmp / "state.pt",
                    )
                _prune(run.dir / CHECKPOINTS, cfg.train.save_total_limit)

        # ---- final measures and save
        summary.update({k: v for k, v in metrics.items() if k.startswith("eval_")})
        summary.update(
            steps=cfg.train.max_steps,
            score_shift=score_shift,
            final_beta=beta,
            final_kl=metrics.get("kl"),
            final_score=metrics.get("score"),
        )
        policy = training.finish_lora(policy, cfg.lora, run.dir)
        policy.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        policy.generation_config.pad_token_id = tok.pad_token_id
        if training.is_main_process() and (not cfg.lora.enabled or cfg.lora.merge):
            save_model(policy, tok, run.dir)
        summary["seconds"] = time.time() - started
        run.finish(summary)
        print(
            f"[hanlm] ppo: held-out score {summary.get('initial_eval_score', math.nan):.4f}"
            f" -> {summary.get('eval_score', math.nan):.4f}"
        )
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
