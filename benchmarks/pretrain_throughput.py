#!/usr/bin/env python3
"""Pretraining throughput of hanlm's LLaMA-style size presets.

For each preset, builds a freshly initialised model with `hanlm.modeling.build_model`, feeds it
random token ids and times full training steps: forward, loss, backward, gradient clipping and
an AdamW step, the same work `hanlm pretrain` does per optimiser step. Reports tokens/s, step
time, an estimate of model TFLOP/s and peak memory, prints a table and writes JSON.

Precision: on CUDA the default is `bf16-autocast`, what `hanlm pretrain` (the HF Trainer with
bf16=True) does: fp32 master weights, gradients and AdamW state, matrix products in bf16 under
torch.autocast, fused AdamW. `bf16` keeps the weights and AdamW state in bf16 instead (less
memory, not what hanlm trains with). On CPU the only choice is fp32.

Each preset runs in its own child process (unless --no-isolate), so a preset that runs out of
memory or past --timeout is recorded as such and the next one starts on a clean device; the JSON
is rewritten after every preset, so a run killed part-way keeps what it measured.

Examples:
    python benchmarks/pretrain_throughput.py --presets test tiny --steps 2 --out /tmp/tp.json
    python benchmarks/pretrain_throughput.py --presets tiny small base 1b --block-size 1024 \\
        --batch-size 64 32 16 8 --timeout 90 --out throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DTYPES = ("auto", "fp32", "bf16-autocast", "bf16")
H100_BF16_DENSE_TFLOPS = 989.4  # H100 SXM, dense bf16 tensor-core peak


def _import_hanlm() -> Any:
    """`hanlm.modeling`, from the installed package or else from this checkout's src/."""
    try:
        import hanlm.modeling as modeling
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        import hanlm.modeling as modeling
    return modeling


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    preset_names = ", ".join(_import_hanlm().PRESETS)
    p = argparse.ArgumentParser(
        prog="pretrain_throughput.py",
        description=(
            "Measure pretraining throughput (tokens/s of forward+backward+AdamW steps) and peak "
            "memory of hanlm's LLaMA-style presets on random tokens. CUDA when available "
            "(bf16 autocast by default), else CPU fp32."
        ),
        epilog=f"presets: {preset_names}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--presets", nargs="+", default=["test", "tiny"], help="presets to measure")
    p.add_argument(
        "--batch-size",
        nargs="+",
        type=int,
        default=[8],
        help="sequences per step: one value for every preset, or one per preset, in order",
    )
    p.add_argument("--block-size", type=int, default=256, help="tokens per sequence")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size of the model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16-autocast on CUDA")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    p.add_argument(
        "--liger",
        action="store_true",
        help="Liger's kernels (RMSNorm, RoPE, SwiGLU, LM head fused with the cross-entropy), as"
        " train.liger=true gives hanlm pretrain; needs a CUDA GPU and liger-kernel",
    )
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients; 0: off")
    p.add_argument(
        "--fused-adamw",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fused AdamW on CUDA (what the HF Trainer uses by default)",
    )
    p.add_argument(
        "--timeout", type=float, default=0, help="seconds per preset (isolated runs); 0: none"
    )
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each preset in its own child process",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help=f"device peak for MFU; 0: {H100_BF16_DENSE_TFLOPS} on an H100 in bf16, else none",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and tokens")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(args.batch_size) not in (1, len(args.presets)):
        p.error(f"--batch-size: give 1 value or {len(args.presets)} (one per preset)")
    unknown = [name for name in args.presets if name not in _import_hanlm().PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; choose from {preset_names}")
    if args.steps < 1 or args.warmup < 0 or args.block_size < 1 or args.vocab_size < 2:
        p.error("--steps must be >= 1, --warmup >= 0, --block-size >= 1, --vocab-size >= 2")
    return args


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda:0" if name == "cuda" else name  # set_device() wants an index


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "bf16-autocast" if device.startswith("cuda") else "fp32"
    if not device.startswith("cuda") and name != "fp32":
        raise SystemExit(f"--dtype {name} needs CUDA; on {device} use fp32")
    return name


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str, dtype: str) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "device": device,
        "device_name": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": dtype,
        "dtype_note": {
            "bf16-autocast": "fp32 weights/grads/AdamW state, bf16 matmuls (torch.autocast)",
            "bf16": "bf16 weights/grads/AdamW state, no autocast",
            "fp32": "fp32 throughout",
        }[dtype],
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(
            device_name=torch.cuda.get_device_name(torch.device(device)),
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 2),
            multiprocessors=props.multi_processor_count,
        )
    return env


