"""`hanlm eval contamination`: which benchmark items are already in the training data?

A model's benchmark score can come from having seen the questions. This audit looks for long
n-grams that a benchmark item shares with any training record, the test GPT-3 used (13-gram word
overlap), adapted to Chinese:

- Text is NFKC-normalised and case-folded. Chinese/Japanese/Korean characters form one stream
  (punctuation, spaces and Latin text dropped), matched as character n-grams (`char_n`, default
  8); Latin/digit words form another, matched as word n-grams (`word_n`, default 13, as GPT-3).
- Why 8 characters: a classical poem line has 5 or 7 characters and an idiom 4, and single lines
  and idioms are quoted everywhere, so shorter grams would flag coincidences; 8 characters must
  run across a line break or cover a whole line plus more, which chance quotation seldom does.
  Eight characters are only some 4-5 Chinese words, fewer than GPT-3's 13, because Chinese
  exam questions are short (many C-Eval/CMMLU questions have 10-30 characters) and a longer n
  would leave them unchecked; raise it to flag only long verbatim copies.
- An item's text is its question plus its correct answer (`fields`), the unit a leak teaches:
  distractors appearing in training say nothing about the item.
- n-grams found in `ignore_common` or more items of one benchmark are its question templates
  ("这两句诗的作者是") rather than content, and are not used.
- An item is *contaminated* when at least `min_overlap` of its n-grams occur in the training
  data: 0.7, PaLM's definition (70% of an example's 8-grams seen in training). GPT-3's rule, any
  single shared n-gram, is `min_overlap=0`; it also catches a shared stock phrase of two
  dictionary definitions, so items with some overlap below the threshold are reported apart as
  *partial*, with their matches, for a person to judge.

Items with fewer than n units, or whose every gram is a template, cannot be checked; they are
counted as `unchecked` and treated as clean. The output, `contamination.json`, lists every
contaminated and partial item with the training records that contain it (file:line), and is
what `hanlm eval contamination=DIR` reads to score clean and contaminated items apart.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hanlm import ASSETS
from hanlm.bench import LETTERS, Item, MissingSplit, load_benchmark
from hanlm.config import ConfigError, DataConfig, OutputConfig, opt
from hanlm.data.loader import RecordReader
from hanlm.runs import Run, atomic_write_json

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_WORD = re.compile(f"[^\\W_{_CJK}]+")


@dataclass
class ContaminationConfig(OutputConfig):
    train: list[str] = opt(
        ["demo"], "training data (files, dirs, globs); demo = every embedded train/valid file"
    )
    bench: list[str] = opt(["demo"], "benchmarks, as for hanlm eval (demo, a directory, hub:...)")
    splits: list[str] = opt(
        ["dev", "val", "test"], "benchmark splits to audit (absent ones skipped)"
    )
    fields: Literal["question+answer", "question+options", "question"] = opt(
        "question+answer", "item text matched: the question and its answer (what a leak teaches)"
    )
    char_n: int = opt(8, "n for Chinese (CJK) character n-grams")
    word_n: int = opt(13, "n for word n-grams of Latin-script text (GPT-3 used 13)")
    min_overlap: float = opt(
        0.7, "flag an item when this fraction of its n-grams is in training (PaLM: 0.7; 0 = any)"
    )
    ignore_common: int = opt(10, "skip n-grams shared by this many items (templates); 0 = keep")
    max_matches: int = opt(3, "training records listed per contaminated item")
    on_bad_record: Literal["error", "skip"] = opt("error", "bad training records: stop or skip")

    def validate(self) -> None:
        if self.char_n < 1 or self.word_n < 1:
            raise ConfigError("char_n and word_n must be >= 1")
        if not 0 <= self.min_overlap <= 1:
            raise ConfigError(f"min_overlap={self.min_overlap} must be between 0 and 1")


def normalize_units(text: str) -> tuple[str, list[str]]:
    """(CJK characters as one string, Latin/digit words), after NFKC and case folding."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(_CJK_RUN.findall(text)), _WORD.findall(_CJK_RUN.sub(" ", text))


def ngrams(text: str, char_n: int, word_n: int) -> set[str]:
    """Character n-grams of the CJK stream and space-joined word n-grams (they never collide:
    one holds only CJK characters, the other none)."""
    chars, words = normalize_units(text)
    grams = {chars[i : i + char_n] for i in range(len(chars) - char_n + 1)}
    grams.update(" ".join(words[i : i + word_n]) for i in range(len(words) - word_n + 1))
    return grams


def item_text(item: Item, fields: str) -> str:
    parts = [item.question]
    if fields == "question+answer":
        parts.append(item.options[LETTERS.index(item.answer)])
    elif fields == "question+options":
        parts.extend(item.options)
    return "\n".join(parts)


def _train_files(specs: list[str]) -> list[str]:
    out = []
    for spec in specs:
        if spec == "demo":
            out += sorted(
                str(p) for p in ASSETS.glob("*.jsonl.gz") if not p.name.startswith("bench")
            )
        else:
            out.append(spec)
    return out


def _record_text(rec: dict[str, Any]) -> str:
    """All of a canonical record's text; chat turns joined so a question and its answer stay
    adjacent, as a leak would have them."""
    if "text" in rec:
        return rec["text"]
    return "\n".join(m["content"] for side in rec.values() for m in side)


def _zero_counts() -> dict[str, int]:
    return {"items": 0, "contaminated": 0, "partial": 0}


