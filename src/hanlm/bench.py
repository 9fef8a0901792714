"""Multiple-choice benchmarks: the readers, their items, and each benchmark's prompt wording.

Shared by `hanlm eval`, which scores a model on them, and `hanlm eval contamination`, which audits
training data against them: both read the same items, with the same ids, the same way.

Reads top to bottom: the types (`Item`, `Benchmark`); the readers (C-Eval, CMMLU and MMLU in
their official layouts, hanlm's JSONL, or the hub) and `load_benchmark`, which reads one `bench=`
spec; and the prompts (each benchmark's official wording, zero- or k-shot, as its reference
script writes them). Items are read in file order, so the same files give the same items.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hanlm import ASSETS
from hanlm.data.sources import DataError, iter_source

LETTERS = ("A", "B", "C", "D")


# --------------------------------------------------------------------------- benchmarks


@dataclass
class Item:
    id: str
    subject: str  # slug, e.g. "computer_network"
    question: str
    options: list[str]  # texts of A-D
    answer: str  # "A".."D"
    name_en: str = ""  # subject names used in the prompts
    name_zh: str = ""
    category: str = ""
    where: str = ""  # file:line, for messages


@dataclass
class Benchmark:
    name: str
    layout: str  # ceval | cmmlu | mmlu | jsonl
    split: str
    items: list[Item]
    dev: dict[str, list[Item]] = field(default_factory=dict)  # subject -> few-shot pool


class MissingSplit(DataError):
    """The benchmark has no such split (C-Eval has dev/val/test, CMMLU only dev/test)."""


def _answer(value: Any, where: str, split: str) -> str:
    ans = str(value if value is not None else "").strip().upper()
    if ans not in LETTERS:
        hint = " (C-Eval publishes no test answers: use split=val)" if split == "test" else ""
        raise DataError(f"{where}: answer {value!r} is not one of A, B, C, D{hint}")
    return ans


def _subject_mapping(root: Path) -> dict[str, tuple[str, str, str]]:
    """C-Eval's `subject_mapping.json` ({slug: [English, 中文, category]}), if the dir has one."""
    path = root / "subject_mapping.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: (v[0], v[1], v[2]) for k, v in data.items() if isinstance(v, list) and len(v) >= 3}


def _named(item: Item, mapping: dict[str, tuple[str, str, str]]) -> Item:
    en, zh, cat = mapping.get(item.subject, (item.subject.replace("_", " "), "", ""))
    item.name_en, item.name_zh, item.category = en, zh or en, cat or item.category
    return item


def _split_dir(root: Path, split: str) -> Path | None:
    for name in (split, *({"val": ["validation"], "validation": ["val"]}.get(split, []))):
        if (root / name).is_dir():
            return root / name
    return None


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            return [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def read_ceval(root: Path, split: str) -> list[Item]:
    """C-Eval: `{split}/{subject}_{split}.csv`: id,question,A,B,C,D,answer[,explanation]."""
    return _read_headed_csv(root, split, "ceval", "question", "answer", suffix=f"_{split}")


def read_cmmlu(root: Path, split: str) -> list[Item]:
    """CMMLU: `{split}/{subject}.csv` with an unnamed index column, then Question,A-D,Answer."""
    return _read_headed_csv(root, split, "cmmlu", "Question", "Answer", suffix="")


def _read_headed_csv(
    root: Path, split: str, layout: str, q_col: str, a_col: str, suffix: str
) -> list[Item]:
    folder = _split_dir(root, split)
    if folder is None:
        raise MissingSplit(f"{root}: no '{split}' directory ({layout} layout)")
    mapping = _subject_mapping(root)
    items: list[Item] = []
    for path in sorted(folder.glob("*.csv")):
        subject = path.stem[: -len(suffix)] if suffix and path.stem.endswith(suffix) else path.stem
        rows = _csv_rows(path)
        if not rows:
            continue
        header = [h.strip() for h in rows[0][1]]
        need = [q_col, *LETTERS]
        missing = [c for c in need if c not in header]
        if missing:
            raise DataError(f"{path}:1: header {header} lacks {missing} ({layout} layout)")
        col = {h: i for i, h in enumerate(header)}
        for line, row in rows[1:]:
            where = f"{path}:{line}"
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} columns, the header has {len(header)}")
            if a_col not in col:
                _answer(None, where, split)  # raises: this split carries no answers
            ident = row[col["id"]] if "id" in col else row[col[""]] if "" in col else str(line)
            items.append(
                _named(
                    Item(
                        id=f"{subject}/{split}/{ident.strip()}",
                        subject=subject,
                        question=row[col[q_col]].strip(),
                        options=[row[col[c]].strip() for c in LETTERS],
                        answer=_answer(row[col[a_col]], where, split),
                        where=where,
                    ),
                    mapping,
                )
            )
    if not items:
        raise DataError(f"{folder}: no questions in any .csv file ({layout} layout)")
    return items


