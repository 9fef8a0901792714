"""`hanlm ppo`: InstructGPT-style PPO with a per-token KL penalty and the pretraining mix (ptx).

No maintained library ships PPO-ptx (trl dropped its PPO trainer in 1.13), so this is hanlm's
own loop, written to be read top to bottom as torchtune's PPO recipe is: the math is in
`hanlm.losses`, generation and scoring in `hanlm.align.rollouts` and `hanlm.align.rewards`; here the
class `PPO` holds the models and does one thing per method (`experience`, `ppo_step`, `evaluate`,
`save`/`load`), and `run()` is the loop:

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

Checkpoints (`checkpoints/checkpoint-N`, written atomically with the same complete marker as
every stage's) hold the trainable weights, optimiser and scheduler states, β, the score shift,
the data positions and every process's random state; `resume=true` continues from the newest.

Batch sizes: `rollout_batch` answers are sampled per step and process; `train.batch_size` of
them make one optimiser update (a minibatch; `ppo_epochs` passes of such updates per step);
`train.grad_accum` splits a minibatch into that many micro-batches, and every forward pass
(no-grad passes, scoring, evaluation) runs in micro-batches of that size, which bounds memory.

Launched with torchrun or `accelerate launch`, the loop is data-parallel through accelerate:
each of the W processes samples and scores its own `rollout_batch` prompts (a global batch of
rollout_batch x W, disjoint slices of one shared prompt order); the policy and value models are
wrapped for DDP, so each optimiser step averages the gradients of all processes once; the score
shift, advantage whitening, β and the logged metrics use statistics over all processes; only
the main process evaluates and writes. With `train.deepspeed=` (torchrun) they are DeepSpeed
ZeRO-2/3 engines instead (`hanlm.align.distributed`; `frozen`: the frozen models whole or
partitioned); under ZeRO-3 generation runs on gathered weights, in step on every process, evaluation
too.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from hanlm import losses, trainer
from hanlm.align import distributed, loop, rollouts
from hanlm.align.checks import warnings_for
from hanlm.align.rewards import RuleConfig, Scorer, load_reward_model
from hanlm.align.rollouts import Cycler, Rollout, answer_logits, lm_loss, rollout
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
from hanlm.data.templates import require_template, stop_token_ids
from hanlm.modeling import load_model, load_tokenizer, pick_precision
from hanlm.runs import Run

if TYPE_CHECKING:
    import torch


@dataclass
class PPOConfig(OutputConfig):
    RENAMED: ClassVar[dict[str, str]] = {"max_prompt_len": "max_prompt_length"}
    UNUSED: ClassVar[dict[str, str]] = {
        "train.epochs": "PPO runs train.max_steps steps of rollout_batch prompts each",
    }
    model: ModelConfig = opt(ModelConfig, "the SFT model: the policy's start and the reference")
    reward_model: str = opt("", "reward model dir (from hanlm reward); empty = rule rewards only")
    value_model: str = opt(
        "", "value model start; empty = the reward model (InstructGPT), else the policy + new head"
    )
    rules: RuleConfig = opt(RuleConfig, "rule rewards, added to the reward model's score")
    gold_reward_model: str = opt(
        "",
        "a judge that is not the target: a reward model trained on other preferences (hanlm"
        " reward half=second); its held-out score is measured, never optimised",
    )
    keep_best: Literal["last", "gold"] = opt(
        "last", "the policy to save: the last one, or the one with the best held-out gold score"
    )
    center_value: bool = opt(
        True, "shift the critic on the first rollout so its values start on the shifted scores"
    )
    pg_coef: float = opt(
        1.0, "weight of the PPO policy loss; 0 (with ptx_coef > 0) is the ptx-alone control"
    )
    data: DataConfig = opt(
        DataConfig, "prompts: preference or chat records (no paths: the demo preference prompts)"
    )
    template: TemplateName = opt("auto", "chat template; auto = the model's own")
    max_prompt_length: int = opt(256, "prompts with more tokens are dropped (counted)")
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
        metadata={
            "help": "optimisation: max_steps = PPO steps; batch_size = answers per optimiser"
            " update; grad_accum = micro-batches per update (the forward-pass size)"
        },
    )
    lora: LoraConfig = opt(LoraConfig, "LoRA on the policy (and the value model)")
    frozen: Literal["replicate", "partition"] = opt("replicate", distributed.FROZEN_HELP)
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
        if self.keep_best == "gold" and not self.gold_reward_model:
            raise ConfigError("keep_best=gold needs gold_reward_model=DIR")
        if self.pg_coef == 0 and self.ptx_coef <= 0:
            raise ConfigError("pg_coef=0 (no RL) trains nothing without ptx_coef > 0")
        if self.train.batch_size > self.rollout_batch:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} (answers per update) exceeds"
                f" rollout_batch={self.rollout_batch} (answers per step)"
            )
        if self.train.grad_accum < 1 or self.train.grad_accum > self.train.batch_size:
            raise ConfigError(
                "train.grad_accum must be between 1 and train.batch_size: it splits each"
                " update's answers into micro-batches"
            )
        # both need a whole policy outside the engines (the adapter merge; a best policy reloaded)
        whole = {"lora.enabled=true": self.lora.enabled, "keep_best=gold": self.keep_best == "gold"}
        distributed.refuse_on_zero3(self.train, "hanlm ppo", whole)
        distributed.check_frozen(self.train, self.frozen)


# --------------------------------------------------------------------------- the algorithm


@dataclass
class Experience:
    """One step's rollout with everything the updates need, computed without gradients."""

    r: Rollout
    raw: list[float]  # the scorer's totals
    parts: dict[str, float]  # the scorer's parts (batch means)
    scores: torch.Tensor  # raw - score shift
    old_logp: torch.Tensor  # [B, R] the sampling policy's log-probs
    ref_logp: torch.Tensor  # [B, R] the reference's
    old_values: torch.Tensor  # [B, R]
    entropy: torch.Tensor  # [B, R]
    kl: torch.Tensor  # [B, R] k1 estimate, masked
    advantages: torch.Tensor  # [B, R] whitened over all processes' answers
    returns: torch.Tensor  # [B, R]