def audit(cfg: ContaminationConfig) -> dict[str, Any]:
    """Run the audit; returns the report that `run` writes as contamination.json."""
    t0 = time.perf_counter()
    # 1. Benchmark items and their n-grams, templates removed per benchmark.
    benches: list[tuple[str, list[tuple[str, Item]]]] = []
    for spec in cfg.bench:
        items: list[tuple[str, Item]] = []
        name, ids = "", set()
        for split in cfg.splits:
            try:
                b = load_benchmark(spec, split)
            except MissingSplit:
                continue
            name = b.name
            # A single JSONL file is every split at once: read its items once.
            items += [(split, it) for it in b.items if it.id not in ids]
            ids.update(it.id for it in b.items)
        if not items:
            raise ConfigError(f"{spec}: none of the splits {cfg.splits} has questions")
        benches.append((name, items))

    index: dict[str, list[tuple[int, int]]] = defaultdict(list)
    item_grams: list[list[int]] = []  # per benchmark, per item: usable gram count
    unchecked: list[list[str]] = []
    for b, (_, items) in enumerate(benches):
        grams = [ngrams(item_text(it, cfg.fields), cfg.char_n, cfg.word_n) for _, it in items]
        counts: dict[str, int] = defaultdict(int)
        for g in grams:
            for x in g:
                counts[x] += 1
        usable = []
        skipped = []
        for i, g in enumerate(grams):
            kept = {x for x in g if not cfg.ignore_common or counts[x] < cfg.ignore_common}
            usable.append(len(kept))
            if not kept:
                skipped.append(items[i][1].id)
            for x in kept:
                index[x].append((b, i))
        item_grams.append(usable)
        unchecked.append(skipped)

    # 2. One pass over the training data: every n-gram of every record looked up in the index.
    data_cfg = DataConfig(dedup="none", min_chars=1, on_bad_record=cfg.on_bad_record)
    reader = RecordReader(data_cfg, None, require_answer=False)
    matched: dict[tuple[int, int], set[str]] = defaultdict(set)
    where: dict[tuple[int, int], list[dict[str, str]]] = defaultdict(list)
    records = chars = 0
    keys = index.keys()
    files = _train_files(cfg.train)
    for spec in files:
        for rec, loc in reader.records(spec):
            text = _record_text(rec)
            records += 1
            chars += len(text)
            hits = keys & ngrams(text, cfg.char_n, cfg.word_n)
            for gram in hits:
                for key in index[gram]:
                    matched[key].add(gram)
                    seen = where[key]
                    if len(seen) < cfg.max_matches and all(m["where"] != str(loc) for m in seen):
                        seen.append({"where": str(loc), "ngram": gram, "text": text[:200]})

    # 3. Per benchmark: flagged items with their matches, counts by split and subject.
    report: dict[str, Any] = {
        "char_n": cfg.char_n,
        "word_n": cfg.word_n,
        "fields": cfg.fields,
        "min_overlap": cfg.min_overlap,
        "ignore_common": cfg.ignore_common,
        "train": {
            "paths": files,
            "records": records,
            "chars": chars,
            "bad_records": reader.stats.bad,
        },
        "benchmarks": {},
    }
    for b, (name, items) in enumerate(benches):
        details = {}
        by_split: dict[str, dict[str, int]] = defaultdict(_zero_counts)
        by_subject: dict[str, dict[str, int]] = defaultdict(_zero_counts)
        for i, (split, it) in enumerate(items):
            by_split[split]["items"] += 1
            by_subject[it.subject]["items"] += 1
            if (b, i) not in matched:
                continue
            overlap = len(matched[(b, i)]) / item_grams[b][i]
            status = "contaminated" if overlap >= cfg.min_overlap else "partial"
            by_split[split][status] += 1
            by_subject[it.subject][status] += 1
            details[it.id] = {
                "status": status,
                "split": split,
                "subject": it.subject,
                "question": it.question,
                "overlap": round(overlap, 4),
                "ngrams_matched": len(matched[(b, i)]),
                "ngrams": item_grams[b][i],
                "matches": where[(b, i)],
            }
        flagged = sorted(k for k, d in details.items() if d["status"] == "contaminated")
        report["benchmarks"][name] = {
            "items": len(items),
            "contaminated": len(flagged),
            "fraction": len(flagged) / len(items),
            "partial": len(details) - len(flagged),
            "unchecked": len(unchecked[b]),
            "unchecked_ids": unchecked[b],
            "by_split": dict(by_split),
            "by_subject": dict(by_subject),
            "flagged": flagged,
            "partial_ids": sorted(k for k, d in details.items() if d["status"] == "partial"),
            "details": details,
            "audited": [it.id for _, it in items],
        }
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def run(cfg: ContaminationConfig) -> Path:
    with Run("eval contamination", cfg) as run:
        report = audit(cfg)
        atomic_write_json(run.dir / "contamination.json", report)
        run.set("data", report["train"])
        run.finish(
            {f"{name}/contaminated": b["contaminated"] for name, b in report["benchmarks"].items()}
        )
    train = report["train"]
    print(
        f"training data: {train['records']} records, {train['chars']} characters;"
        f" {cfg.char_n}-char / {cfg.word_n}-word n-grams; {report['seconds']}s"
    )
    for name, b in report["benchmarks"].items():
        print(
            f"{name}: {b['contaminated']} of {b['items']} items contaminated"
            f" (>= {cfg.min_overlap:.0%} of their n-grams in training, {b['fraction']:.2%});"
            f" {b['partial']} partial overlaps; {b['unchecked']} too short to check"
        )
        for item_id in [*b["flagged"], *b["partial_ids"]][:20]:
            d = b["details"][item_id]
            print(
                f"  {d['status']:<12} {item_id}: {d['ngrams_matched']}/{d['ngrams']} n-grams,"
                f" e.g. {d['matches'][0]['where']}"
            )
    return run.dir
