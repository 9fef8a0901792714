"""The algorithm of `hanlm ppo` (`hanlm.align.ppo`, whose `run()` is the loop): the class `PPO`
holds the policy, reference, value and reward models of one run, their optimisers and the
loop's state, and does one thing per method: `experience` (steps 1-4: rollout, score, the
no-grad passes, rewards and advantages), `ppo_step` (step 5: the clipped policy and value
updates), `metrics` and `evaluate` (step 6), `save`/`load` (complete checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hanlm import losses, trainer
from hanlm.align import distributed, rollouts
from hanlm.align.ppo_config import PPOConfig
from hanlm.align.rewards import RuleConfig, Scorer
from hanlm.align.rollouts import Cycler, Rollout, answer_logits, lm_loss, rollout
from hanlm.generation import load_reward_model
from hanlm.modeling import load_model, pick_precision
from hanlm.runs import Run

if TYPE_CHECKING:
    import torch


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
