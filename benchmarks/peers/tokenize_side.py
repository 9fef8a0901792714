#!/usr/bin/env python3
"""Corpus -> token ids, timed from the files on disk, one side per process:
`--side hanlm`: hanlm's data path (`hanlm.data.load`: format detection, NFC, cleaning,
de-duplication, mixing) and its tokenize-and-pack step, as `hanlm pretrain` runs them;
`--side datasets`: `datasets.load_dataset("json")` and `Dataset.map` with the fast tokenizer.
Writes {"seconds", "characters", "tokens"} as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", choices=["hanlm", "datasets"], required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", nargs="+", required=True, help="JSONL files with a `text` field")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import datasets
    from transformers import AutoTokenizer

    from hanlm.config import DataConfig
    from hanlm.data import load
    from hanlm.train.pretrain import _tokenize_and_pack  # the step `hanlm pretrain` runs

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    t0 = time.time()  # imports and the tokenizer load are outside the timing, for both sides
    if args.side == "hanlm":
        texts = [r["text"] for r in load(DataConfig(paths=args.data), kind="text").train]
        with tempfile.TemporaryDirectory() as cache:  # a cold cache: tokenize for real
            _, stats = _tokenize_and_pack(texts, tok, 256, 1, cache)
        chars, tokens = stats["characters"], stats["tokens"]
    else:
        ds = datasets.load_dataset("json", data_files=args.data, split="train")
        ids = ds.map(
            lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
            batched=True,
            remove_columns=ds.column_names,
        )
        chars = sum(len(t) for t in ds["text"])
        tokens = sum(len(x) for x in ids["ids"])
    seconds = time.time() - t0
    Path(args.out).write_text(
        json.dumps({"seconds": seconds, "characters": chars, "tokens": tokens})
    )


if __name__ == "__main__":
    main()