def train_flops_per_token(params: int, layers: int, hidden: int, block_size: int) -> float:
    """PaLM's estimate: 6 N (weights, forward and backward) + 12 L d T (attention)."""
    return 6.0 * params + 12.0 * layers * hidden * block_size


def bench_one(
    preset: str, batch_size: int, args: argparse.Namespace, device: str, dtype: str
) -> dict[str, Any]:
    """Time `args.steps` training steps of one preset, in this process."""
    import torch

    modeling = _import_hanlm()
    torch.manual_seed(args.seed)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {"preset": preset, "batch_size": batch_size}
    result.update(modeling.PRESETS[preset])
    if args.liger:  # Liger patches transformers' Llama classes: before the model exists
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    result["liger"] = args.liger
    t0 = time.perf_counter()
    with torch.device(device):  # initialise the weights on the device itself (fast for 1b)
        model = modeling.build_model(
            preset, args.vocab_size, max_positions=args.block_size, attn_implementation=args.attn
        )
    if dtype == "bf16":
        model.to(torch.bfloat16)
    model.train()
    _, params = modeling.count_parameters(model)
    result.update(
        params=params,
        attn_implementation=getattr(model.config, "_attn_implementation", args.attn),
        build_s=round(time.perf_counter() - t0, 2),
    )
    opt_kw: dict[str, Any] = {"lr": args.lr, "betas": (0.9, 0.95), "weight_decay": 0.1}
    if cuda and args.fused_adamw:
        opt_kw["fused"] = True
    optimizer = torch.optim.AdamW(model.parameters(), **opt_kw)
    result["optimizer"] = "AdamW fused" if opt_kw.get("fused") else "AdamW foreach/default"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    tokens = torch.randint(
        0, args.vocab_size, (batch_size, args.block_size), device=device, generator=gen
    )
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if dtype == "bf16-autocast"
        else contextlib.nullcontext()
    )

    def step() -> float:
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # also a sync point; cheap next to a step

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    first_loss = step()
    for _ in range(max(args.warmup - 1, 0)):
        step()
    sync()
    result["warmup_s"] = round(time.perf_counter() - t0, 2)
    step_times: list[float] = []
    last_loss = first_loss
    start = time.perf_counter()
    for _ in range(args.steps):
        s = time.perf_counter()
        last_loss = step()
        sync()
        step_times.append(time.perf_counter() - s)
    elapsed = time.perf_counter() - start
    tokens_per_step = batch_size * args.block_size
    tokens_per_s = tokens_per_step * args.steps / elapsed
    flops = train_flops_per_token(
        params, result["num_hidden_layers"], result["hidden_size"], args.block_size
    )
    result.update(
        status="ok",
        tokens_per_step=tokens_per_step,
        step_ms=round(1000 * elapsed / args.steps, 2),
        step_ms_min=round(1000 * min(step_times), 2),
        step_ms_max=round(1000 * max(step_times), 2),
        tokens_per_s=round(tokens_per_s, 1),
        model_tflops=round(flops * tokens_per_s / 1e12, 2),
        first_loss=round(first_loss, 4),
        last_loss=round(last_loss, 4),
        loss_finite=math.isfinite(last_loss),
    )
    if cuda:
        result.update(
            peak_gpu_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
            peak_gpu_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
        )
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return result