class PPO:
    """The policy, value, reference and reward of one PPO run, their optimisers, and the loop's
    state (β, the score shift, the data order). Built alike in every process."""

    def __init__(
        self,
        cfg: PPOConfig,
        accelerator: Any,
        tok: Any,
        stops: list[int],
        n_prompts: int,
        n_ptx: int,
    ) -> None:
        import torch

        self.cfg, self.acc, self.tok, self.stops = cfg, accelerator, tok, stops
        self.device, self.world = accelerator.device, accelerator.num_processes
        self.rank, self.main = accelerator.process_index, accelerator.is_main_process
        self.micro = math.ceil(cfg.train.batch_size / cfg.train.grad_accum)
        # DDP, or DeepSpeed engines when train.deepspeed is set (hanlm.align.distributed)
        self.engines = distributed.loop_engines(accelerator, cfg.train, self.micro)

        # models: policy, reference, value (from the reward model, InstructGPT), reward
        policy = load_model(cfg.model).to(self.device)
        policy.config.pad_token_id = tok.pad_token_id
        if pick_precision(cfg.train.precision) == "fp16" and policy.dtype != torch.float32:
            raise ValueError(  # accelerate's fp16 loss scaler cannot unscale half gradients
                f"train.precision=fp16 trains fp32 weights, these are {policy.dtype}: set"
                " model.dtype=float32, or train.precision=bf16"
            )
        self.ref_model = None
        self.value_path = cfg.value_model or cfg.reward_model or cfg.model.path
        value = load_reward_model(replace(cfg.model, path=self.value_path)).to(self.device)
        value.config.pad_token_id = tok.pad_token_id
        if value.get_input_embeddings().weight.shape[0] < len(tok):
            raise ValueError(
                f"value model {self.value_path} has a smaller vocabulary than the policy's"
                " tokenizer; start it from a reward model trained on this SFT model"
            )
        if cfg.lora.enabled:
            policy = trainer.apply_lora(policy, cfg.lora)
            value = trainer.apply_lora(
                value,
                replace(cfg.lora, modules_to_save=sorted({*cfg.lora.modules_to_save, "score"})),
                task="SEQ_CLS",
            )
        else:
            self.ref_model = load_model(cfg.model).to(self.device).requires_grad_(False).eval()
        policy.eval()  # no dropout anywhere (see ppo_step); gradients flow in eval mode too
        value.eval()
        self.policy, self.value = policy, value
        self.scorer = Scorer.build(
            [cfg.reward_model] if cfg.reward_model else [],
            cfg.rules,
            tok,
            stops,
            self.device,
            base=cfg.model,
            missing_stop_penalty=cfg.missing_stop_penalty,
        )
        self.gold = None
        if cfg.gold_reward_model:
            self.gold = Scorer.build(
                [cfg.gold_reward_model], RuleConfig(), tok, stops, self.device, base=cfg.model
            )
        self.ref_model = self.engines.freeze(cfg.frozen, self.ref_model, self.scorer, self.gold)

        # optimisers (one step per minibatch) and schedulers
        total = cfg.train.max_steps * cfg.ppo_epochs
        total *= math.ceil(cfg.rollout_batch / cfg.train.batch_size)
        self.opt_p, self.sched_p = trainer.optimizer(policy, cfg.train, total)
        self.values = rollouts.token_value_module(value)  # the critic: value model + offset
        self.values.offset.requires_grad_(cfg.center_value)  # a bias only for a centred critic
        self.opt_v, self.sched_v = trainer.optimizer(self.values, cfg.train, total, lr=cfg.value_lr)
        self.prompt_cycle = Cycler(n_prompts, cfg.train.seed)
        self.ptx_cycle = Cycler(max(n_ptx, 1), cfg.train.seed + 1)
        self.beta: float = cfg.kl_coef
        self.score_shift: float | None = None
        self.center, self.centered = cfg.center_value, False

    def prepare(self) -> None:
        """DDP (or DeepSpeed) wraps what is trained, so that an update averages the gradients
        of all processes (one process: the models themselves). The unwrapped models serve
        generation, the no-grad passes, evaluation and saving."""
        wrapped = self.engines.prepare(
            {"policy": (self.policy, self.opt_p), "value": (self.values, self.opt_v)}
        )
        (self.dp_policy, self.opt_p), (self.dp_values, self.opt_v) = wrapped.values()
        self.policy = self.engines.unwrap(self.dp_policy)
        self.values = self.engines.unwrap(self.dp_values)
        self.value = self.values.model
        self.dp_policy.eval()
        self.dp_values.eval()

    def mine(self, ids: list[int], k: int) -> list[int]:
        """This process's k of `ids`, drawn alike by every process (k per process)."""
        return ids[self.rank * k : (self.rank + 1) * k]

    # ------------------------------------------------------------------ 1-4: experience

    def experience(self, prompts: list[list[dict[str, str]]]) -> Experience:
        """Sample answers, score them, and compute old/reference log-probs, values, the
        per-token rewards, advantages (whitened over all processes) and returns."""
        import torch

        cfg, acc, mb = self.cfg, self.acc, self.micro
        # 1. rollout (under ZeRO-3 on gathered weights: processes stop generating at different
        # lengths)
        with self.engines.full_weights(self.dp_policy):
            how = (cfg.max_new_tokens, cfg.temperature)
            r = rollout(self.policy, self.tok, prompts, self.stops, *how, self.engines.lockstep)
        # 2. score (the shift: the mean over every process's first rollout)
        raw, parts = r.score(self.scorer, mb)
        if self.score_shift is None:
            every = acc.gather(torch.tensor(raw, dtype=torch.float64, device=self.device))
            every = every.tolist()
            self.score_shift = sum(every) / len(every) if cfg.normalize_score else 0.0
        scores = torch.tensor(raw, device=self.device) - self.score_shift
        # 3. old log-probs, reference log-probs, values, entropy (no grad)
        old_logp, ref_logp, old_values, entropy = [], [], [], []
        with torch.no_grad(), acc.autocast():
            for i in range(0, len(r.texts), mb):
                seq, attn = r.seq[i : i + mb], r.attn[i : i + mb]
                labels = seq[:, r.ctx :]
                logits = answer_logits(self.policy, seq, attn, r.ctx) / cfg.temperature
                old_logp.append(losses.logprobs_from_logits(logits, labels))
                entropy.append(losses.entropy_from_logits(logits))
                with rollouts.reference_of(self.policy, self.ref_model) as ref:
                    ref_logits = answer_logits(ref, seq, attn, r.ctx) / cfg.temperature
                ref_logp.append(losses.logprobs_from_logits(ref_logits, labels))
                old_values.append(self.values(seq, attn, r.ctx))
        old_lp, ref_lp = torch.cat(old_logp), torch.cat(ref_logp)
        values, mask = torch.cat(old_values), r.mask
        if self.center and not self.centered:
            # The critic starts from the reward model, on the raw score scale; its targets are the
            # shifted scores. Move it by the mean gap at the last answer token (over all
            # processes) so the first advantages are not biased by the shift.
            last = mask.sum(1).long().clamp(min=1) - 1
            gap = scores - values.gather(1, last[:, None]).squeeze(1)
            gap = acc.gather(gap.double()).mean().float()
            with torch.no_grad():
                self.values.shift.add_(gap)
            values = values + gap
            self.centered = True
        # 4. rewards, advantages, returns; the advantages are whitened over all processes'
        # answers (gathered, padded to one answer width), then each takes its own rows back
        kl = losses.kl_k1(old_lp, ref_lp) * mask
        rewards = losses.per_token_rewards(kl, scores, mask, self.beta)
        advantages, returns = losses.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        every_adv = acc.gather(acc.pad_across_processes(advantages, dim=1))
        every_mask = acc.gather(acc.pad_across_processes(mask, dim=1))
        n = len(r.texts)
        advantages = losses.whiten(every_adv, every_mask)[self.rank * n : (self.rank + 1) * n]
        advantages = advantages[:, : mask.size(1)]
        return Experience(
            r,
            raw,
            parts,
            scores,
            old_lp,
            ref_lp,
            values,
            torch.cat(entropy),
            kl,
            advantages,
            returns,
        )

    # ------------------------------------------------------------------ 5: updates

    def ppo_step(self, exp: Experience, ptx_train: list[list[int]]) -> dict[str, float]:
        """`ppo_epochs` passes over the rollout in minibatches of train.batch_size answers: the
        clipped policy loss (+ entropy bonus, + ptx), then the clipped value loss; one optimiser
        step each per minibatch. The models stay in eval mode: dropout would make the new
        log-probs differ from the old ones by noise alone (ratio != 1 at the start)."""
        import torch

        cfg, acc, r = self.cfg, self.acc, exp.r
        n, mb = len(r.texts), cfg.train.batch_size
        stats: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n).tolist()
            for i in range(0, n, mb):
                idx = order[i : i + mb]
                micro = math.ceil(len(idx) / cfg.train.grad_accum)
                subs = [
                    torch.tensor(idx[j : j + micro], device=self.device)
                    for j in range(0, len(idx), micro)
                ]
                # 5a. the policy: clipped surrogate (+ entropy bonus, + ptx)
                for k, sub in enumerate(subs):
                    seq, attn, m = r.seq[sub], r.attn[sub], r.mask[sub]
                    if cfg.ptx_coef > 0:  # this process's ptx_batch pretraining blocks
                        ptx_ids = self.mine(
                            self.ptx_cycle.take(cfg.ptx_batch * self.world), cfg.ptx_batch
                        )
                        blocks = torch.tensor([ptx_train[j] for j in ptx_ids], device=self.device)
                    with self.engines.accumulate(self.dp_policy, k, len(subs)):
                        with acc.autocast():
                            logits = answer_logits(self.dp_policy, seq, attn, r.ctx)
                            logits = logits / cfg.temperature
                            logp = losses.logprobs_from_logits(logits, seq[:, r.ctx :])
                            pg_loss, clip_frac, approx_kl = losses.clipped_policy_loss(
                                logp, exp.old_logp[sub], exp.advantages[sub], m, cfg.clip_eps
                            )
                            loss = cfg.pg_coef * pg_loss
                            if cfg.entropy_coef:
                                ent = losses.entropy_from_logits(logits)
                                loss = loss - cfg.entropy_coef * losses.masked_mean(ent, m)
                            ptx_loss = lm_loss(self.dp_policy, blocks) if cfg.ptx_coef > 0 else None
                            loss = losses.ptx_mix(loss, ptx_loss, cfg.ptx_coef)
                        self.engines.backward(self.dp_policy, loss * (len(sub) / len(idx)))
                    for key, val in (
                        ("loss", loss),
                        ("pg_loss", pg_loss),
                        ("clip_frac", clip_frac),
                        ("approx_kl", approx_kl),
                        ("ptx_loss", ptx_loss),
                    ):
                        if val is not None:
                            stats.setdefault(key, []).append(float(val.detach()))
                self.engines.update(self.dp_policy, self.opt_p, self.sched_p)
                # 5b. the value model: clipped value loss
                for k, sub in enumerate(subs):
                    seq, attn, m = r.seq[sub], r.attn[sub], r.mask[sub]
                    with self.engines.accumulate(self.dp_values, k, len(subs)):
                        with acc.autocast():
                            v = self.dp_values(seq, attn, r.ctx)
                            vf_loss, vf_clip = losses.clipped_value_loss(
                                v, exp.old_values[sub], exp.returns[sub], m, cfg.value_clip
                            )
                        self.engines.backward(self.dp_values, vf_loss * (len(sub) / len(idx)))
                    stats.setdefault("value_loss", []).append(float(vf_loss.detach()))
                    stats.setdefault("value_clip_frac", []).append(float(vf_clip.detach()))
                self.engines.update(self.dp_values, self.opt_v, self.sched_v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    # ------------------------------------------------------------------ 6: measures

    def metrics(self, exp: Experience, stats: dict[str, float], seconds: float) -> dict[str, Any]:
        """The step's figures (means over the processes), then adapt β from the KL of all
        answers."""
        import torch

        r, mask, n = exp.r, exp.r.mask, len(exp.r.texts)
        kl_per_answer = exp.kl.sum(1)
        values = {
            "score": sum(exp.raw) / n,
            "reward": float((exp.scores - self.beta * kl_per_answer).mean()),
            "kl": float(kl_per_answer.mean()),
            "kl_k3": float((losses.kl_k3(exp.old_logp, exp.ref_logp) * mask).sum(1).mean()),
            "beta": self.beta,
            "entropy": float(losses.masked_mean(exp.entropy, mask)),
            "explained_variance": float(
                losses.explained_variance(exp.old_values, exp.returns, mask)
            ),
            "value_error": float(losses.masked_mean(exp.returns - exp.old_values, mask)),
            "length": float(mask.sum(1).mean()),
            "stop_rate": sum(r.stopped) / n,
            **exp.parts,
            **stats,
            "lr": self.sched_p.get_last_lr()[0],
            "seconds": seconds,
        }
        keep = ("beta", "lr", "seconds")  # the same in every process
        keys = [k for k in values if k not in keep]
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        values.update(zip(keys, self.acc.reduce(t, "mean").tolist()))
        self.beta = losses.adaptive_kl_coef(
            self.beta, values["kl"], self.cfg.kl_target, n * self.world, self.cfg.kl_horizon
        )
        return values

    def evaluate(
        self,
        prompts: rollouts.HeldOut,
        ptx_valid: list[list[int]],
        samples: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        """Greedy answers to held-out prompts, scored; held-out pretraining loss. On the main
        process only (nothing in it waits for the others; they wait at their next collective),
        or, under ZeRO-3, on every process alike in step (the main one's figures are kept)."""
        import torch

        out: dict[str, float] = {}
        if not (self.main or self.engines.lockstep):
            return out
        if prompts:
            with self.engines.full_weights(self.dp_policy):
                scores = rollouts.held_out_scores(
                    self.policy,
                    self.tok,
                    prompts,
                    self.stops,
                    self.scorer,
                    self.cfg.max_new_tokens,
                    self.micro,
                    gold=self.gold,
                    samples=samples,
                    synced=self.engines.lockstep,
                )
            out.update(scores)
        if ptx_valid:
            self.policy.eval()
            with torch.no_grad(), self.acc.autocast():
                vals = [
                    lm_loss(self.policy, torch.tensor(ptx_valid[i : i + 8], device=self.device))
                    for i in range(0, len(ptx_valid), 8)
                ]
            out["ptx_loss"] = sum(float(v) for v in vals) / len(vals)
        return out

    # ------------------------------------------------------------------ checkpoints

    def _checkpointed(self) -> tuple[dict[str, Any], dict[str, Any]]:
        modules = {"policy": self.policy, "value": self.values}
        stateful = {
            "opt_policy": self.opt_p,
            "opt_value": self.opt_v,
            "sched_policy": self.sched_p,
            "sched_value": self.sched_v,
            "scaler": self.acc.scaler,
            "prompts": self.prompt_cycle,
            "ptx": self.ptx_cycle,
        }
        return modules, stateful

    def save(self, run: Run, step: int, initial: dict[str, Any]) -> None:
        """A complete checkpoint: trainable weights (the critic's offset too), optimisers,
        schedulers, β, score shift, data positions and every process's random state."""
        modules, stateful = self._checkpointed()
        extra = {"beta": self.beta, "score_shift": self.score_shift, "centered": self.centered}
        extra["value_shift"] = float(self.values.shift)  # a buffer: not among the trained weights
        keep = self.cfg.train.save_total_limit
        self.engines.save(run, step, keep, modules, stateful, {**extra, "initial": initial})

    def load(self, ckpt: Path) -> dict[str, Any]:
        """Restore a checkpoint written by `save` (before `prepare`); returns its state."""
        state = self.engines.load(ckpt, *self._checkpointed())
        self.beta, self.score_shift = state["beta"], state["score_shift"]
        self.centered = state["centered"]
        self.values.shift.fill_(state.get("value_shift", 0.0))
        return state


# --------------------------------------------------------------------------- run


def run(cfg: PPOConfig) -> Path:
    import torch
    from transformers import set_seed

    acc = loop.loop_accelerator(cfg.train.precision, "hanlm ppo")
    world, main = acc.num_processes, acc.is_main_process

    with Run("ppo", cfg) as run:
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.path)
        require_template(tok, cfg.template, cfg.model.path, "PPO")
        stops = stop_token_ids(tok, cfg.template)

        data, train_prompts, held_out = rollouts.load_prompts(
            cfg.data, tok, cfg.max_prompt_length, cfg.eval_prompts, "PPO"
        )
        if len(train_prompts) < cfg.rollout_batch * world:
            raise ValueError(
                f"{len(train_prompts)} prompts fit max_prompt_length={cfg.max_prompt_length};"
                f" need at least rollout_batch={cfg.rollout_batch} x {world} processes"
            )
        ptx_train, ptx_valid = rollouts.ptx_blocks(
            cfg.ptx_data, tok, cfg.ptx_block, cfg.ptx_coef > 0, cfg.eval_ptx_blocks, main
        )
        run.set(
            "data",
            {
                **data.stats.as_dict(),
                "train_prompts": len(train_prompts),
                "eval_prompts": len(held_out),
                "ptx_train_blocks": len(ptx_train),
                "ptx_valid_blocks": len(ptx_valid),
            },
        )

        ppo = PPO(cfg, acc, tok, stops, len(train_prompts), len(ptx_train))
        summary: dict[str, Any] = {
            "policy": trainer.describe_trainable(ppo.policy),
            "value_init": ppo.value_path,
            "world_size": world,
            "global_rollout_batch": cfg.rollout_batch * world,
        }
        # Every process samples its own answers: once the models are built alike, the others than
        # the first re-seed (seed + rank), so that one process keeps the seed's numbers.
        if acc.process_index:
            set_seed(cfg.train.seed + acc.process_index)
        ckpt, start = run.resume_from(), 0
        if ckpt is not None:
            state = ppo.load(Path(ckpt))
            start = state["step"]
            summary.update(state["initial"])
        ppo.prepare()
        before: list[dict[str, Any]] = []
        if ckpt is None:
            initial = ppo.evaluate(held_out, ptx_valid, samples=before)
            summary.update({f"initial_eval_{k}": v for k, v in initial.items()})
            run.log(0, **{f"eval_{k}": v for k, v in initial.items()})
            if main:
                print(f"[hanlm] before PPO: {_fmt(initial)}")

        metrics: dict[str, Any] = run.logged(start, last=cfg.train.max_steps)  # resumed at the end
        after: list[dict[str, Any]] = []  # the last evaluation's answers
        best_gold, best_step = -math.inf, 0
        for step in range(start + 1, cfg.train.max_steps + 1):
            t0 = time.time()
            ids = ppo.mine(ppo.prompt_cycle.take(cfg.rollout_batch * world), cfg.rollout_batch)
            exp = ppo.experience([train_prompts[i] for i in ids])
            stats = ppo.ppo_step(exp, ptx_train)
            metrics = ppo.metrics(exp, stats, time.time() - t0)
            if _due(step, cfg.train.eval_steps, cfg.train.max_steps):
                after.clear()
                ev = ppo.evaluate(held_out, ptx_valid, samples=after)
                metrics.update({f"eval_{k}": v for k, v in ev.items()})
                if cfg.keep_best == "gold" and main and ev["gold_score"] > best_gold:
                    best_gold, best_step = ev["gold_score"], step
                    torch.save(loop.trainable_state(ppo.policy), run.dir / ".best_policy.pt")
            run.log(step, **metrics)
            if main and (
                step % max(cfg.train.logging_steps, 1) == 0 or step == cfg.train.max_steps
            ):
                print(f"[hanlm] ppo step {step}/{cfg.train.max_steps}: {_fmt(metrics)}")
            if cfg.train.save_steps > 0 and step % cfg.train.save_steps == 0:
                ppo.save(run, step, {k: v for k, v in summary.items() if k.startswith("initial")})

        summary.update({k: v for k, v in metrics.items() if k.startswith("eval_")})
        summary.update(
            steps=cfg.train.max_steps,
            score_shift=ppo.score_shift,
            final_beta=ppo.beta,
            final_kl=metrics.get("kl"),
            final_score=metrics.get("score"),
        )
        summary.update(ppo.engines.describe())  # DeepSpeed; the frozen models' weights held
        # ZeRO-3: every process gathers the weights for the check and the save below
        with ppo.engines.full_weights(ppo.dp_policy, ppo.dp_values):
            if world > 1:
                same = loop.weights_equal_across_processes([ppo.policy, ppo.value])
                summary["weights_equal_across_processes"] = same
                if main and not same:
                    print("[hanlm] warning: the processes' weights differ", file=sys.stderr)
            acc.wait_for_everyone()
            if main:
                if cfg.keep_best == "gold" and best_step and best_step != cfg.train.max_steps:
                    loop.load_trainable(ppo.policy, run.dir / ".best_policy.pt")
                    summary.update(kept_step=best_step, kept_gold_score=best_gold)
                    print(f"[hanlm] keeping the step-{best_step} policy (best gold score)")
                    after.clear()
                    ev = ppo.evaluate(held_out, ptx_valid, samples=after)
                    summary.update({f"eval_{k}": v for k, v in ev.items()})
                (run.dir / ".best_policy.pt").unlink(missing_ok=True)
                rollouts.write_samples(run.dir, before, after)
                summary["warnings"] = warnings_for(
                    _figures(summary, "initial_eval_"), _figures(summary)
                )
                for w in summary["warnings"]:
                    print(f"[hanlm] warning: {w}", file=sys.stderr)
                run.save_model(ppo.engines.final_model(ppo.dp_policy), tok, cfg.lora, stops)
                run.finish(summary)
                line = (
                    f"[hanlm] ppo: held-out score (the training reward: proxy)"
                    f" {summary.get('initial_eval_score', math.nan):.4f}"
                    f" -> {summary.get('eval_score', math.nan):.4f}"
                )
                if "eval_gold_score" in summary:
                    line += (
                        f"; gold judge {summary.get('initial_eval_gold_score', math.nan):.4f}"
                        f" -> {summary['eval_gold_score']:.4f}"
                    )
                print(line)
            acc.wait_for_everyone()
    return run.dir


def _figures(summary: dict[str, Any], prefix: str = "eval_") -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in summary.items() if k.startswith(prefix)}


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


# what a progress line shows
_SHOWN = ("score", "eval_score", "eval_gold_score", "eval_distinct_answers", "kl", "reward")
_SHOWN += ("entropy", "clip_frac", "value_loss", "ptx_loss", "eval_ptx_loss", "length")


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in _SHOWN if metrics.get(k) is not None)
