"""Memory per GPU and training time at scale, computed (not measured): the tables of
docs/scaling.md, reproducible with

    python benchmarks/scaling.py                 # markdown tables
    python benchmarks/scaling.py --json out.json # and the figures as JSON

Memory (ZeRO paper, Rajbhandari et al. 2020, section 3): mixed-precision Adam keeps, per
parameter, 2 bytes of bf16/fp16 weights + 2 of gradients + 12 of fp32 optimiser state (master
weights, momentum, variance) = 16 bytes. Over N_d data-parallel GPUs:

    full (DDP)  16 Ψ                      ZeRO-2  2 Ψ + 14 Ψ / N_d
    ZeRO-3      16 Ψ / N_d                LoRA    2 Ψ + 16 Ψ_lora
    QLoRA       0.516 Ψ + 16 Ψ_lora  (NF4 with double quantisation: 4.127 bits per weight,
                                      Dettmers et al. 2023)

Activations come on top and depend on batch, sequence and checkpointing; they are not in these
figures. Time: 6 N D training FLOPs (forward + backward, Kaplan et al. 2020) at an MFU measured
by benchmarks/pretrain_throughput.py.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Arch:
    """A LLaMA-style decoder: what the parameter count needs."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int  # key/value width (grouped-query attention: fewer than hidden)
    vocab: int
    tied: bool = False


# Public configs: Qwen2-1.5B, LLaMA-2-7B/13B/70B (Chinese-LLaMA-2 is LLaMA-2 with 55,296 tokens).
ARCHS = [
    Arch("1.5B", 1536, 28, 8960, 256, 151936, tied=True),
    Arch("7B", 4096, 32, 11008, 4096, 32000),
    Arch("13B", 5120, 40, 13824, 5120, 32000),
    Arch("70B", 8192, 80, 28672, 1024, 32000),
]


def linears(a: Arch) -> list[tuple[int, int]]:
    """(in, out) of one layer's q, k, v, o, gate, up and down projections."""
    h, kv, i = a.hidden, a.kv_dim, a.intermediate
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def params(a: Arch) -> int:
    per_layer = sum(x * y for x, y in linears(a)) + 2 * a.hidden  # + two RMSNorms
    embed = a.vocab * a.hidden * (1 if a.tied else 2)
    return a.layers * per_layer + embed + a.hidden


def lora_params(a: Arch, r: int = 8) -> int:
    """LoRA of rank r on every linear of every layer (hanlm's default targets)."""
    return a.layers * sum(r * (x + y) for x, y in linears(a))


def memory_bytes(method: str, n: int, gpus: int = 1, trainable: int = 0) -> float:
    """Bytes per GPU of weights, gradients and optimiser state (no activations)."""
    if method == "full":
        return 16 * n
    if method == "zero2":
        return 2 * n + 14 * n / gpus
    if method == "zero3":
        return 16 * n / gpus
    if method == "lora":
        return 2 * n + 16 * trainable
    if method == "qlora":
        return 4.127 / 8 * n + 16 * trainable
    raise ValueError(f"unknown method {method!r}")


def train_seconds(n: int, tokens: float, gpus: int, mfu: float, peak_flops: float) -> float:
    return 6 * n * tokens / (gpus * peak_flops * mfu)


