"""`hanlm data prepare`: write the records a stage would train on, with every count recorded.

Useful to inspect exactly what cleaning, dedup, mixing and splitting did, and to freeze a mixed
dataset once for several runs. Output: `train.jsonl`, `valid.jsonl` (canonical records) and
`hanlm.json` whose `data` section holds the counts (bad, too short, duplicates, per path).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hanlm.config import DataConfig, OutputConfig, opt
from hanlm.data.loader import load
from hanlm.runs import Run, atomic_write_text


@dataclass
class DataPrepareConfig(OutputConfig):
    data: DataConfig = opt(DataConfig, "the data to read")
    kind: Literal["auto", "text", "chat", "preference"] = opt(
        "auto", "the record kind required (auto accepts any single kind)"
    )


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def run(cfg: DataPrepareConfig) -> Path:
    with Run("data prepare", cfg, seed=cfg.data.seed) as run_:
        loaded = load(cfg.data, kind=None if cfg.kind == "auto" else cfg.kind)
        atomic_write_text(run_.dir / "train.jsonl", _jsonl(loaded.train))
        if loaded.valid:
            atomic_write_text(run_.dir / "valid.jsonl", _jsonl(loaded.valid))
        run_.set("data", loaded.stats.as_dict())
        run_.finish({"kind": loaded.kind, "train": len(loaded.train), "valid": len(loaded.valid)})
        print(loaded.stats.summary())
        if loaded.stats.bad:
            print(f"skipped {loaded.stats.bad} bad record(s); the first ones:")
            for msg in loaded.stats.bad_records[:10]:
                print(f"  {msg}")
    return run_.dir
