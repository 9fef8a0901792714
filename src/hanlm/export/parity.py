"""The measurements `hanlm export` judges a written model by: logits, greedy answers and token
ids against the fp32 source, and the per-type limits they are judged with."""

from __future__ import annotations

from typing import Any

# Largest logit error allowed, as a fraction of the largest reference logit. Exact types must
# also give the same greedy answers; the others are judged on the logits (a flipped near-tie
# in a greedy answer is recorded, not failed). bf16 keeps 8 bits of mantissa: SmolLM2-135M's 30
# layers end 6e-2 from fp32 (top-1 96.5%), so its limit is 0.1. The largest errors llama.cpp
# gave on benchmarks/runtime_parity.py's models: f16 6.5e-4, q8_0 2.3e-2, q4_k_m 6.2e-2.
TOLERANCE = {
    "fp32": 1e-5,
    "f32": 1e-5,
    "fp16": 1e-2,
    "f16": 1e-2,
    "bf16": 1e-1,
    "q8_0": 5e-2,
    "q4_k_m": 2e-1,
}
EXACT = ("fp32", "f32", "prune")


def forward_logits(model: Any, seqs: list[list[int]]) -> list[Any]:
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(torch.tensor([s], device=device)).logits[0].float().cpu() for s in seqs]


def greedy_answers(
    model: Any, prompts: list[list[int]], n: int, stops: list[int]
) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding to differ between models)."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    out = []
    for ids in tqdm(prompts, desc="greedy answers", leave=False):
        with torch.no_grad():
            gen = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=n,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stops or None,
                pad_token_id=stops[0] if stops else 0,
            )
        row = gen[0, len(ids) :].tolist()
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        out.append(row if cut is None else row[:cut])
    return out


def compare(
    ref: list[Any],
    new: list[Any],
    ref_answers: list[list[int]] | None = None,
    answers: list[list[int]] | None = None,
    cols: Any = None,
) -> dict[str, Any]:
    """Max and relative logit error, top-1 agreement, and greedy answer agreement."""
    worst = scale = 0.0
    agree = total = 0
    for r, x in zip(ref, new):
        r = r[:, cols] if cols is not None else r
        worst = max(worst, float((r - x).abs().max()))
        scale = max(scale, float(r.abs().max()))
        agree += int((r.argmax(-1) == x.argmax(-1)).sum())
        total += r.shape[0]
    out: dict[str, Any] = {
        "max_abs_logit_diff": worst,
        "rel_logit_diff": worst / max(scale, 1e-12),
        "top1_agreement": agree / max(total, 1),
    }
    if ref_answers is not None and answers is not None:
        same = sum(a == b for a, b in zip(ref_answers, answers))
        prefix = []
        for a, b in zip(ref_answers, answers):
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            prefix.append(k / max(len(a), len(b), 1))
        out["greedy_identical"] = f"{same}/{len(answers)}"
        out["greedy_equal"] = same == len(answers)
        out["greedy_prefix_agreement"] = sum(prefix) / max(len(prefix), 1)
    return out


def judge(name: str, kind: str, result: dict[str, Any], tol: float) -> list[str]:
    """Failures of one check (empty when it passes); `kind` picks the tolerance."""
    limit = tol or TOLERANCE.get(kind, 1e-5)
    result["tolerance"] = limit
    bad = []
    if result["rel_logit_diff"] > limit:
        bad.append(
            f"{name}: logits differ by {result['rel_logit_diff']:.2e} of the largest logit"
            f" (limit {limit:.0e})"
        )
    if "greedy_unexplained" in result:  # judged by llama.cpp: near ties are allowed
        if result["greedy_unexplained"]:
            bad.append(
                f"{name}: greedy answers differ beyond a near tie ("
                + "; ".join(result["greedy_unexplained"][:3])
                + ")"
            )
    elif kind in EXACT and result.get("greedy_equal") is False:
        bad.append(f"{name}: greedy answers differ ({result['greedy_identical']} identical)")
    if result.get("token_ids_equal") is False:
        bad.append(f"{name}: the tokenizer gives different ids")
    result["passed"] = not bad
    return bad


def compare_token_ids(
    src: Any, other: Any, texts: list[str], reader_space: bool = False
) -> dict[str, Any]:
    """Whether `other` tokenizes `texts` as `src` does (and decodes them back)."""
    same, differ = 0, []
    for t in texts:
        a, b = src(t)["input_ids"], other(t)["input_ids"]
        if a == b or (reader_space and b == src(" " + t)["input_ids"]):
            same += 1
        else:
            differ.append(t[:40])
    out = {"token_ids_equal": not differ, "texts_checked": len(texts), "differ": differ[:5]}
    if reader_space:
        out["note"] = (
            "transformers' GGUF reader ignores tokenizer.ggml.add_space_prefix=false and"
            " prepends '▁'; llama.cpp honours the flag. Compared as if the text began with a space"
        )
    return out
