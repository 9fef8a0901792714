"""`hanlm ppo`: InstructGPT-style PPO with a per-token KL penalty and the pretraining mix (ptx).

No maintained library ships PPO-ptx (trl dropped its PPO trainer in 1.13), so this is hanlm's
own loop, written to be read top to bottom as torchtune's PPO recipe is: the math is in
`hanlm.losses`, generation and scoring in `hanlm.align.rollouts` and `hanlm.align.rewards`, the
options in `hanlm.align.ppo_config`; the class `PPO` (`hanlm.align.ppo_algorithm`) holds the
models and does one thing per method (`experience`, `ppo_step`, `evaluate`, `save`/`load`), and
`run()` here is the loop: the data, the models, a resumed or measured start, the steps, the
checks and the save. The algorithm:

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hanlm import console, trainer
from hanlm.align import loop, rollouts
from hanlm.align.checks import TREND_KEYS, reward_trend, trend_warnings, warnings_for
from hanlm.align.ppo_algorithm import PPO
from hanlm.align.ppo_config import PPOConfig
from hanlm.config import to_dict, trackers
from hanlm.data.templates import require_template, stop_token_ids
from hanlm.modeling import load_tokenizer
from hanlm.runs import Run, read_metrics

# --------------------------------------------------------------------------- run


def run(cfg: PPOConfig) -> Path:
    from transformers import set_seed

    out = Path(cfg.output_dir)
    acc = loop.loop_accelerator(cfg.train.precision, "hanlm ppo", trackers(cfg.train), out)
    world = acc.num_processes
    with Run("ppo", cfg) as run:
        trainer.start_trackers(acc, run, to_dict(cfg))
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.path)
        require_template(tok, cfg.template, cfg.model.path, "PPO")
        stops = stop_token_ids(tok, cfg.template)
        data = _data(cfg, run, tok, world, acc.is_main_process)
        ppo = PPO(cfg, acc, tok, stops, len(data.train_prompts), len(data.ptx_train))
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
        start, before = _resume_or_measure(run, ppo, data, summary)
        metrics, after, best = _steps(cfg, run, ppo, data, start, summary)
        summary.update({k: v for k, v in metrics.items() if k.startswith("eval_")})
        summary.update(
            steps=cfg.train.max_steps,
            score_shift=ppo.score_shift,
            final_beta=ppo.beta,
            final_kl=metrics.get("kl"),
            final_score=metrics.get("score"),
        )
        summary.update(ppo.engines.describe())  # DeepSpeed; the frozen models' weights held
        _finish(cfg, run, ppo, data, best, (before, after), summary)
        acc.end_training()  # the trackers flush and close
    return run.dir


@dataclass
class Data:
    """The prompts of a run (training, held-out) and its pretraining blocks (training and
    held-out, for ptx)."""

    train_prompts: list[rollouts.Messages]
    held_out: rollouts.HeldOut
    ptx_train: list[list[int]]
    ptx_valid: list[list[int]]


def _data(cfg: PPOConfig, run: Run, tok: Any, world: int, main: bool) -> Data:
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
    return Data(train_prompts, held_out, ptx_train, ptx_valid)


def _resume_or_measure(
    run: Run, ppo: PPO, data: Data, summary: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    """The step to start from and the held-out answers before training: the newest checkpoint
    restored (its figures before training into `summary`), or, on a fresh run, the models
    evaluated before the first step. The models are wrapped for training between the two."""
    ckpt, start = run.resume_from(), 0
    if ckpt is not None:
        state = ppo.load(Path(ckpt))
        start = state["step"]
        summary.update(state["initial"])
    ppo.prepare()
    before: list[dict[str, Any]] = []
    if ckpt is None:
        initial = ppo.evaluate(data.held_out, data.ptx_valid, samples=before)
        summary.update({f"initial_eval_{k}": v for k, v in initial.items()})
        run.log(0, **{f"eval_{k}": v for k, v in initial.items()})
        ppo.acc.log({f"eval_{k}": v for k, v in initial.items()}, step=0)
        if ppo.main:
            print(f"[hanlm] before PPO: {_fmt(initial)}")
    return start, before


def _steps(
    cfg: PPOConfig, run: Run, ppo: PPO, data: Data, start: int, summary: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]], tuple[float, int]]:
    """The PPO steps after `start`: each logged, evaluated when due (with keep_best=gold, the
    policy of the best gold score kept aside), checkpointed when due. Returns the last step's
    metrics, the last evaluation's answers and (best gold score, its step)."""
    import torch

    world, main = ppo.world, ppo.main
    metrics: dict[str, Any] = run.logged(start, last=cfg.train.max_steps)  # resumed at the end
    after: list[dict[str, Any]] = []  # the last evaluation's answers
    best_gold, best_step = -math.inf, 0
    quiet = main and not console.verbose()
    progress = console.Progress("ppo", cfg.train.max_steps, start) if quiet else None
    for step in range(start + 1, cfg.train.max_steps + 1):
        t0 = time.time()
        ids = ppo.mine(ppo.prompt_cycle.take(cfg.rollout_batch * world), cfg.rollout_batch)
        exp = ppo.experience([data.train_prompts[i] for i in ids])
        stats = ppo.ppo_step(exp, data.ptx_train)
        metrics = ppo.metrics(exp, stats, time.time() - t0)
        if _due(step, cfg.train.eval_steps, cfg.train.max_steps):
            after.clear()
            ev = ppo.evaluate(data.held_out, data.ptx_valid, samples=after)
            metrics.update({f"eval_{k}": v for k, v in ev.items()})
            if cfg.keep_best == "gold" and main and ev["gold_score"] > best_gold:
                best_gold, best_step = ev["gold_score"], step
                torch.save(loop.trainable_state(ppo.policy), run.dir / ".best_policy.pt")
        run.log(step, **metrics)
        ppo.acc.log(metrics, step=step)  # the trackers of train.report_to (main process)
        if progress is not None:
            if "eval_score" in metrics:
                total = cfg.train.max_steps
                shown = {
                    k[5:]: metrics[k] for k in _SHOWN if k.startswith("eval_") and k in metrics
                }
                progress.note(f"eval at step {step}/{total}: {console.figures(shown)}")
            shown = {k: metrics.get(k) for k in ("score", "kl", "pg_loss")}
            progress.update(step, **shown, lr=metrics.get("lr"))
        elif main and (step % max(cfg.train.logging_steps, 1) == 0 or step == cfg.train.max_steps):
            print(f"[hanlm] ppo step {step}/{cfg.train.max_steps}: {_fmt(metrics)}")
        if cfg.train.save_steps > 0 and step % cfg.train.save_steps == 0:
            ppo.save(run, step, {k: v for k, v in summary.items() if k.startswith("initial")})
    if progress is not None:
        took = console.duration(time.time() - progress.started)
        progress.close(f"trained {cfg.train.max_steps - start} steps in {took}")
    return metrics, after, (best_gold, best_step)


