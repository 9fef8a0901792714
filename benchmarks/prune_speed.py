"""A pruned vocabulary beside the original: parameters, bytes of weights, and batch-1 decode speed.

    python benchmarks/prune_speed.py ORIGINAL PRUNED [--repeats 5] [--new-tokens 32]

ORIGINAL is the model as fetched (e.g. .venv/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf, which
transformers dequantises to fp32), PRUNED the `hanlm export prune_vocab=...` output made from it
(e.g. runs/qwen-zh/prune). Both are loaded in fp32 and decode the same greedy 32 tokens after the
same Chinese prompt; runs alternate between the two (A B, B A, ...) so that a busy machine slows
both alike, and the median tokens per second is reported with every run's figure. The answers are
compared too: pruning keeps every token the corpus uses, so they should be the same text.

Writes benchmarks/results/prune_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hanlm.config import ModelConfig
from hanlm.modeling import count_parameters, load_model, load_tokenizer

PROMPT = [{"role": "user", "content": "请用两句话介绍一下长城。"}]
RESULTS = Path(__file__).resolve().parent / "results"


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def decode(model, tok, new_tokens: int) -> tuple[float, str]:
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1] :]
    return len(new) / seconds, tok.decode(new, skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("original")
    ap.add_argument("pruned")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    models = {}
    for name, path in (("original", args.original), ("pruned", args.pruned)):
        t0 = time.perf_counter()
        model = load_model(ModelConfig(path=path, dtype="float32")).eval()
        tok = load_tokenizer(path)
        models[name] = (model, tok, time.perf_counter() - t0)
    speeds: dict[str, list[float]] = {n: [] for n in models}
    answers: dict[str, str] = {}
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            model, tok, _ = models[name]
            tps, answers[name] = decode(model, tok, args.new_tokens)
            speeds[name].append(tps)
    rows = {}
    for name, (model, tok, load_s) in models.items():
        _, params = count_parameters(model)
        rows[name] = {
            "path": getattr(args, name),
            "vocab": len(tok),
            "embedding_rows": model.get_input_embeddings().weight.shape[0],
            "parameters": params,
            "weight_bytes_fp32": weight_bytes(model),
            "load_seconds": round(load_s, 1),
            "decode_tokens_per_s": [round(s, 2) for s in speeds[name]],
            "decode_median": round(statistics.median(speeds[name]), 2),
            "answer": answers[name],
        }
    ratio = rows["pruned"]["decode_median"] / rows["original"]["decode_median"]
    result = {
        "prompt": PROMPT[0]["content"],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "models": rows,
        "decode_ratio_pruned_over_original": round(ratio, 3),
        "same_answer": answers["pruned"] == answers["original"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_speed.json").write_text(json.dumps(result, ensure_ascii=False, indent=2))
    md = [
        "| model | vocabulary | parameters | fp32 weights | decode tokens/s (median; runs) |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        runs = ", ".join(f"{s:.1f}" for s in row["decode_tokens_per_s"])
        md.append(
            f"| {name} | {row['vocab']:,} | {row['parameters'] / 1e6:.0f}M |"
            f" {row['weight_bytes_fp32'] / 1e9:.2f} GB | {row['decode_median']:.1f} ({runs}) |"
        )
    md.append("")
    md.append(
        f"pruned ÷ original decode speed: {ratio:.2f}×; same greedy answer: {result['same_answer']}"
    )
    (RESULTS / "prune_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
