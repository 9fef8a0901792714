"""Kill-anywhere resume soak: SIGKILL `pretrain`, `sft`, `dpo`, `reward` and `ppo` at random
moments and inside checkpoint writes, resume each time with `resume=true`, and check that the
finished run equals an uninterrupted one and that no half-written checkpoint or output was taken.

    python scripts/soak.py                       # 5 stages x 10 kills (~10 min on 2 cores)
    python scripts/soak.py --stages pretrain,ppo --kills 3 --out /tmp/soak

Each stage runs on the tiny fp32 CPU setup the tests use (the `test`-preset LLaMA, a few dozen
records, 12-32 steps, a checkpoint every 1-3 steps). Per stage: one uninterrupted reference,
then one run that is killed `--kills` times. The kill of each attempt is one of
- `random`: 70%: a moment in the training, drawn uniformly over the first 2/kills of the
  reference's training time after this attempt's training began (so the kills spread over the
  whole run); 30%: a moment in the start-up (imports, data, model, first evaluation);
- `mid-checkpoint`: inside a checkpoint write, after the weights and before the optimiser
  state (the Trainer's `_save_optimizer_and_scheduler`; PPO between `policy.pt` and `value.pt`);
- `before-marker`: every file of the checkpoint written, its complete marker not yet;
- `final-save`: while the final model's files are being moved into the output directory.
The checkpoint/final kinds use hooks installed by this script in the child process (it runs
`hanlm.pipeline.cli` itself): the hook writes a signal file and sleeps, the driver sees the file and
kills the child at a random moment 0-50 ms later, so the kill lands inside that write.

After every kill: each checkpoint that carries the complete marker must match its manifest
(size and sha256 of every file), weights in the output directory must come with their config
and tokenizer and load whole, and `hanlm.json` must not say complete. The next attempt's
"[hanlm] resuming from X" must name the newest complete checkpoint seen after the kill. At the
end: the metrics rows (every step, all attempts) and the final evaluation equal the
reference's, and the final weights equal the reference's.

Results: `<out>.json` and `<out>.md` (default benchmarks/results/soak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "sft", "dpo", "reward", "ppo")
KINDS = ("random", "mid-checkpoint", "before-marker", "final-save")
# Timing and session-scoped figures: not expected to repeat. `train_loss` is the Trainer's
# average over the steps run in the last session only (its resume re-counts from there).
VOLATILE = ("time", "runtime", "per_second", "seconds", "flos", "train_loss", "peak_memory")
TOL = 1e-6  # relative, on metrics; weights are compared exactly (max |diff| reported)
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the child process


def _fire(what: str) -> None:
    """Tell the driver we are inside the write it wants to kill, then wait to be killed."""
    Path(os.environ["SOAK_SIGNAL"]).write_text(what)
    time.sleep(600)


def _mark_training_start() -> None:
    """Write SOAK_STARTED when training begins (`Trainer.train`, PPO's `prepare`), so that the
    driver can time a random kill within the training rather than the start-up."""
    import transformers

    def started() -> None:
        Path(os.environ["SOAK_STARTED"]).write_text(str(time.time()))

    def wrap(cls: Any, name: str) -> None:
        orig = getattr(cls, name, None)
        if orig is None:
            return

        def call(self: Any, *a: Any, **kw: Any) -> Any:
            started()
            return orig(self, *a, **kw)

        setattr(cls, name, call)

    wrap(transformers.Trainer, "train")
    try:
        from hanlm.align import ppo

        wrap(ppo.PPO, "prepare")
    except (ImportError, AttributeError):
        pass


def _install_hooks(spec: str) -> None:
    """Arm one hook: `mid:N` / `premark:N` at the N-th checkpoint this process writes,
    `final:K` after the K-th file of the final model is moved into place."""
    _mark_training_start()
    if not spec:
        return
    kind, n = spec.split(":")
    count = {"n": 0}

    def tick(what: str) -> None:
        count["n"] += 1
        if count["n"] == int(n):
            _fire(what)

    if kind == "mid":
        import transformers

        import hanlm.align.loop as loop

        orig_opt = transformers.Trainer._save_optimizer_and_scheduler

        def save_opt(self: Any, output_dir: str) -> Any:
            tick(f"mid-checkpoint {output_dir}")
            return orig_opt(self, output_dir)

        transformers.Trainer._save_optimizer_and_scheduler = save_opt
        orig_state = loop.trainable_state
        calls = {"n": 0}

        def state(model: Any) -> Any:  # PPO: policy.pt is written, value.pt not yet
            calls["n"] += 1
            if calls["n"] % 2 == 0:
                tick("mid-checkpoint (policy.pt written, value.pt not)")
            return orig_state(model)

        loop.trainable_state = state
    elif kind == "premark":
        import hanlm.runs as runs
        import hanlm.trainer as trainer

        orig_mark = runs.mark_complete

        def mark(checkpoint: Any, step: int) -> None:
            tick(f"before-marker {checkpoint}")
            orig_mark(checkpoint, step)

        runs.mark_complete = mark
        trainer.mark_complete = mark
    elif kind == "final":
        import hanlm.modeling as modeling
        import hanlm.runs as runs

        real_os = modeling.os
        saving = {"on": False}

        class _Os:  # os for hanlm.modeling, with a hook on the final save's moves
            def __getattr__(self, name: str) -> Any:
                return getattr(real_os, name)

            def replace(self, a: Any, b: Any) -> None:
                real_os.replace(a, b)
                if saving["on"]:
                    tick(f"final-save after moving {Path(b).name}")

        modeling.os = _Os()
        orig_save = runs._save_model

        def save(*a: Any, **kw: Any) -> Any:
            saving["on"] = True
            try:
                return orig_save(*a, **kw)
            finally:
                saving["on"] = False

        runs._save_model = save


def child(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # tiny models, shared cores: no OpenMP spinning
    _install_hooks(os.environ.get("SOAK_HOOK", ""))
    from hanlm.pipeline import cli

    return cli.main(argv)


# --------------------------------------------------------------------------- data and stages


def prepare(work: Path) -> dict[str, Path]:
    """The tiny model and the data of every stage (as the tests build them)."""
    from hanlm.testing import SAMPLE_TEXT, tiny_model_dir

    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "model.safetensors").is_file():
        tiny_model_dir(model)
    rng = random.Random(0)
    lines = SAMPLE_TEXT[:4] + SAMPLE_TEXT[4:5]

    def write(name: str, rows: list[dict[str, Any]]) -> Path:
        p = work / name
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
        return p

    corpus = write(
        "corpus.jsonl",
        [{"text": "".join(rng.choice(lines) for _ in range(3)) + f" {i}"} for i in range(160)],
    )
    corpus_valid = write("corpus_valid.jsonl", [{"text": t} for t in SAMPLE_TEXT])
    qa = [
        ("床前明月光的下一句是什么？", "疑是地上霜。"),
        ("白日依山尽的下一句是什么？", "黄河入海流。"),
        ("春眠不觉晓的下一句是什么？", "处处闻啼鸟。"),
        ("Say hello.", "Hello, world!"),
    ]
    chat = lambda q, a: {  # noqa: E731
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    }
    sft = write("sft.jsonl", [chat(f"{qa[i % 4][0]} #{i}", qa[i % 4][1]) for i in range(64)])
    sft_valid = write("sft_valid.jsonl", [chat(q, a) for q, a in qa])
    good = ["疑是地上霜。", "黄河入海流。", "处处闻啼鸟。", "Hello, world!"]
    bad = ["The quick brown fox.", "0123456789", "😀😀😀", "不亦乐乎？不亦乐乎？"]
    pairs = [
        {"prompt": f"{qa[i % 4][0]} #{i}", "chosen": good[i % 4], "rejected": bad[(i + i % 4) % 4]}
        for i in range(64)
    ]
    pref, pref_valid = write("pref.jsonl", pairs[:48]), write("pref_valid.jsonl", pairs[48:])
    return {
        "model": model,
        "corpus": corpus,
        "corpus_valid": corpus_valid,
        "sft": sft,
        "sft_valid": sft_valid,
        "pref": pref,
        "pref_valid": pref_valid,
        "work": work,
    }


def stage_args(stage: str, d: dict[str, Path]) -> list[str]:
    """Small runs (seconds each) with many checkpoints: `save_total_limit=2` as by default."""
    common = ["train.logging_steps=1", "train.batch_size=4", "train.lr=3e-3"]
    pref = [f"data.paths=[{d['pref']}]", f"data.valid_paths=[{d['pref_valid']}]"]
    if stage == "pretrain":
        return [
            f"tokenizer={d['model']}",
            "preset=test",
            f"data.paths=[{d['corpus']}]",
            f"data.valid_paths=[{d['corpus_valid']}]",
            "block_size=32",
            f"cache_dir={d['work'] / 'tokenized'}",
            "train.max_steps=30",
            "train.save_steps=3",
            "train.eval_steps=10",
            *common,
        ]
    if stage == "sft":
        return [
            f"model.path={d['model']}",
            f"data.paths=[{d['sft']}]",
            f"data.valid_paths=[{d['sft_valid']}]",
            "data.dedup=none",
            "generation.max_new_tokens=8",
            "train.max_steps=30",
            "train.save_steps=3",
            "train.eval_steps=10",
            *common,
        ]
    if stage == "dpo":
        return [
            f"model.path={d['model']}",
            *pref,
            f"ref_cache_dir={d['work'] / 'ref_logps'}",
            "eval_prompts=4",
            "max_new_tokens=8",
            "train.max_steps=24",
            "train.save_steps=2",
            "train.eval_steps=8",
            *common,
        ]
    if stage == "reward":
        return [
            f"model.path={d['model']}",
            *pref,
            "train.max_steps=30",
            "train.save_steps=3",
            "train.eval_steps=10",
            *common,
        ]
    if stage == "ppo":
        from hanlm.testing import SAMPLE_TEXT

        return [
            f"model.path={d['model']}",
            *pref,
            "rules.funcs=[token_share]",
            f"rules.target={''.join(SAMPLE_TEXT[:4])}",
            "max_new_tokens=6",
            "rollout_batch=8",
            "train.batch_size=8",
            "ppo_epochs=1",
            "eval_prompts=4",
            "eval_ptx_blocks=0",
            "train.max_steps=12",
            "train.save_steps=1",
            "train.eval_steps=6",
            "train.logging_steps=1",
            "train.lr=1e-2",
        ]
    raise ValueError(f"unknown stage {stage}")


def max_steps(args: list[str]) -> tuple[int, int]:
    get = lambda k: int(next(a.split("=", 1)[1] for a in args if a.startswith(k + "=")))  # noqa: E731
    return get("train.max_steps"), get("train.save_steps")


# --------------------------------------------------------------------------- one attempt


def attempt(
    stage: str,
    args: list[str],
    out: Path,
    log: Path,
    hook: str = "",
    kill_at: float | None = None,
    kill_in_training: float | None = None,
    resume: bool = False,
    rng: random.Random | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """Run the stage once; SIGKILL it at `kill_at` seconds, `kill_in_training` seconds after
    the training began, or when the armed hook fires."""
    sig = out.parent / f".{out.name}.signal"
    start = out.parent / f".{out.name}.started"
    sig.unlink(missing_ok=True)
    start.unlink(missing_ok=True)
    env = {
        **os.environ,
        "SOAK_HOOK": hook,
        "SOAK_SIGNAL": str(sig),
        "SOAK_STARTED": str(start),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    argv = [stage, *args, f"output_dir={out}", *(["resume=true"] if resume else [])]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--", *argv]
    t0 = time.time()
    seen: dict[str, float] = {}  # checkpoint directory -> when it first appeared
    started: float | None = None
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        killed, where = False, ""
        while proc.poll() is None:
            now = time.time() - t0
            for c in (out / "checkpoints").glob("checkpoint-*"):
                seen.setdefault(c.name, now)
            if started is None and start.exists():
                started = now
            if sig.exists():
                time.sleep((rng or random).uniform(0, 0.05))
                where = sig.read_text()
                killed = True
            elif kill_at is not None and now >= kill_at:
                where, killed = f"random at {now:.2f}s", True
            elif (
                kill_in_training is not None
                and started is not None
                and now >= started + kill_in_training
            ):
                where, killed = f"random, {now - started:.2f}s into the training", True
            elif now > timeout:
                where, killed = "timeout", True
            if killed:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.01)
    sig.unlink(missing_ok=True)
    start.unlink(missing_ok=True)
    text = log.read_text(encoding="utf-8", errors="replace")
    return {
        "killed": killed,
        "where": where,
        "returncode": proc.returncode,
        "seconds": round(time.time() - t0, 2),
        "checkpoint_times": sorted(seen.values()),
        "training_started": started,
        "resumed_from": sorted(set(re.findall(r"\[hanlm\] resuming from (\S+)", text))),
        "started_fresh": "[hanlm] no checkpoint to resume: starting" in text,
        "log": str(log),
    }


# --------------------------------------------------------------------------- checks


def weights_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def check_state(out: Path) -> tuple[list[str], list[str], dict[str, int]]:
    """After a kill: (problems, complete checkpoints, partial-write evidence)."""
    from safetensors import safe_open

    from hanlm.runs import CHECKPOINTS, COMPLETE, checkpoint_problem, read_run

    problems, complete = [], []
    evidence = {"partial_checkpoint_dirs": 0, "temporary_dirs": 0, "weights_in_output": 0}
    root = out / CHECKPOINTS
    for d in sorted(root.glob("checkpoint-*")) if root.is_dir() else []:
        if (d / COMPLETE).is_file():
            problem = checkpoint_problem(d)
            if problem:
                problems.append(f"{d.name} is marked complete but {problem}")
            else:
                complete.append(str(d))
        else:
            evidence["partial_checkpoint_dirs"] += 1
    if root.is_dir():
        evidence["temporary_dirs"] += len(list(root.glob(".checkpoint-*")))
    evidence["temporary_dirs"] += len(list(out.parent.glob(f".{out.name}.save.*")))
    for w in weights_files(out):
        evidence["weights_in_output"] += 1
        missing = [n for n in ("config.json", "tokenizer_config.json") if not (out / n).is_file()]
        if missing:
            problems.append(f"{w.name} is in the output without {missing}")
        try:
            with safe_open(str(w), "pt") as f:
                for k in f.keys():  # noqa: SIM118 - safe_open is no dict
                    f.get_tensor(k)
        except Exception as e:  # any failure to read is the finding
            problems.append(f"{w.name} in the output does not load: {e}")
    info = read_run(out) or {}
    if info.get("status") == "complete":
        problems.append("hanlm.json says complete after a kill")
    complete.sort(key=lambda p: int(p.rsplit("-", 1)[-1]))
    return problems, complete, evidence


def _kind(row: dict[str, Any]) -> str:
    if any(k.startswith("eval_") for k in row):
        return "eval"
    return "end" if "train_runtime" in row else "log"


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step"
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and not any(x in k for x in VOLATILE)
    }


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= TOL * max(abs(a), abs(b), 1e-12) or abs(a - b) <= 1e-12


def compare(ref: Path, soak: Path, spans: list[tuple[int, int | None]]) -> dict[str, Any]:
    """Metrics rows (all attempts, every step), the final summary and the final weights.
    `spans`: per attempt, the metrics lines written by its end and the step it resumed from."""
    import torch
    from safetensors.torch import load_file

    from hanlm.runs import read_metrics, read_run

    want = {(r["step"], _kind(r)): _numbers(r) for r in read_metrics(ref)}
    diffs: list[str] = []
    rows = after = 0
    max_rel = 0.0

    def resumed_at(line: int) -> int | None:
        for end, step in spans:
            if line < end:
                return step
        return None

    for line, r in enumerate(read_metrics(soak)):
        key = (r["step"], _kind(r))
        got = _numbers(r)
        if key not in want:
            diffs.append(f"metrics row {key} is not in the reference")
            continue
        rows += 1
        step = resumed_at(line)
        after += step is not None and r["step"] > step  # logged by training after a resume
        for k in sorted(set(want[key]) | set(got)):
            if k not in got or k not in want[key]:
                diffs.append(f"metrics step {key}: {k} only in one run")
                continue
            a, b = want[key][k], got[k]
            if not math.isnan(a) and not math.isnan(b):
                max_rel = max(max_rel, abs(a - b) / max(abs(a), 1e-12))
            if not _close(a, b):
                diffs.append(f"metrics step {key} {k}: {a!r} vs {b!r}")
    missing = set(want) - {(r["step"], _kind(r)) for r in read_metrics(soak)}
    # The Trainer's end-of-training row (runtime, session-average loss) is not written again by
    # a resume from the last step's checkpoint (no training left): not a difference.
    notes = [
        f"metrics row {k} (Trainer end-of-training) not re-logged" for k in missing if k[1] == "end"
    ]
    diffs += [f"metrics row {k} missing after the soak" for k in sorted(missing) if k[1] != "end"]

    s_ref, s_soak = read_run(ref)["summary"], read_run(soak)["summary"]
    n_ref, n_soak = _numbers(s_ref), _numbers(s_soak)
    summary_keys = 0
    for k in sorted(set(n_ref) | set(n_soak)):
        if k not in n_soak or k not in n_ref:
            diffs.append(f"summary {k} only in {'the reference' if k in n_ref else 'the soak'}")
            continue
        summary_keys += 1
        if not _close(n_ref[k], n_soak[k]):
            diffs.append(f"summary {k}: {n_ref[k]!r} vs {n_soak[k]!r}")

    tensors, max_abs = 0, 0.0
    a_files, b_files = weights_files(ref), weights_files(soak)
    if [f.name for f in a_files] != [f.name for f in b_files]:
        diffs.append(f"weight files differ: {a_files} vs {b_files}")
    for fa, fb in zip(a_files, b_files):
        wa, wb = load_file(str(fa)), load_file(str(fb))
        if set(wa) != set(wb):
            diffs.append(f"{fa.name}: tensor names differ")
        for k in set(wa) & set(wb):
            tensors += 1
            d = float((wa[k].double() - wb[k].double()).abs().max()) if wa[k].numel() else 0.0
            max_abs = max(max_abs, d)
            if not torch.equal(wa[k], wb[k]):
                diffs.append(f"weight {k} differs (max |diff| {d:.3g})")
    return {
        "metrics_rows_compared": rows,
        "metrics_rows_after_a_resume": after,
        "metrics_max_rel_diff": max_rel,
        "summary_values_compared": summary_keys,
        "tensors_compared": tensors,
        "weights_max_abs_diff": max_abs,
        "differences": diffs,
        "notes": notes,
    }


# --------------------------------------------------------------------------- the soak of one stage


def soak_stage(
    stage: str, d: dict[str, Path], kills: int, rng: random.Random, work: Path
) -> dict[str, Any]:
    import shutil

    args = stage_args(stage, d)
    steps, save_every = max_steps(args)
    base = work / stage
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    ref = attempt(stage, args, base / "ref", base / "ref.log", rng=rng)
    if ref["returncode"] != 0:
        raise SystemExit(f"{stage}: the reference run failed, see {ref['log']}")
    t_ref = ref["seconds"]
    # The training's length: from its start to the last checkpoint of the reference.
    times = ref["checkpoint_times"] or [t_ref]
    t_train = max(times[-1] - (ref["training_started"] or 0.0), 0.1)
    print(
        f"[soak] {stage}: reference {t_ref:.1f}s, training {t_train:.1f}s"
        f" ({len(times)} checkpoints written)",
        flush=True,
    )

    # The kill kinds: a third inside checkpoint writes, the rest at random moments (shuffled),
    # then one in the final save (last, once the training is through).
    n_ckpt = max(1, round(kills / 3))
    plan = (["mid-checkpoint", "before-marker"] * kills)[:n_ckpt]
    plan += ["random"] * max(0, kills - n_ckpt - 1)
    rng.shuffle(plan)
    plan = [*plan, "final-save"][:kills]

    out = base / "soak"
    attempts: list[dict[str, Any]] = []
    problems: list[str] = []
    complete: list[str] = []
    evidence_total = {"partial_checkpoint_dirs": 0, "temporary_dirs": 0, "weights_in_output": 0}
    done = False
    i = 0
    while not done:
        kind = plan[i] if i < len(plan) else None
        newest = int(complete[-1].rsplit("-", 1)[-1]) if complete else 0
        remaining_saves = (steps - newest) // save_every
        hook, kill_at, kill_in_training = "", None, None
        if kind in ("mid-checkpoint", "before-marker") and remaining_saves == 0:
            kind = "final-save"  # nothing left to checkpoint: kill the final save instead
        if kind in ("mid-checkpoint", "before-marker"):
            # the 2nd save of this attempt (the 1st completes: progress) or the 1st (none)
            n = 2 if remaining_saves >= 2 and rng.random() < 0.7 else 1
            hook = f"{'mid' if kind == 'mid-checkpoint' else 'premark'}:{n}"
        elif kind == "final-save":
            hook = f"final:{rng.randint(1, 3)}"
        elif kind == "random":
            # Mostly within the training, early enough that one attempt gets through about
            # 1/kills of it (the kills spread over the whole run); else during the start-up.
            left = max(remaining_saves / max(steps // save_every, 1), 0.05)
            if rng.random() < 0.7 or not ref["training_started"]:
                kill_in_training = rng.uniform(0, min(left, 2 / kills) * t_train)
            else:
                kill_at = rng.uniform(0.3, ref["training_started"])
            hook = f"final:{rng.randint(1, 3)}"  # a kill drawn past the training lands here
        before = list(complete)
        res = attempt(
            stage,
            args,
            out,
            base / f"attempt{i}.log",
            hook=hook,
            kill_at=kill_at,
            kill_in_training=kill_in_training,
            resume=i > 0,
            rng=rng,
        )
        res.update(attempt=i, planned=kind or "none")
        m = out / "metrics.jsonl"
        res["metrics_lines"] = m.read_bytes().count(b"\n") if m.is_file() else 0
        # The resume line must name the newest complete checkpoint left by the last kill.
        named = res["resumed_from"]
        if i > 0 and (named or res["started_fresh"]):  # (a kill may come before the line)
            expect = before[-1] if before else None
            res["resume_checked"] = True
            if expect and named != [expect]:
                problems.append(f"attempt {i}: resumed from {named}, expected {expect}")
            if not expect and (named or not res["started_fresh"]):
                problems.append(f"attempt {i}: resumed from {named} with no complete checkpoint")
        if res["killed"]:
            bad, complete, evidence = check_state(out)
            res["evidence"] = evidence
            res["complete_checkpoints"] = [Path(c).name for c in complete]
            problems += [f"after kill {i} ({res['where']}): {b}" for b in bad]
            for k, v in evidence.items():
                evidence_total[k] += v
        elif res["returncode"] != 0:
            problems.append(f"attempt {i} failed with code {res['returncode']}: {res['log']}")
            done = True
        else:
            done = True
            if kind is not None:
                res["note"] = "finished before the planned kill"
        attempts.append(res)
        print(
            f"[soak] {stage} attempt {i}: "
            + (f"killed ({res['where']})" if res["killed"] else f"exit {res['returncode']}")
            + f" after {res['seconds']:.1f}s; resumed from"
            f" {[Path(p).name for p in res['resumed_from']] or 'nothing'}",
            flush=True,
        )
        i += 1
        if i > kills + 5 and not done:
            problems.append("the run did not finish after the planned kills")
            break
    survived = sum(a["killed"] for a in attempts)
    checked = sum(bool(a.get("resume_checked")) for a in attempts)
    spans = [
        (
            a["metrics_lines"],
            int(a["resumed_from"][0].rsplit("-", 1)[-1]) if a["resumed_from"] else None,
        )
        for a in attempts
    ]
    result = {
        "stage": stage,
        "args": args,
        "reference_seconds": t_ref,
        "kills_survived": survived,
        "kills_by_kind": {
            k: sum(1 for a in attempts if a["killed"] and a["planned"] == k) for k in KINDS
        },
        "resume_lines_checked": checked,
        "attempts": attempts,
        "partial_write_evidence": evidence_total,
        "problems": problems,
    }
    if done and not problems:
        result.update(compare(base / "ref", out, spans))
    else:
        result["differences"] = ["not compared: the soak did not finish cleanly"]
    result["ok"] = not problems and not result["differences"] and survived >= kills
    print(
        f"[soak] {stage}: {survived} kills survived, {len(result['differences'])} differences,"
        f" {len(problems)} problems",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------- report


def write_report(results: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({**meta, "stages": results}, indent=2) + "\n")
    lines = [
        "# Kill-anywhere resume soak",
        "",
        f"`{meta['command']}` ({meta['date']}, {meta['seconds']:.0f} s, fp32 CPU, seed"
        f" {meta['seed']}). Each stage: an uninterrupted reference, then one run SIGKILLed at"
        " random moments and inside checkpoint writes, restarted with `resume=true` each time"
        " until it finished. Compared: every metrics row of every attempt (rel. tol."
        f" {TOL:g}; timing figures and the Trainer's session-average `train_loss` left out),"
        " the final summary (final evaluation) and every weight tensor (exact).",
        "",
        "| stage | kills survived | random / mid-checkpoint / before-marker / final-save"
        " | attempts (resume lines checked) | metrics rows compared (logged after a resume)"
        " | summary values"
        " | tensors (max abs diff) | half-written writes seen and not taken | problems"
        " | differences |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        k = r["kills_by_kind"]
        e = r["partial_write_evidence"]
        lines.append(
            f"| {r['stage']} | {r['kills_survived']} | {k['random']} / {k['mid-checkpoint']} /"
            f" {k['before-marker']} / {k['final-save']} | {len(r['attempts'])}"
            f" ({r['resume_lines_checked']})"
            f" | {r.get('metrics_rows_compared', '-')}"
            f" ({r.get('metrics_rows_after_a_resume', '-')})"
            f" | {r.get('summary_values_compared', '-')}"
            f" | {r.get('tensors_compared', '-')} ({r.get('weights_max_abs_diff', '-')})"
            f" | {e['partial_checkpoint_dirs']} partial checkpoints, {e['temporary_dirs']} temp"
            f" dirs, {e['weights_in_output']} weights before completion"
            f" | {len(r['problems'])} | {len(r['differences'])} |"
        )
    lines += ["", "Problems and differences (none means the list is empty):", ""]
    for r in results:
        for p in r["problems"] + r["differences"]:
            lines.append(f"- {r['stage']}: {p}")
    lines.append("")
    Path(f"{out}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        rest = argv[1:]
        return child(rest[1:] if rest[:1] == ["--"] else rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages")
    p.add_argument("--kills", type=int, default=10, help="kills per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
    p.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "soak"), help="<out>.json/.md"
    )
    a = p.parse_args(argv)
    import datetime
    import tempfile

    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stages {bad}; choose from {','.join(STAGES)}")
    work = Path(a.work or tempfile.mkdtemp(prefix="hanlm-soak-"))
    t0 = time.time()
    rng = random.Random(a.seed)
    d = prepare(work / "data")
    results = [soak_stage(s, d, a.kills, rng, work) for s in stages]
    meta = {
        "command": "python scripts/soak.py " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.time() - t0,
        "seed": a.seed,
        "kills_per_stage": a.kills,
        "work": str(work),
    }
    write_report(results, Path(a.out), meta)
    ok = all(r["ok"] for r in results)
    print(f"[soak] {'all equal' if ok else 'FAILED'}; report in {a.out}.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
