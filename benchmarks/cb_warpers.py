"""What per-request sampling costs in transformers' continuous batching: the per-request
temperature, top-k and top-p warpers that `hanlm serve` starts the manager with
(`per_request_processors=True`), plus sampling, per decode step, against a greedy argmax and
against one forward pass of one new token for the same batch (no KV cache: an upper bound of a
decode step's model time).

    python benchmarks/cb_warpers.py MODEL_DIR... [--batches 1 8 32]

The warper classes are transformers' own (`generation.continuous_batching.cb_logits_processors`),
called as the manager calls them; this measures the library, so it is a benchmark, not product
code.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def per_call_ms(fn: Any, n: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.continuous_batching import cb_logits_processors as cb
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    head = "| model | vocab | batch | warpers + sampling ms/step | argmax ms | forward ms | ratio |"
    print(head + "\n|---|---|---|---|---|---|---|")
    for path in args.models:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        vocab = model.config.vocab_size
        warpers = (
            cb.ContinuousBatchingTemperatureLogitsWarper(TemperatureLogitsWarper(0.5)),
            cb.ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(vocab)),
            cb.ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(0.99)),
        )
        for b in args.batches:
            warp_ms, argmax_ms, fwd_ms = step_costs(model, warpers, vocab, b)
            print(
                f"| {path} | {vocab:,} | {b} | {warp_ms:.2f} | {argmax_ms:.3f} | {fwd_ms:.2f} |"
                f" {warp_ms / fwd_ms:.2f} |"
            )


def step_costs(model: Any, warpers: tuple[Any, Any, Any], vocab: int, b: int) -> list[float]:
    """ms per decode step: the warpers + sampling for a batch of greedy requests as hanlm sends
    them (temperature 1, top-k 1, top-p 1), a plain argmax, one forward of one token each."""
    import torch

    temp, top_k, top_p = warpers
    scores = torch.randn(b, vocab)
    args = (torch.ones(b).view(torch.int32), torch.ones(b, dtype=torch.int32))
    p_arg = torch.ones(b).view(torch.int32)

    def warp() -> Any:
        out = top_p(top_k(temp(scores, args[0]), args[1]), p_arg)
        return torch.multinomial(out.softmax(-1), 1)

    ids = torch.randint(0, vocab, (b, 1))
    with torch.no_grad():
        return [
            per_call_ms(warp),
            per_call_ms(lambda: scores.argmax(-1)),
            per_call_ms(lambda: model(ids), n=5),
        ]


if __name__ == "__main__":
    main()
