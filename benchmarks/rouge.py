"""ROUGE-L for the self-instruct similarity filter: time per candidate against a pool of kept
instructions, for hanlm's bit-parallel numpy pool, the same LCS in pure Python, a plain
dynamic-programming LCS and `rouge-score` (on space-joined characters, if installed); and a
check that all agree.

    python benchmarks/rouge.py [--pool 50000] [--out DIR]

Writes rouge.json and rouge.md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from hanlm.datagen.rouge import RougePool, lcs_length, rouge_l, tokens

CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下"
    "过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都"
)


def _dp(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=50_000)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rng = random.Random(0)

    def text(lo: int = 8, hi: int = 40) -> str:
        return "".join(rng.choice(CHARS) for _ in range(rng.randint(lo, hi)))

    kept = [text() for _ in range(args.pool)]
    queries = [text() for _ in range(20)]
    t = time.perf_counter()
    pool = RougePool(kept)
    pool.scores("预热")
    results: dict[str, float] = {"build_pool_s": time.perf_counter() - t}

    def per_candidate(fn, qs, sub: int) -> float:
        t = time.perf_counter()
        for q in qs:
            fn(q, kept[:sub])
        return (time.perf_counter() - t) / len(qs) * args.pool / sub * 1000

    results["numpy_bitparallel_ms"] = per_candidate(lambda q, _: pool.scores(q), queries, args.pool)
    long_q = [text(100, 100) for _ in range(3)]
    results["numpy_bitparallel_100_tokens_ms"] = per_candidate(
        lambda q, _: pool.scores(q), long_q, args.pool
    )
    results["python_bitparallel_ms"] = per_candidate(
        lambda q, ks: [lcs_length(tokens(q), tokens(k)) for k in ks], queries[:3], 10_000
    )
    results["python_dp_ms"] = per_candidate(
        lambda q, ks: [_dp(tokens(q), tokens(k)) for k in ks], queries[:2], 2_000
    )
    try:
        from rouge_score import rouge_scorer

        sc = rouge_scorer.RougeScorer(["rougeL"])
        results["rouge_score_ms"] = per_candidate(
            lambda q, ks: [sc.score(" ".join(q), " ".join(k)) for k in ks], queries[:2], 5_000
        )
    except ImportError:
        pass
    ref = np.array([rouge_l(queries[0], k) for k in kept[:2000]])
    agree = bool(np.allclose(RougePool(kept[:2000]).scores(queries[0]), ref))
    report = {"pool": args.pool, "agree": agree, **{k: round(v, 2) for k, v in results.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rouge.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [f"ROUGE-L per candidate against {args.pool:,} kept instructions (8-40 chars)", ""]
    lines += ["| implementation | ms per candidate |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results.items() if k.endswith("_ms")]
    lines += ["", f"pool built in {results['build_pool_s']:.2f} s; all agree: {agree}"]
    (out / "rouge.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