def measured_mfu(path: Path = RESULTS / "pretrain_throughput_h100.json") -> dict:
    """The best MFU of the largest preset measured (the 1b preset: the closest to 7B)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    ok = [r for r in data["results"] if r.get("status") == "ok"]
    biggest = max(r["params"] for r in ok)
    best = max((r for r in ok if r["params"] == biggest), key=lambda r: r["mfu"])
    return {
        "mfu": best["mfu"],
        "preset": best["preset"],
        "params": best["params"],
        "batch_size": best["batch_size"],
        "tokens_per_s": best["tokens_per_s"],
        "peak_flops": data["peak_tflops_for_mfu"] * 1e12,
        "device": data["device_name"],
        "source": str(path.relative_to(RESULTS.parent.parent)),
    }


# The Chinese-LLaMA-2 recipe (Cui et al. 2023; Chinese-LLaMA-Alpaca-2): vocabulary expansion
# (tokenizer merge + embedding resize: minutes on a CPU, not counted), continued pretraining,
# then instruction tuning. Token counts are this page's assumptions, stated with the tables.
PRETRAIN_TOKENS = 120e9
SFT_TOKENS = 5e6 * 512 * 2  # ~5M instructions x ~512 tokens x 2 epochs


def tables(gpu_counts: tuple[int, ...] = (8, 64, 512), mem_gpus: int = 8) -> dict:
    m = measured_mfu()
    rows = []
    for a in ARCHS:
        n, lora = params(a), lora_params(a)
        mem = {
            "full": memory_bytes("full", n),
            "lora": memory_bytes("lora", n, trainable=lora),
            "qlora": memory_bytes("qlora", n, trainable=lora),
            f"zero2_{mem_gpus}": memory_bytes("zero2", n, mem_gpus),
            f"zero3_{mem_gpus}": memory_bytes("zero3", n, mem_gpus),
            "zero3_64": memory_bytes("zero3", n, 64),
        }
        days = {
            g: (
                train_seconds(n, PRETRAIN_TOKENS, g, m["mfu"], m["peak_flops"]) / 86400,
                train_seconds(n, SFT_TOKENS, g, m["mfu"], m["peak_flops"]) / 86400,
            )
            for g in gpu_counts
        }
        rows.append(
            {
                "arch": asdict(a),
                "params": n,
                "lora_params_r8": lora,
                "memory_gib": {k: v / GIB for k, v in mem.items()},
                "days": {str(g): {"pretrain": p, "sft": s} for g, (p, s) in days.items()},
            }
        )
    return {
        "mfu": m,
        "pretrain_tokens": PRETRAIN_TOKENS,
        "sft_tokens": SFT_TOKENS,
        "memory_gpus": mem_gpus,
        "rows": rows,
    }


def markdown(t: dict) -> str:
    g = t["memory_gpus"]
    out = [
        f"| model | params | full (DDP) | LoRA r=8 | QLoRA r=8 | ZeRO-2 ({g} GPUs) |"
        f" ZeRO-3 ({g} GPUs) | ZeRO-3 (64 GPUs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in t["rows"]:
        mem = r["memory_gib"]
        cells = [mem[k] for k in ("full", "lora", "qlora", f"zero2_{g}", f"zero3_{g}", "zero3_64")]
        out.append(
            f"| {r['arch']['name']} | {r['params'] / 1e9:.2f}B | "
            + " | ".join(f"{c:,.1f}" for c in cells)
            + " |"
        )
    gpus = list(t["rows"][0]["days"])
    out += [
        "",
        "| model | " + " | ".join(f"{x} GPUs: pretrain / SFT" for x in gpus) + " |",
        "|---|" + "---|" * len(gpus),
    ]
    for r in t["rows"]:
        cells = [
            _duration(r["days"][x]["pretrain"]) + " / " + _duration(r["days"][x]["sft"])
            for x in gpus
        ]
        out.append(f"| {r['arch']['name']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _duration(days: float) -> str:
    return f"{days:,.1f} d" if days >= 1 else f"{days * 24:.1f} h"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    t = tables()
    m = t["mfu"]
    print(
        f"MFU {m['mfu']:.1%}: preset {m['preset']} ({m['params'] / 1e9:.2f}B params, batch"
        f" {m['batch_size']}) on {m['device']}, from {m['source']}; peak"
        f" {m['peak_flops'] / 1e12:.1f} TFLOP/s"
    )
    print(markdown(t))
    if args.json:
        Path(args.json).write_text(json.dumps(t, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