def bench_guarded(
    preset: str, batch_size: int, args: argparse.Namespace, device: str, dtype: str
) -> dict[str, Any]:
    """`bench_one`, with running out of memory or any other error recorded, not raised."""
    import torch

    base = {"preset": preset, "batch_size": batch_size}
    try:
        return bench_one(preset, batch_size, args, device, dtype)
    except torch.OutOfMemoryError as e:
        return {**base, "status": "oom", "error": str(e).splitlines()[0][:300]}
    except Exception as e:  # record, so the remaining presets still run
        return {**base, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def child_command(args: argparse.Namespace, preset: str, batch_size: int, out: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--presets", preset]
    cmd += ["--batch-size", str(batch_size), "--block-size", str(args.block_size)]
    cmd += ["--vocab-size", str(args.vocab_size), "--warmup", str(args.warmup)]
    cmd += ["--steps", str(args.steps), "--dtype", args.dtype, "--device", args.device]
    cmd += ["--attn", args.attn, "--lr", str(args.lr), "--max-grad-norm", str(args.max_grad_norm)]
    cmd += ["--fused-adamw" if args.fused_adamw else "--no-fused-adamw"]
    cmd += ["--liger"] if args.liger else []
    cmd += ["--seed", str(args.seed), "--no-isolate", "--child-out", str(out)]
    return cmd


def bench_isolated(preset: str, batch_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one preset in a child process, with `args.timeout` seconds to finish."""
    base = {"preset": preset, "batch_size": batch_size}
    with tempfile.TemporaryDirectory(prefix="throughput.") as tmp:
        out = Path(tmp) / "result.json"
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                child_command(args, preset, batch_size, out),
                timeout=args.timeout if args.timeout > 0 else None,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {**base, "status": "timeout", "error": f"no result after {args.timeout:g} s"}
        wall = round(time.perf_counter() - started, 2)
        if out.is_file():
            return {**json.loads(out.read_text()), "wall_s": wall}
        return {**base, "status": "crashed", "error": f"child exited {proc.returncode}"}


def mfu(result: dict[str, Any], peak_tflops: float) -> float | None:
    if not peak_tflops or result.get("status") != "ok":
        return None
    return round(result["model_tflops"] / peak_tflops, 4)


def format_table(results: list[dict[str, Any]], cuda: bool) -> str:
    mem_head = "peak GPU GiB" if cuda else "peak RSS GiB"
    head = ["preset", "params", "batch", "tok/step", "step ms", "tokens/s", "TFLOP/s", "MFU"]
    rows = [[*head, mem_head, "status"]]
    for r in results:
        if r.get("status") != "ok":
            blanks = [""] * (len(head) - 2)
            rows.append([r["preset"], "", str(r["batch_size"]), *blanks, r["status"]])
            continue
        mem = r.get("peak_gpu_mem_gib") if cuda else r.get("peak_rss_gib")
        rows.append(
            [
                r["preset"],
                f"{r['params'] / 1e6:.1f}M",
                str(r["batch_size"]),
                str(r["tokens_per_step"]),
                f"{r['step_ms']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['model_tflops']:.1f}",
                "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
                f"{mem:.2f}",
                "ok",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.startswith("cuda")
    batches = args.batch_size * len(args.presets) if len(args.batch_size) == 1 else args.batch_size

    if args.child_out is not None:  # one preset, in this (child) process
        result = bench_guarded(args.presets[0], batches[0], args, device, dtype)
        write_json(args.child_out, result)
        return 0 if result["status"] == "ok" else 1

    env = environment(device, dtype)
    peak = args.peak_tflops
    if not peak and cuda and "H100" in env["device_name"] and dtype != "fp32":
        peak = H100_BF16_DENSE_TFLOPS
    report: dict[str, Any] = {
        **env,
        "block_size": args.block_size,
        "vocab_size": args.vocab_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "max_grad_norm": args.max_grad_norm,
        "isolated": args.isolate,
        "peak_tflops_for_mfu": peak or None,
        "flops_formula": "6*params + 12*layers*hidden*block_size per token (PaLM)",
        "memory_note": (
            "peak_gpu_mem_gib: torch.cuda.max_memory_allocated"
            if cuda
            else "peak_rss_gib: peak resident memory of the process that ran the preset"
        ),
        "results": [],
    }
    print(
        f"{env['device_name']} ({device}), torch {env['torch']}, transformers "
        f"{env['transformers']}, {dtype}: {env['dtype_note']}",
        flush=True,
    )
    for preset, batch in zip(args.presets, batches):
        print(f"--- {preset}: batch {batch} x {args.block_size} tokens", flush=True)
        if args.isolate:
            result = bench_isolated(preset, batch, args)
        else:
            result = bench_guarded(preset, batch, args, device, dtype)
        result["mfu"] = mfu(result, peak)
        summary = {k: result.get(k) for k in ("status", "step_ms", "tokens_per_s", "error")}
        print(f"    {json.dumps({k: v for k, v in summary.items() if v is not None})}", flush=True)
        report["results"].append(result)
        if args.out:
            write_json(args.out, report)
    print()
    print(format_table(report["results"], cuda))
    if args.out:
        print(f"\nwrote {args.out}")
    return 0 if all(r.get("status") == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