def read_mmlu(root: Path, split: str) -> list[Item]:
    """MMLU: `{split}/{subject}_{split}.csv`, no header: question,A,B,C,D,answer."""
    folder = _split_dir(root, split)
    if folder is None:
        raise MissingSplit(f"{root}: no '{split}' directory (mmlu layout)")
    mapping = _subject_mapping(root)
    items: list[Item] = []
    for path in sorted(folder.glob("*.csv")):
        subject = re.sub(r"_(dev|val|validation|test)$", "", path.stem)
        for n, (line, row) in enumerate(_csv_rows(path)):
            where = f"{path}:{line}"
            if len(row) != 6:
                raise DataError(f"{where}: {len(row)} columns; MMLU has question,A,B,C,D,answer")
            items.append(
                _named(
                    Item(
                        id=f"{subject}/{split}/{n}",
                        subject=subject,
                        question=row[0].strip(),
                        options=[c.strip() for c in row[1:5]],
                        answer=_answer(row[5], where, split),
                        where=where,
                    ),
                    mapping,
                )
            )
    if not items:
        raise DataError(f"{folder}: no questions in any .csv file (mmlu layout)")
    return items


def _jsonl_file(root: Path, split: str) -> Path | None:
    if root.is_file():
        return root
    for name in (f"bench.{split}.jsonl", f"{split}.jsonl", f"bench.{split}.jsonl.gz"):
        if (root / name).is_file():
            return root / name
    found = sorted(root.glob(f"*{split}*.jsonl"))
    return found[0] if len(found) == 1 else None


def read_jsonl(root: Path, split: str) -> list[Item]:
    """hanlm's JSONL: {"id","subject","subject_zh"?,"category"?,"question","A".."D","answer"}."""
    path = _jsonl_file(root, split)
    if path is None:
        raise MissingSplit(f"{root}: no bench.{split}.jsonl (or {split}.jsonl) here")
    items = []
    for raw, loc in iter_source(str(path)):
        where = str(loc)
        if not isinstance(raw, dict):
            raise DataError(f"{where}: not a JSON object ({getattr(raw, 'reason', raw)})")
        missing = [k for k in ("question", *LETTERS, "answer") if k not in raw]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}")
        subject = str(raw.get("subject") or "default")
        en = subject.replace("_", " ")
        items.append(
            Item(
                id=str(raw.get("id") or f"{path.name}:{loc.line}"),
                subject=subject,
                question=str(raw["question"]).strip(),
                options=[str(raw[c]).strip() for c in LETTERS],
                answer=_answer(raw["answer"], where, split),
                name_en=en,
                name_zh=str(raw.get("subject_zh") or en),
                category=str(raw.get("category") or ""),
                where=where,
            )
        )
    return items


_HUB = {  # name -> (dataset id, layout, {our split: hub split})
    "ceval": ("ceval/ceval-exam", "ceval", {"val": "val", "validation": "val"}),
    "cmmlu": ("haonan-li/cmmlu", "cmmlu", {}),
    "mmlu": ("cais/mmlu", "mmlu", {"val": "validation"}),
}


def read_hub(name: str, split: str) -> list[Item]:
    """The official datasets on the Hugging Face hub, one config per subject (needs network)."""
    import datasets

    repo, layout, split_names = _HUB[name]
    hub_split = split_names.get(split, split)
    try:
        subjects = datasets.get_dataset_config_names(repo)
    except Exception as e:  # offline, moved, gated: say what to do instead
        raise DataError(
            f"hub:{name}: cannot reach {repo} ({type(e).__name__}: {e}); download the official"
            f" data and pass its directory instead"
        ) from None
    items = []
    for subject in sorted(s for s in subjects if s not in ("all", "auxiliary_train")):
        ds = datasets.load_dataset(repo, subject, split=hub_split)
        for n, row in enumerate(ds):
            where = f"hub:{repo}/{subject}/{hub_split}[{n}]"
            if layout == "mmlu":
                question, options = row["question"], list(row["choices"])
                answer = LETTERS[int(row["answer"])]
            elif layout == "ceval":
                question, options = row["question"], [row[c] for c in LETTERS]
                answer = _answer(row.get("answer"), where, split)
            else:
                question, options = row["Question"], [row[c] for c in LETTERS]
                answer = _answer(row.get("Answer"), where, split)
            ident = row.get("id", n) if layout == "ceval" else n
            item = Item(f"{subject}/{split}/{ident}", subject, question, options, answer)
            item.where = where
            items.append(_named(item, {}))
    return items


