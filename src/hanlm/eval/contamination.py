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
- The question and its correct answer (`fields`) are matched apart, each by its own n-grams: a
  leak puts something between them (the options of an exam page, a chat turn, `答：`), and
  n-grams across the join of the two would never match it. An answer too short for an n-gram
  (most are) is matched whole; one that is part of its question says nothing and is not used.
  Distractors appearing in training say nothing about the item either.
- n-grams (and whole answers) found in `ignore_common` or more items of one benchmark are its
  templates ("这两句诗的作者是") rather than content, and are not used.
- An item is *contaminated* when at least `min_overlap` of its question's n-grams occur in the
  training data (0.7, PaLM's definition: 70% of an example's 8-grams seen in training), or when
  one training record holds its question and, within `near` characters (words, for Latin
  text), its answer, together reaching `min_overlap` of the pair's n-grams (an answer matched
  whole counts as one). A question too short for any n-gram is matched whole, and only this
  second way, when question and answer together are at least n long.
- GPT-3's rule, any single shared n-gram, is `min_overlap=0`; it also catches a shared stock
  phrase of two dictionary definitions, so items with some overlap below the threshold are
  reported apart as *partial*, with their matches, for a person to judge.

Items whose question has no usable n-gram (too short, or every gram a template) and that no
record holds with its answer are `too_short`: not checked, so never counted as clean. A split
without public answers (C-Eval's test) is audited by its questions alone. The output,
`contamination.json`, lists every contaminated and partial item with the training records that
contain it (file:line), and is what `hanlm eval contamination=DIR` reads to score the clean,
contaminated, partial and too-short items apart.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from hanlm import ASSETS
from hanlm.config import ConfigError, DataConfig, OutputConfig, opt
from hanlm.data.formats import message_lists
from hanlm.data.loader import RecordReader
from hanlm.eval.benchmarks import LETTERS, Item, MissingSplit, canonical_split, load_benchmark
from hanlm.runs import Run, atomic_write_json

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_WORD = re.compile(f"[^\\W_{_CJK}]+")
_IS_CJK = re.compile(f"[{_CJK}]")
CHARS, WORDS = 0, 1  # the two streams a text is matched in


@dataclass
class ContaminationConfig(OutputConfig):
    UNUSED: ClassVar[dict[str, str]] = {
        **{
            f"data.{k}": "the audit's training data is `train`"
            for k in ("paths", "weights", "valid_paths", "valid_fraction", "seed")
        },
        "data.dedup": "the audit reads every record",
        "data.min_chars": "the audit reads every record",
    }
    train: list[str] = opt(
        ["demo"], "training data (files, dirs, globs); demo = every embedded train/valid file"
    )
    bench: list[str] = opt(["demo"], "benchmarks, as for hanlm eval (demo, a directory, hub:...)")
    splits: list[str] = opt(
        ["dev", "val", "test"],
        "benchmark splits to audit (absent ones skipped; a split without answers, as C-Eval's"
        " test, by its questions alone)",
    )
    fields: Literal["question+answer", "question+options", "question"] = opt(
        "question+answer",
        "matched apart: the question, and near it in one record its answer (question+answer),"
        " its four options (question+options), or nothing (question)",
    )
    char_n: int = opt(8, "n for Chinese (CJK) character n-grams")
    word_n: int = opt(13, "n for word n-grams of Latin-script text (GPT-3 used 13)")
    min_overlap: float = opt(
        0.7, "flag an item when this fraction of its n-grams is in training (PaLM: 0.7; 0 = any)"
    )
    near: int = opt(
        200, "an answer counts within this many characters (words for Latin text) of its question"
    )
    ignore_common: int = opt(10, "skip n-grams shared by this many items (templates); 0 = keep")
    max_matches: int = opt(3, "training records listed per contaminated item")
    data: DataConfig = opt(
        DataConfig,
        "how training records are read, as in the training stages (data.on_bad_record,"
        " data.format, data.txt_unit, data.text_field, data.max_records)",
    )

    def validate(self) -> None:
        if self.char_n < 1 or self.word_n < 1 or self.near < 0:
            raise ConfigError("char_n and word_n must be >= 1 and near >= 0")
        if not 0 <= self.min_overlap <= 1:
            raise ConfigError(f"min_overlap={self.min_overlap} must be between 0 and 1")


# --------------------------------------------------------------------------- n-grams


def normalize_units(text: str) -> tuple[str, list[str]]:
    """(CJK characters as one string, Latin/digit words), after NFKC and case folding."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(_CJK_RUN.findall(text)), _WORD.findall(_CJK_RUN.sub(" ", text))


def _grams(chars: str, words: list[str], char_n: int, word_n: int) -> set[str]:
    grams = {chars[i : i + char_n] for i in range(len(chars) - char_n + 1)}
    grams.update(" ".join(words[i : i + word_n]) for i in range(len(words) - word_n + 1))
    return grams


def ngrams(text: str, char_n: int, word_n: int) -> set[str]:
    """Character n-grams of the CJK stream and space-joined word n-grams (they never collide:
    one holds only CJK characters, the other none)."""
    return _grams(*normalize_units(text), char_n, word_n)


def _stream(key: str) -> int:
    return CHARS if _IS_CJK.match(key) else WORDS


def _units(key: str) -> int:
    return len(key) if _stream(key) == CHARS else key.count(" ") + 1


@dataclass
class Part:
    """A text the audit looks for: by its n-grams, or whole when it has none."""

    grams: set[str]
    whole: str = ""  # normalised: CJK characters, or words joined by spaces
    units: int = 0  # its length in characters or words

    def texts(self) -> set[str]:
        return self.grams or {self.whole}

    @property
    def size(self) -> int:
        return len(self.grams) or 1


def text_part(text: str, char_n: int, word_n: int) -> Part | None:
    """A text's n-grams, else (too short) the text whole if it is at least two characters or
    three letters long; None when even that is too little to mean anything."""
    chars, words = normalize_units(text)
    units = max(len(chars), len(words))
    grams = _grams(chars, words, char_n, word_n)
    if grams:
        return Part(grams, units=units)
    if len(chars) >= 2:
        return Part(set(), chars, len(chars))
    if sum(map(len, words)) >= 3:
        return Part(set(), " ".join(words), len(words))
    return None


@dataclass
class Probe:
    """What the audit looks for of one item: its question, and the answer texts to find near it."""

    question: Part | None
    answers: list[Part]
    question_only: bool  # its split publishes no answers


def _probe(item: Item, cfg: ContaminationConfig) -> Probe:
    question = text_part(item.question, cfg.char_n, cfg.word_n)
    texts: list[str] = []
    if item.answer and cfg.fields == "question+answer":
        texts = [item.options[LETTERS.index(item.answer)]]
    elif item.answer and cfg.fields == "question+options":
        texts = list(item.options)
    chars, words = normalize_units(item.question)
    inside = chars + " " + " ".join(words)
    answers = []
    for text in texts:
        part = text_part(text, cfg.char_n, cfg.word_n)
        if part is not None and question is not None:
            part.grams -= question.grams  # what the question itself says is no answer
        if part is not None and part.texts() and (part.grams or part.whole not in inside):
            answers.append(part)
    return Probe(question, answers, question_only=not item.answer)


def _drop_templates(probes: list[Probe], cfg: ContaminationConfig) -> None:
    """Remove the keys shared by `ignore_common` or more items; a short question is kept only
    when question and answer together are at least one n-gram long."""
    common: set[str] = set()
    if cfg.ignore_common:  # questions and answers counted apart
        questions = Counter(k for p in probes if p.question for k in p.question.texts())
        answers = Counter(k for p in probes for a in p.answers for k in a.texts())
        for counts in (questions, answers):
            common |= {k for k, c in counts.items() if c >= cfg.ignore_common}
    for p in probes:
        for part in [p.question, *p.answers]:
            if part is not None and part.grams:
                part.grams -= common
        p.answers = [a for a in p.answers if a.grams or (a.whole and a.whole not in common)]
        q = p.question
        if q is None or q.grams:
            continue
        n = cfg.char_n if _stream(q.whole) == CHARS else cfg.word_n
        longest = max((a.units for a in p.answers), default=0)
        if not q.whole or q.whole in common or not p.answers or q.units + longest < n:
            p.question = None


# --------------------------------------------------------------------------- training data


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
    """All of a canonical record's text; chat turns joined in order, a tool call's arguments
    with its turn (they may quote a benchmark's text)."""
    if "text" in rec:
        return rec["text"]
    parts = []
    for side in message_lists(rec):
        for m in side:
            parts.append(m["content"])
            for call in m.get("tool_calls") or ():
                parts.append(json.dumps(call["function"]["arguments"], ensure_ascii=False))
    return "\n".join(parts)


class Record:
    """One training record's two streams, with the positions of a key found in them."""

    def __init__(self, text: str) -> None:
        self.chars, self.words = normalize_units(text)

    def substrings(self, stream: int, length: int) -> set[str]:
        if stream == CHARS:
            return {self.chars[i : i + length] for i in range(len(self.chars) - length + 1)}
        w = self.words
        return {" ".join(w[i : i + length]) for i in range(len(w) - length + 1)}

    def find(self, key: str) -> list[int]:
        if _stream(key) == CHARS:
            return [m.start() for m in re.finditer(f"(?={re.escape(key)})", self.chars)]
        parts = key.split(" ")
        n = len(parts)
        return [i for i in range(len(self.words) - n + 1) if self.words[i : i + n] == parts]


def pair_overlap(probe: Probe, rec: Record, found: set[str], near: int) -> tuple[float, bool]:
    """(the share of the question's and its answers' keys this record holds, with the answers
    counted only within `near` of the question's matches; whether any answer was there)."""
    assert probe.question is not None
    span: dict[int, tuple[int, int]] = {}
    for key in found:
        for pos in rec.find(key):
            st, end = _stream(key), pos + _units(key)
            lo, hi = span.get(st, (pos, end))
            span[st] = (min(lo, pos), max(hi, end))
    got = 0
    for part in probe.answers:
        for key in part.texts():
            st, size = _stream(key), _units(key)
            lo, hi = span.get(st, (-(10**9), 10**9))  # another stream: anywhere in the record
            got += any(lo - near < p + size and p < hi + near for p in rec.find(key))
    total = probe.question.size + sum(a.size for a in probe.answers)
    return (len(found) + got) / total, got > 0


# --------------------------------------------------------------------------- the audit

Key = tuple[int, int]  # (benchmark, item): an item of one audited benchmark


def _zero_counts() -> dict[str, int]:
    return {"items": 0, "contaminated": 0, "partial": 0, "too_short": 0}


def audit(cfg: ContaminationConfig) -> dict[str, Any]:
    """Run the audit; returns the report that `run` writes as contamination.json."""
    t0 = time.perf_counter()
    benches = _benchmark_items(cfg)
    index = _index(benches, cfg)
    found = _scan(cfg, index)
    report: dict[str, Any] = {
        "char_n": cfg.char_n,
        "word_n": cfg.word_n,
        "fields": cfg.fields,
        "min_overlap": cfg.min_overlap,
        "near": cfg.near,
        "ignore_common": cfg.ignore_common,
        "train": found.train,
        "benchmarks": {},
    }
    for b, (name, items) in enumerate(benches):
        report["benchmarks"][name] = _benchmark_report(cfg, b, items, index.probes, found)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _benchmark_items(cfg: ContaminationConfig) -> list[tuple[str, list[tuple[str, Item]]]]:
    """Each benchmark's name and its (split, item) pairs over the audited splits."""
    splits = list(dict.fromkeys(canonical_split(s) for s in cfg.splits))
    benches: list[tuple[str, list[tuple[str, Item]]]] = []
    for spec in cfg.bench:
        items: list[tuple[str, Item]] = []
        name, ids = "", set()
        for split in splits:
            try:
                b = load_benchmark(spec, split, answers=False)
            except MissingSplit:
                continue
            name = b.name
            # A single JSONL file is every split at once: read its items once.
            items += [(split, it) for it in b.items if it.id not in ids]
            ids.update(it.id for it in b.items)
        if not items:
            raise ConfigError(f"{spec}: none of the splits {splits} has questions")
        benches.append((name, items))
    return benches


@dataclass
class Index:
    """What the pass over the training data looks for: each item's probe (templates removed per
    benchmark), the items of each question n-gram, and the questions too short for an n-gram by
    (stream, length) and text."""

    probes: dict[Key, Probe]
    grams: dict[str, list[Key]]
    short: dict[tuple[int, int], dict[str, list[Key]]]


def _index(benches: list[tuple[str, list[tuple[str, Item]]]], cfg: ContaminationConfig) -> Index:
    probes: dict[Key, Probe] = {}
    index: dict[str, list[Key]] = defaultdict(list)  # question n-gram -> items
    short: dict[tuple[int, int], dict[str, list[Key]]] = defaultdict(
        lambda: defaultdict(list)
    )  # (stream, length) -> short question -> items
    for b, (_, items) in enumerate(benches):
        group = [_probe(it, cfg) for _, it in items]
        _drop_templates(group, cfg)
        for i, p in enumerate(group):
            probes[(b, i)] = p
            if p.question is None:
                continue
            for g in p.question.grams:
                index[g].append((b, i))
            if not p.question.grams:
                key = p.question.whole
                short[(_stream(key), _units(key))][key].append((b, i))
    return Index(probes, index, short)


@dataclass
class Found:
    """What the pass over the training data found of each item: its question n-grams seen in
    training, the best share of a record holding its question with an answer near, and the
    records that hold it (at most `max_matches`); and what was read (`train`)."""

    matched: dict[Key, set[str]]
    best_pair: dict[Key, float]
    where: dict[Key, list[dict[str, Any]]]
    train: dict[str, Any]


def _scan(cfg: ContaminationConfig, index: Index) -> Found:
    """One pass over the training data: every n-gram of every record looked up in the index; a
    record holding some of an item's question is then searched for its answers."""
    data_cfg = dataclasses.replace(cfg.data, paths=[], dedup="none", min_chars=1)
    reader = RecordReader(data_cfg, None, require_answer=False)
    matched: dict[Key, set[str]] = defaultdict(set)
    best_pair: dict[Key, float] = defaultdict(float)
    where: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    records = chars = 0
    keys = index.grams.keys()
    files = _train_files(cfg.train)
    for spec in files:
        for rec_raw, loc in reader.records(spec):
            text = _record_text(rec_raw)
            records += 1
            chars += len(text)
            rec = Record(text)
            found: dict[Key, set[str]] = defaultdict(set)
            for gram in keys & _grams(rec.chars, rec.words, cfg.char_n, cfg.word_n):
                for key in index.grams[gram]:
                    found[key].add(gram)
            for (stream, length), table in index.short.items():
                for whole in table.keys() & rec.substrings(stream, length):
                    for key in table[whole]:
                        found[key].add(whole)
            for key, hits in found.items():
                probe = index.probes[key]
                assert probe.question is not None
                near = False
                if probe.answers:
                    share, near = pair_overlap(probe, rec, hits, cfg.near)
                    if near:
                        best_pair[key] = max(best_pair[key], share)
                if probe.question.grams:
                    matched[key] |= hits
                elif not near:
                    continue  # a short question alone is no evidence
                seen = where[key]
                if len(seen) < cfg.max_matches and all(m["where"] != str(loc) for m in seen):
                    gram = min(hits)
                    seen.append(
                        {"where": str(loc), "ngram": gram, "answer_near": near, "text": text[:200]}
                    )
    train = {"paths": files, "records": records, "chars": chars, "bad_records": reader.stats.bad}
    return Found(matched, best_pair, where, train)


def _benchmark_report(
    cfg: ContaminationConfig,
    b: int,
    items: list[tuple[str, Item]],
    probes: dict[Key, Probe],
    found: Found,
) -> dict[str, Any]:
    """One benchmark's part of the report: flagged items with their matches, counts by split
    and subject."""
    matched, best_pair, where = found.matched, found.best_pair, found.where
    details = {}
    status_of: dict[str, str] = {}
    by_split: dict[str, dict[str, int]] = defaultdict(_zero_counts)
    by_subject: dict[str, dict[str, int]] = defaultdict(_zero_counts)
    question_only: dict[str, int] = defaultdict(int)
    for i, (split, it) in enumerate(items):
        key, probe = (b, i), probes[(b, i)]
        question_only[split] += probe.question_only
        q_total = len(probe.question.grams) if probe.question else 0
        q_overlap = len(matched[key]) / q_total if q_total and key in matched else 0.0
        pair = best_pair.get(key, 0.0)
        by_question = key in matched and q_overlap >= cfg.min_overlap
        if by_question or (key in best_pair and pair >= cfg.min_overlap):
            status = "contaminated"
        elif key in matched or key in best_pair:
            status = "partial"
        else:
            status = "clean" if q_total else "too_short"
        status_of[it.id] = status
        by_split[split]["items"] += 1
        by_subject[it.subject]["items"] += 1
        if status == "clean":
            continue
        by_split[split][status] += 1
        by_subject[it.subject][status] += 1
        if status == "too_short":
            continue
        details[it.id] = {
            "status": status,
            "split": split,
            "subject": it.subject,
            "question": it.question,
            "overlap": round(max(q_overlap, pair), 4),
            "question_overlap": round(q_overlap, 4),
            "pair_overlap": round(pair, 4),
            "answer_near": key in best_pair,
            "ngrams_matched": len(matched[key]),
            "ngrams": q_total,
            "matches": where[key],
        }
    flagged = sorted(k for k, s in status_of.items() if s == "contaminated")
    partial = sorted(k for k, s in status_of.items() if s == "partial")
    too_short = [k for k, s in status_of.items() if s == "too_short"]
    return {
        "items": len(items),
        "contaminated": len(flagged),
        "fraction": len(flagged) / len(items),
        "partial": len(partial),
        "too_short": len(too_short),
        "clean": sum(s == "clean" for s in status_of.values()),
        "question_only": {s: n for s, n in question_only.items() if n},
        "by_split": dict(by_split),
        "by_subject": dict(by_subject),
        "flagged": flagged,
        "partial_ids": partial,
        "too_short_ids": too_short,
        "details": details,
        "audited": [it.id for _, it in items],
    }


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
            f" {b['partial']} partial overlaps; {b['too_short']} too short to check;"
            f" {b['clean']} clean"
        )
        for split, n in b["question_only"].items():
            print(f"  {split}: {n} questions without public answers, audited by question alone")
        for item_id in [*b["flagged"], *b["partial_ids"]][:20]:
            d = b["details"][item_id]
            near = ", answer near" if d["answer_near"] else ""
            print(
                f"  {d['status']:<12} {item_id}: {d['ngrams_matched']}/{d['ngrams']} n-grams"
                f"{near}, e.g. {d['matches'][0]['where']}"
            )
    return run.dir
