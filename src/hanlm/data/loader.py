"""Read a `DataConfig` into canonical records: detect, convert, clean, dedup, mix and split.

Two entry points: `load()` returns in-memory train/validation lists (mixing and splitting need
the whole set), and `stream()` yields records one by one for corpora larger than memory. Both
count everything they drop; the counts go into `hanlm.json` through `DataStats.as_dict()`.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from hanlm import ASSETS
from hanlm.config import DataConfig
from hanlm.data import formats, quality
from hanlm.data.sources import BadJson, DataError, Location, iter_source, resolve

MAX_BAD_KEPT = 50  # bad-record messages kept for reports; all of them are counted


def or_demo(cfg: DataConfig, name: str) -> DataConfig:
    """`cfg`, or, when it names no paths, the embedded demo set `name` (its train and valid)."""
    if cfg.paths:
        return cfg
    train, valid = (str(ASSETS / f"{name}.{split}.jsonl.gz") for split in ("train", "valid"))
    return replace(cfg, paths=[train], valid_paths=cfg.valid_paths or [valid])


@dataclass
class DataStats:
    read: int = 0
    bad: int = 0
    too_short: int = 0
    duplicates: int = 0
    kept: int = 0
    after_mixing: int = 0
    train: int = 0
    valid: int = 0
    formats: dict[str, str] = field(default_factory=dict)  # source -> format
    per_path: dict[str, int] = field(default_factory=dict)  # path spec -> records kept
    bad_records: list[str] = field(default_factory=list)  # "file:line: reason"
    # well-formed, kept, but teaching nothing (a preference pair with the same two answers...)
    unteachable: int = 0
    unteachable_records: list[str] = field(default_factory=list)  # "file:line: reason"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"read {self.read}", f"kept {self.kept}"]
        if self.bad:
            parts.append(f"bad (skipped) {self.bad}")
        if self.too_short:
            parts.append(f"too short {self.too_short}")
        if self.duplicates:
            parts.append(f"duplicates {self.duplicates}")
        if self.unteachable:
            parts.append(f"kept but teaching nothing {self.unteachable}")
        if self.after_mixing and self.after_mixing != self.kept:
            parts.append(f"after mixing {self.after_mixing}")
        parts.append(f"train {self.train}")
        if self.valid:
            parts.append(f"valid {self.valid}")
        return "data: " + ", ".join(parts)

    def warning(self) -> str | None:
        """A warning about the kept records that teach nothing, with their count and examples."""
        if not self.unteachable:
            return None
        shown = "; ".join(self.unteachable_records[:3])
        return (
            f"warning: {self.unteachable} of {self.kept} records are well-formed but teach"
            f" nothing (e.g. {shown}); fix or drop them (hanlm data check lists them)"
        )


@dataclass
class LoadedData:
    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]
    stats: DataStats
    kind: str  # text | chat | preference | ranked | unpaired


class RecordReader:
    """Shared state of one read: counts and the dedup set, across all sources."""

    def __init__(self, cfg: DataConfig, kind: str | None, require_answer: bool) -> None:
        self.cfg = cfg
        self.kind = kind
        self.require_answer = require_answer
        self.stats = DataStats()
        self.seen: set[bytes] = set()

    def bad(self, loc: Location, reason: str) -> None:
        msg = f"{loc}: {reason}"
        if self.cfg.on_bad_record == "error":
            raise DataError(msg + " (fix the record, or pass data.on_bad_record=skip to skip it)")
        self.stats.bad += 1
        if len(self.stats.bad_records) < MAX_BAD_KEPT:
            self.stats.bad_records.append(msg)

    def _clean(self, rec: dict[str, Any], kind: str) -> dict[str, Any]:
        cfg = self.cfg
        if kind == "text":
            text = quality.normalize(rec["text"], cfg.normalize)
            return {"text": quality.clean_text(text) if cfg.clean else text}

        # Conversations keep their whitespace (answers may hold code); normalise only.
        def fix(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{**m, "content": quality.normalize(m["content"], cfg.normalize)} for m in msgs]

        if kind == "ranked":
            return {
                "prompt": fix(rec["prompt"]),
                "responses": [fix(r) for r in rec["responses"]],
                "ranking": rec["ranking"],
            }
        return {k: v if k in ("tools", "label") else fix(v) for k, v in rec.items()}

    def _length(self, rec: dict[str, Any]) -> int:
        if "text" in rec:
            return len(rec["text"].strip())
        return sum(len(m["content"].strip()) for v in formats.message_lists(rec) for m in v)

    def _dedup_text(self, rec: dict[str, Any]) -> str:
        if "text" in rec:
            return rec["text"]
        return json.dumps(rec, ensure_ascii=False, sort_keys=True)

    def records(self, spec: str) -> Iterator[tuple[dict[str, Any], Location]]:
        cfg = self.cfg
        kept_here = 0
        for source in resolve(spec):
            fmt = None if cfg.format == "auto" else cfg.format
            count = 0
            for raw, loc in iter_source(source, cfg.txt_unit):
                if cfg.max_records and count >= cfg.max_records:
                    break
                count += 1
                self.stats.read += 1
                if isinstance(raw, BadJson):
                    self.bad(loc, raw.reason)
                    continue
                try:
                    if fmt is None:
                        fmt = formats.detect(raw, cfg.text_field)
                        self.stats.formats[source] = fmt
                        self._check_kind(fmt, source)
                    rec = formats.convert(raw, fmt, cfg.text_field, self.require_answer)
                except formats.RecordError as e:
                    self.bad(loc, f"{e} (format {fmt or 'undetected'})")
                    continue
                if fmt is not None and source not in self.stats.formats:
                    self.stats.formats[source] = fmt
                    self._check_kind(fmt, source)
                rec = self._clean(rec, formats.kind_of(fmt))
                if self._length(rec) < cfg.min_chars:
                    self.stats.too_short += 1
                    continue
                if cfg.dedup != "none":
                    key = quality.dedup_key(self._dedup_text(rec), cfg.dedup)
                    if key in self.seen:
                        self.stats.duplicates += 1
                        continue
                    self.seen.add(key)
                self.stats.kept += 1
                kept_here += 1
                why = formats.unteachable(rec)
                if why:
                    self.stats.unteachable += 1
                    if len(self.stats.unteachable_records) < MAX_BAD_KEPT:
                        self.stats.unteachable_records.append(f"{loc}: {why}")
                yield rec, loc
        self.stats.per_path[spec] = kept_here

    def _check_kind(self, fmt: str, source: str) -> None:
        if self.kind is None:
            return
        got = formats.kind_of(fmt)
        if got != self.kind:
            wanted = {
                "text": "text",
                "chat": "alpaca, sharegpt or messages",
                "preference": "preference",
                "ranked": "ranked",
                "unpaired": "unpaired (prompt, completion, label)",
            }[self.kind]
            raise DataError(
                f"{source}: this data is in the {fmt} format, but this stage needs {wanted} data"
            )


def _apply_weight(records: list[Any], weight: float, rng: random.Random) -> list[Any]:
    if weight <= 0:
        raise DataError(f"mixing weight {weight} must be > 0")
    whole, frac = int(weight), weight - int(weight)
    out = records * whole
    extra = round(frac * len(records))
    if extra:
        out += rng.sample(records, extra)
    return out


def load(
    cfg: DataConfig, kind: str | None = None, require_answer: bool = True, split: bool = True
) -> LoadedData:
    """Read every path in `cfg` into memory, mixed by weight and split into train/validation."""
    if not cfg.paths:
        raise DataError("no data given: set data.paths (files, directories, globs or hub ids)")
    if cfg.weights and len(cfg.weights) != len(cfg.paths):
        raise DataError(
            f"data.weights has {len(cfg.weights)} values for {len(cfg.paths)} data.paths;"
            " give one weight per path (or none)"
        )
    reader = RecordReader(cfg, kind, require_answer)
    rng = random.Random(cfg.seed)
    train: list[dict[str, Any]] = []
    for i, spec in enumerate(cfg.paths):
        recs = [rec for rec, _ in reader.records(spec)]
        if not recs:
            raise DataError(f"{spec}: no usable records ({reader.stats.summary()})")
        train += _apply_weight(recs, cfg.weights[i], rng) if cfg.weights else recs
    reader.stats.after_mixing = len(train)
    resolved_kind = kind or _kind_of_stats(reader.stats)

    valid: list[dict[str, Any]] = []
    if cfg.valid_paths:
        vcfg = DataConfig(**{**asdict(cfg), "paths": cfg.valid_paths, "weights": []})
        vreader = RecordReader(vcfg, resolved_kind, require_answer)
        valid = [rec for spec in cfg.valid_paths for rec, _ in vreader.records(spec)]
    elif split and cfg.valid_fraction > 0:
        if not 0 < cfg.valid_fraction < 1:
            raise DataError(f"data.valid_fraction={cfg.valid_fraction} must be between 0 and 1")
        n_valid = max(1, round(cfg.valid_fraction * len(train)))
        if n_valid >= len(train):
            raise DataError(
                f"data.valid_fraction={cfg.valid_fraction} leaves no training records"
                f" out of {len(train)}"
            )
        chosen = set(rng.sample(range(len(train)), n_valid))
        valid = [r for i, r in enumerate(train) if i in chosen]
        train = [r for i, r in enumerate(train) if i not in chosen]
    reader.stats.train, reader.stats.valid = len(train), len(valid)
    for stats in (reader.stats, vreader.stats if cfg.valid_paths else None):
        if stats is not None and stats.warning():
            print(f"[hanlm] {stats.warning()}", file=sys.stderr)
    return LoadedData(train=train, valid=valid, stats=reader.stats, kind=resolved_kind)


def _kind_of_stats(stats: DataStats) -> str:
    kinds = {formats.kind_of(f) for f in stats.formats.values()}
    if len(kinds) > 1:
        raise DataError(f"the data mixes record kinds {sorted(kinds)}: {stats.formats}")
    return kinds.pop() if kinds else "text"


def stream(
    cfg: DataConfig, kind: str | None = None, require_answer: bool = True
) -> Iterator[dict[str, Any]]:
    """Yield canonical records one at a time: memory stays flat however large the corpus.

    Mixing weights and random splits need the whole set; here they are refused rather than
    ignored. Counts are available as `gen.stats` only through `stream_with_stats`.
    """
    records, _ = stream_with_stats(cfg, kind, require_answer)
    yield from records


def stream_with_stats(
    cfg: DataConfig, kind: str | None = None, require_answer: bool = True
) -> tuple[Iterator[dict[str, Any]], DataStats]:
    if cfg.weights or cfg.valid_fraction:
        raise DataError(
            "streaming reads each record once: use data.valid_paths instead of valid_fraction"
            " and drop data.weights (or load the data into memory)"
        )
    if not cfg.paths:
        raise DataError("no data given: set data.paths (files, directories, globs or hub ids)")
    reader = RecordReader(cfg, kind, require_answer)

    def gen() -> Iterator[dict[str, Any]]:
        for spec in cfg.paths:
            for rec, _ in reader.records(spec):
                reader.stats.train += 1
                yield rec

    return gen(), reader.stats


def to_dataset(records: list[dict[str, Any]]) -> Any:
    """A `datasets.Dataset` of canonical records (imported lazily: datasets is slow to load)."""
    import datasets

    return datasets.Dataset.from_list(records)