def detect_layout(root: Path) -> str:
    """ceval | cmmlu | mmlu | jsonl, from the files a benchmark directory holds."""
    if root.is_file():
        if root.name.endswith((".jsonl", ".jsonl.gz", ".json")):
            return "jsonl"
        raise DataError(f"{root}: a benchmark file must be JSONL; CSV layouts are directories")
    if any(root.glob("*.jsonl")):
        return "jsonl"
    for split in ("dev", "val", "validation", "test"):
        folder = root / split
        first = next(iter(sorted(folder.glob("*.csv"))), None) if folder.is_dir() else None
        if first is None:
            continue
        rows = _csv_rows(first)
        header = [h.strip() for h in rows[0][1]] if rows else []
        if "question" in header and "id" in header:
            return "ceval"
        if "Question" in header and "Answer" in header:
            return "cmmlu"
        return "mmlu"  # header-less: the first row is a question
    raise DataError(
        f"{root}: not a benchmark directory (expected bench.<split>.jsonl, or dev/val/test"
        " folders of C-Eval, CMMLU or MMLU .csv files)"
    )


_READERS: dict[str, Callable[[Path, str], list[Item]]] = {
    "ceval": read_ceval,
    "cmmlu": read_cmmlu,
    "mmlu": read_mmlu,
    "jsonl": read_jsonl,
}


def load_benchmark(spec: str, split: str, shots: int = 0, limit: int = 0) -> Benchmark:
    """Read one benchmark spec (see EvalConfig.bench) with its dev split when shots > 0."""
    if spec.startswith("hub:"):
        name = spec[4:]
        if name not in _HUB:
            known = ", ".join("hub:" + k for k in _HUB)
            raise DataError(f"{spec}: the known hub benchmarks are {known}")
        items = read_hub(name, split)
        dev_items = read_hub(name, "dev") if shots else []
        layout = _HUB[name][1]
    else:
        forced = spec.split(":", 1)[0] in _READERS
        layout, _, path = spec.partition(":") if forced else ("", "", spec)
        root = ASSETS if path == "demo" else Path(path).expanduser()
        name = "demo" if path == "demo" else root.name.split(".")[0]
        if not root.exists():
            raise DataError(f"{spec}: no such file or directory")
        layout = layout or detect_layout(root)
        items = _READERS[layout](root, split)
        dev_items = []
        if shots:
            dev_root = root.parent if root.is_file() else root
            try:
                dev_items = _READERS[layout](dev_root, "dev")
            except DataError as e:
                raise DataError(f"{spec}: shots={shots} needs a dev split: {e}") from None
    if limit:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for it in items:
            seen[it.subject] += 1
            if seen[it.subject] <= limit:
                kept.append(it)
        items = kept
    dev: dict[str, list[Item]] = defaultdict(list)
    for it in dev_items:
        dev[it.subject].append(it)
    return Benchmark(name=name, layout=layout, split=split, items=items, dev=dict(dev))


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Style:
    """One benchmark's prompt wording, as in its reference evaluation script."""

    header: str  # formatted with {subject}
    question: str  # formatted with {question}
    cue: str  # what precedes the answer letter
    answer_sep: str  # between the cue and the letter
    chinese_names: bool


STYLES = {
    "ceval": Style(
        "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
        "{question}",
        "\n答案：",
        "",
        True,
    ),
    "cmmlu": Style(
        "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
        "题目：{question}",
        "\n答案是：",
        "",
        True,
    ),
    "mmlu": Style(
        "The following are multiple choice questions (with answers) about {subject}.\n\n",
        "{question}",
        "\nAnswer:",
        " ",
        False,
    ),
}


def format_example(item: Item, style: Style, with_answer: bool) -> str:
    """Question, the lines `A. …` to `D. …`, the cue, and for a shot its letter and a blank line."""
    text = style.question.format(question=item.question)
    text += "".join(f"\n{c}. {o}" for c, o in zip(LETTERS, item.options)) + style.cue
    return text + f"{style.answer_sep}{item.answer}\n\n" if with_answer else text


def build_prompt(item: Item, style: Style, shots: Sequence[Item]) -> str:
    subject = item.name_zh if style.chinese_names else item.name_en
    head = style.header.format(subject=subject or item.subject)
    return (
        head
        + "".join(format_example(s, style, True) for s in shots)
        + format_example(item, style, False)
    )


def pick_style(bench: Benchmark, style: str) -> Style:
    if style != "auto":
        return STYLES[style]
    if bench.layout != "jsonl":
        return STYLES[bench.layout]
    sample = "".join(it.question for it in bench.items[:20])
    return STYLES["ceval" if re.search(r"[\u4e00-\u9fff]", sample) else "mmlu"]