def _finish(
    cfg: PPOConfig,
    run: Run,
    ppo: PPO,
    data: Data,
    best: tuple[float, int],
    answers: tuple[list[dict[str, Any]], list[dict[str, Any]]],
    summary: dict[str, Any],
) -> None:
    """Check that the processes hold equal weights; on the main process keep the best policy
    (keep_best=gold, re-evaluated), write the samples before and after (`answers`), the warnings,
    the model and the summary."""
    world, main = ppo.world, ppo.main
    (best_gold, best_step), (before, after) = best, answers
    # ZeRO-3: every process gathers the weights for the check and the save below
    with ppo.engines.full_weights(ppo.dp_policy, ppo.dp_values):
        if world > 1:
            same = loop.weights_equal_across_processes([ppo.policy, ppo.value])
            summary["weights_equal_across_processes"] = same
            if main and not same:
                print("[hanlm] warning: the processes' weights differ", file=sys.stderr)
        ppo.acc.wait_for_everyone()
        if main:
            if cfg.keep_best == "gold" and best_step and best_step != cfg.train.max_steps:
                loop.load_trainable(ppo.policy, run.dir / ".best_policy.pt")
                summary.update(kept_step=best_step, kept_gold_score=best_gold)
                print(f"[hanlm] keeping the step-{best_step} policy (best gold score)")
                after.clear()
                ev = ppo.evaluate(data.held_out, data.ptx_valid, samples=after)
                summary.update({f"eval_{k}": v for k, v in ev.items()})
            (run.dir / ".best_policy.pt").unlink(missing_ok=True)
            rollouts.write_samples(run.dir, before, after)
            trend = reward_trend(read_metrics(run.dir))  # None (nulls) for a run under 8 steps
            summary.update(trend or dict.fromkeys(TREND_KEYS))
            summary["warnings"] = warnings_for(
                _figures(summary, "initial_eval_"), _figures(summary)
            )
            if cfg.pg_coef > 0:  # the ptx-alone control raises no reward
                summary["warnings"] += trend_warnings(trend, cfg.ptx_coef > 0)
            for w in summary["warnings"]:
                print(f"[hanlm] warning: {w}", file=sys.stderr)
            run.save_model(ppo.engines.final_model(ppo.dp_policy), ppo.tok, cfg.lora, ppo.stops)
            run.finish(summary)
            _report(summary)
        ppo.acc.wait_for_everyone()


def _report(summary: dict[str, Any]) -> None:
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


def _figures(summary: dict[str, Any], prefix: str = "eval_") -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in summary.items() if k.startswith(prefix)}


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


# what a progress line shows
_SHOWN = ("score", "eval_score", "eval_gold_score", "eval_distinct_answers", "kl", "reward")
_SHOWN += ("entropy", "clip_frac", "value_loss", "ptx_loss", "eval_ptx_loss", "length")


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in _SHOWN if metrics.get(k) is not None)
