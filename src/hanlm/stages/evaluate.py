"""`hanlm eval`: multiple-choice benchmarks, perplexity and generation samples for any causal LM.

Reads top to bottom: the config; the benchmark readers (C-Eval, CMMLU and MMLU in their official
layouts, hanlm's JSONL, or the hub); the prompts (each benchmark's official wording, zero- or
k-shot, optionally inside the model's chat template); the scorers; perplexity and samples; and
`run()`, which writes everything to the output directory:

- `eval_report.json`  every score, for the recipe report (also summarised in `hanlm.json`);
- `predictions-<bench>.jsonl`  per question: the exact prompt, the four option scores, the chosen
  and the correct answer, so any score can be audited and recomputed;
- `samples.jsonl`  generations for a prompt file.

Scoring. `letter` (default) is what the C-Eval and CMMLU reference scripts do: after the prompt
(which ends in `答案：` / `答案是：` / `Answer:`) take the next-token logits of the four letters,
softmax over those four, answer = argmax. `loglik` scores each option's own text instead: its
log-likelihood after the prompt divided by its length in characters (characters, not tokens, so
tokenizers with different Chinese coverage compare fairly).

Averaging. `accuracy` is over all questions (micro; the MMLU reference script's overall figure);
`macro_accuracy` is the mean of the per-subject accuracies (each subject counts once, as in a
per-subject leaderboard average). Both are given overall and per category: compare like with like.

Determinism. Items are read in file order, batches are formed by a stable sort, scoring is greedy
and there is no sampling, so the same model, data and config give the same predictions.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hanlm.config import ConfigError, ModelConfig, OutputConfig, opt
from hanlm.data.sources import DataError

if TYPE_CHECKING:  # heavy imports stay lazy (hanlm eval --help must be fast)
    import torch

LETTERS = ("A", "B", "C", "D")
DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"


@dataclass
class EvalConfig(OutputConfig):
    model: ModelConfig = opt(ModelConfig, "the model to evaluate")
    bench: list[str] = opt(
        ["demo"],
        "benchmarks: `demo` (embedded), a directory or file (layout detected; force one with"
        " ceval:PATH, cmmlu:PATH, mmlu:PATH, jsonl:PATH), or hub:ceval / hub:cmmlu / hub:mmlu",
    )
    split: str = opt("test", "split to score (C-Eval's test answers are not public: use val)")
    shots: int = opt(0, "k-shot: the first k dev examples of each subject precede the question")
    scoring: Literal["letter", "loglik"] = opt(
        "letter", "letter: next-token probability of A-D; loglik: per-character option likelihood"
    )
    style: Literal["auto", "ceval", "cmmlu", "mmlu"] = opt(
        "auto", "prompt wording; auto = the benchmark's own (hanlm JSONL: C-Eval's if Chinese)"
    )
    chat_template: bool = opt(False, "wrap each prompt in the model's chat template")
    batch_size: int = opt(8, "sequences per forward pass")
    max_length: int = opt(0, "prompt token limit; longer k-shot prompts drop shots (0 = model's)")
    limit: int = opt(0, "score at most this many questions per subject (0 = all)")
    contamination: str = opt(
        "", "an audit from `hanlm eval contamination` (file or dir): score clean/dirty apart"
    )
    ppl: list[str] = opt([], "text files for perplexity and bits per character (data layer)")
    ppl_window: int = opt(1024, "perplexity: tokens per window (capped at the model's maximum)")
    ppl_stride: int = opt(512, "perplexity: tokens the window advances (each scored once)")
    ppl_max_chars: int = opt(0, "perplexity: read at most this many characters per file (0 = all)")
    prompts: str = opt("", "prompt file for samples: .txt (one a line) or JSONL prompt/messages")
    max_new_tokens: int = opt(128, "samples: tokens generated per prompt")
    temperature: float = opt(0.0, "samples: 0 = greedy (deterministic); > 0 samples")
    seed: int = opt(0, "seed for sampled generations")

    def validate(self) -> None:
        if self.shots < 0 or self.batch_size < 1 or self.limit < 0 or self.max_length < 0:
            raise ConfigError("shots, limit and max_length must be >= 0 and batch_size >= 1")
        if not 0 < self.ppl_stride <= self.ppl_window:
            raise ConfigError(
                f"ppl_stride={self.ppl_stride} must be between 1 and ppl_window={self.ppl_window}"
            )


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
    from hanlm.data.sources import iter_source

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
        root = DEMO_DIR if path == "demo" else Path(path).expanduser()
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


# --------------------------------------------------------------------------- scoring


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def letter_token_ids(tokenizer: Any, prompt: str, sep: str = "") -> list[int]:
    """The token each of A-D is when written right after `prompt` (with `sep` before it).

    Found by tokenising the end of the prompt with and without the letter: for byte-level BPE
    after `答案：` that is the bare `A`; for SentencePiece it is the un-prefixed piece (the
    reference scripts get the same id from `"：A"`); for MMLU it is ` A`.
    """
    tail = prompt[-16:]
    base = tokenizer.encode(tail, add_special_tokens=False)
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(tail + sep + letter, add_special_tokens=False)
        n = _lcp(base, full)
        if n < len(base) or n >= len(full):
            # The letter merges with the prompt's last token: score its own last token instead.
            ids.append(tokenizer.encode(sep + letter, add_special_tokens=False)[-1])
        else:
            ids.append(full[n])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer gives the letters A-D non-distinct ids {ids}")
    return ids


def _cache_arg(model: Any) -> str:
    """The name of the forward's cache argument (transformers renamed past_key_values)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def score_sequences(
    model: Any,
    seqs: Sequence[Sequence[int]],
    keep: Sequence[int],
    reduce: Callable[[int, torch.Tensor], Any],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Any = None,
    min_prefix: int = 16,
) -> list[Any]:
    """`reduce(i, logprobs)` for each sequence, where `logprobs` is the log-softmax of the model's
    next-token logits at its last `keep[i]` positions (a keep[i] x vocab tensor).

    The sequences of one call share a prompt prefix (a subject's header and shots); it is run
    once and its key/value cache reused by every batch, which makes k-shot evaluation cost about
    what zero-shot does. Suffixes are left-padded with explicit position ids, so each row sees
    exactly the positions it would alone.
    """
    import copy

    import torch

    n = len(seqs)
    results: list[Any] = [None] * n
    if n == 0:
        return results
    prefix = min(min(_lcp(seqs[0], s) for s in seqs), min(len(s) - k for s, k in zip(seqs, keep)))
    prefix = prefix if prefix >= min_prefix else 0
    cache_arg = _cache_arg(model)
    device = next(model.parameters()).device
    prefix_cache = None
    with torch.no_grad():
        if prefix:
            out = model(torch.tensor([list(seqs[0][:prefix])], device=device), use_cache=True)
            prefix_cache = out.get("cache")
            prefix_cache = out.get("past_key_values") if prefix_cache is None else prefix_cache
        order = sorted(range(n), key=lambda i: (-(len(seqs[i]) - prefix), i))
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            width = max(len(seqs[i]) - prefix for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                suffix = seqs[i][prefix:]
                ids[r, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
                mask[r, width - len(suffix) :] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0) + prefix
            kwargs: dict[str, Any] = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(rows))
                kwargs[cache_arg] = cache
                mask = torch.cat([torch.ones((len(rows), prefix), dtype=torch.long), mask], 1)
            k = max(keep[i] for i in rows)
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=k,
                use_cache=prefix_cache is not None,
                **kwargs,
            ).logits
            logprobs = torch.log_softmax(logits[:, -k:].float(), dim=-1).cpu()
            for r, i in enumerate(rows):
                results[i] = reduce(i, logprobs[r, k - keep[i] :])
            if progress is not None:
                progress.update(len(rows))
    return results


def score_letters(
    model: Any,
    seqs: Sequence[Sequence[int]],
    letter_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Per prompt: the four letters' log-probabilities, their softmax (over A-D only) and the
    probability mass the model puts on them at all (low mass = it did not get the format)."""
    import torch

    def reduce(i: int, logprobs: torch.Tensor) -> dict[str, Any]:
        lp = logprobs[-1, list(letter_ids[i])]
        probs = torch.softmax(lp, dim=-1)
        return {
            "logprobs": [round(float(x), 6) for x in lp],
            "probs": [round(float(x), 6) for x in probs],
            "mass": round(float(lp.exp().sum()), 6),
            "pred": LETTERS[int(torch.argmax(lp))],  # first max wins: deterministic
        }

    keep = [1] * len(seqs)
    return score_sequences(model, seqs, keep, reduce, batch_size, pad_id, progress)


def score_options(
    model: Any,
    seqs: Sequence[Sequence[int]],
    cont_lens: Sequence[int],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Any = None,
) -> list[float]:
    """Sum of log-probabilities of the last `cont_lens[i]` tokens of each sequence."""
    import torch

    def reduce(i: int, logprobs: torch.Tensor) -> float:
        targets = torch.tensor(seqs[i][-cont_lens[i] :], dtype=torch.long)
        picked = logprobs[:-1].gather(1, targets[:, None])
        return float(picked.sum())

    keep = [c + 1 for c in cont_lens]
    return score_sequences(model, seqs, keep, reduce, batch_size, pad_id, progress)


# --------------------------------------------------------------------------- one benchmark


@dataclass
class Encoder:
    """Prompt text -> token ids, the same way for every scorer."""

    tokenizer: Any
    chat: bool

    def text(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("chat_template=true, but the tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def ids(self, text: str) -> list[int]:
        # A rendered chat template already holds its special tokens (BOS included).
        return self.tokenizer.encode(text, add_special_tokens=not self.chat)


def _fit_prompt(
    item: Item, style: Style, pool: list[Item], shots: int, enc: Encoder, max_len: int, extra: int
) -> tuple[str, list[int], int]:
    """(text, ids, shots used): as many of the k shots as fit in max_len, dropped from the end
    (the CMMLU script drops shots too). A zero-shot prompt still too long keeps its end."""
    pool = [s for s in pool if s.id != item.id][:shots]  # never the question itself
    for k in range(len(pool), -1, -1):
        text = enc.text(build_prompt(item, style, pool[:k]))
        ids = enc.ids(text)
        if len(ids) + extra <= max_len:
            return text, ids, k
    return text, ids[len(ids) + extra - max_len :], 0


def evaluate_benchmark(
    model: Any,
    tokenizer: Any,
    bench: Benchmark,
    cfg: EvalConfig,
    max_len: int,
    out_path: Path,
    audit: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Score every item, write the predictions JSONL, return the summary.

    `audit` maps item ids to their contamination status (contaminated | partial | clean); with
    it, accuracy is also given on the clean and the contaminated items apart."""
    from tqdm.auto import tqdm

    style = pick_style(bench, cfg.style)
    enc = Encoder(tokenizer, cfg.chat_template)
    sep = "" if cfg.chat_template else style.answer_sep
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.shots and not bench.dev:
        raise DataError(f"{bench.name}: shots={cfg.shots} but the benchmark has no dev examples")
    longest = 1  # tokens the answer needs beyond the prompt
    if cfg.scoring == "loglik":
        options = {sep + o for it in bench.items for o in it.options}
        longest = 1 + max(len(tokenizer.encode(o, add_special_tokens=False)) for o in options)

    # Build every prompt first (shots dropped where too long), then score group by group:
    # items of one subject with the same number of shots share a prompt prefix.
    prompts: list[tuple[str, list[int], int]] = []
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, it in enumerate(bench.items):
        pool = bench.dev.get(it.subject, [])
        prompts.append(_fit_prompt(it, style, pool, cfg.shots, enc, max_len, longest))
        groups[(it.subject, prompts[-1][2])].append(i)

    per_item: list[dict[str, Any]] = [{} for _ in bench.items]
    total = len(bench.items) * (1 if cfg.scoring == "letter" else len(LETTERS))
    bar = tqdm(total=total, desc=f"eval {bench.name}", unit="seq", mininterval=1.0)
    letter_cache: dict[str, list[int]] = {}
    for idxs in groups.values():
        if cfg.scoring == "letter":
            seqs, lids = [], []
            for i in idxs:
                text, ids, _ = prompts[i]
                tail = text[-16:]
                if tail not in letter_cache:
                    letter_cache[tail] = letter_token_ids(tokenizer, text, sep)
                seqs.append(ids)
                lids.append(letter_cache[tail])
            for i, res in zip(idxs, score_letters(model, seqs, lids, cfg.batch_size, pad, bar)):
                probs = res.pop("probs")
                per_item[i] = {"scores": dict(zip(LETTERS, probs)), **res}
        else:
            seqs, conts, chars = [], [], []
            for i in idxs:
                text = prompts[i][0]
                ctx = enc.ids(text)
                for opt_text in bench.items[i].options:
                    cont = sep + opt_text
                    full = enc.ids(text + cont)
                    n_cont = len(full) - min(_lcp(ctx, full), len(full) - 1)
                    seqs.append(full[-max_len:])
                    conts.append(n_cont)
                    chars.append(max(1, len(cont)))
            sums = score_options(model, seqs, conts, cfg.batch_size, pad, bar)
            for j, i in enumerate(idxs):
                raw = sums[4 * j : 4 * j + 4]
                norm = [s / c for s, c in zip(raw, chars[4 * j : 4 * j + 4])]
                best = max(range(4), key=lambda c: (norm[c], -c))
                per_item[i] = {
                    "scores": dict(zip(LETTERS, (round(x, 6) for x in norm))),
                    "loglik": [round(x, 6) for x in raw],
                    "pred": LETTERS[best],
                }
    bar.close()

    rows = []
    for it, (text, ids, k), res in zip(bench.items, prompts, per_item):
        row = {
            "id": it.id,
            "subject": it.subject,
            "category": it.category,
            "shots": k,
            "prompt": text,
            "prompt_tokens": len(ids),
            **res,
            "answer": it.answer,
            "correct": res["pred"] == it.answer,
        }
        if audit is not None:
            row["contamination"] = audit.get(it.id, "unaudited")
        rows.append(row)
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = summarize(rows, bench.items)
    summary.update(
        layout=bench.layout,
        style=next(k for k, v in STYLES.items() if v == style),
        split=bench.split,
        mean_shots=round(sum(r["shots"] for r in rows) / max(1, len(rows)), 3),
        predictions=out_path.name,
    )
    if cfg.scoring == "letter" and rows:
        summary["mean_letter_mass"] = round(sum(r["mass"] for r in rows) / len(rows), 6)
    if audit is not None:
        status = [r["contamination"] for r in rows]
        summary["contamination"] = {
            "clean": _acc([r for r, st in zip(rows, status) if st in ("clean", "partial")]),
            "contaminated": _acc([r for r, st in zip(rows, status) if st == "contaminated"]),
            "partial": _acc([r for r, st in zip(rows, status) if st == "partial"]),
            "unaudited": status.count("unaudited"),
        }
    return summary


def _acc(rows: list[dict[str, Any]]) -> dict[str, Any]:
    correct = sum(r["correct"] for r in rows)
    return {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None}


def summarize(rows: list[dict[str, Any]], items: list[Item]) -> dict[str, Any]:
    """Per-subject, per-category and overall accuracy, micro and macro (see module docstring)."""
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_subject[r["subject"]].append(r)
    info = {it.subject: it for it in items}
    subjects = {}
    for name, rs in sorted(by_subject.items()):
        it = info[name]
        subjects[name] = {**_acc(rs), "name": it.name_zh or name, "category": it.category}
    categories = {}
    for cat in sorted({s["category"] for s in subjects.values() if s["category"]}):
        members = [s for s in subjects.values() if s["category"] == cat]
        cat_rows = [r for r in rows if r["category"] == cat]
        categories[cat] = {
            **_acc(cat_rows),
            "macro_accuracy": sum(s["accuracy"] for s in members) / len(members),
            "subjects": len(members),
        }
    overall = _acc(rows)
    return {
        **overall,
        "macro_accuracy": (
            sum(s["accuracy"] for s in subjects.values()) / len(subjects) if subjects else None
        ),
        "chance": 1 / len(LETTERS),
        "subjects": subjects,
        "categories": categories,
    }


# --------------------------------------------------------------------------- perplexity


def perplexity(
    model: Any, tokenizer: Any, text: str, window: int, stride: int, progress: bool = True
) -> dict[str, Any]:
    """Perplexity and bits per character of `text` with a sliding window.

    Each window of `window` tokens scores only the tokens the previous one did not, so every token
    is predicted once, with at least `window - stride` tokens of context (except at the start).
    A BOS (or EOS) token is put first so that the first character is scored too; bits per
    character = total negative log-likelihood / ln 2 / characters, comparable across tokenizers.
    """
    import torch
    from tqdm.auto import tqdm

    start_id = tokenizer.bos_token_id
    start_id = tokenizer.eos_token_id if start_id is None else start_id
    ids = tokenizer.encode(text, add_special_tokens=False)
    if start_id is not None:
        ids = [start_id, *ids]
    device = next(model.parameters()).device
    step = max(1, min(stride, window - 1))  # every scored token keeps >= 1 token of context
    nll, scored, prev_end = 0.0, 0, 1  # position 0 is never predicted
    bar = tqdm(total=len(ids) - 1, desc="perplexity", unit="tok", disable=not progress)
    with torch.no_grad():
        while prev_end < len(ids):
            end = min(window if prev_end == 1 else prev_end + step, len(ids))
            begin = max(0, end - window)
            x = torch.tensor([ids[begin:end]], device=device)
            logprobs = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
            picked = logprobs.gather(1, x[0, 1:, None])[:, 0]
            new = end - prev_end  # the tokens no earlier window scored
            nll -= float(picked[-new:].sum())
            scored += new
            bar.update(new)
            prev_end = end
    bar.close()
    return {
        "tokens": scored,
        "chars": len(text),
        "nll": nll,
        "ppl": math.exp(nll / scored) if scored else None,
        "bpc": nll / math.log(2) / len(text) if text else None,
        "tokens_per_char": round(scored / len(text), 4) if text else None,
        "window": window,
        "stride": stride,
    }


def _read_texts(path: str, max_chars: int) -> str:
    from hanlm.config import DataConfig
    from hanlm.data import load

    recs = load(DataConfig(paths=[path], dedup="none"), kind="text").train
    text = "\n\n".join(r["text"] for r in recs)
    return text[:max_chars] if max_chars else text


# --------------------------------------------------------------------------- samples


def read_prompts(path: str) -> list[dict[str, Any]]:
    """.txt: one prompt a line; JSONL: {"prompt": str} or {"messages": [...]} per line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such prompt file")
    out: list[dict[str, Any]] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            out.append({"prompt": line})
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            out.append({"messages": rec["messages"]})
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            out.append({"prompt": rec["prompt"]})
        else:
            raise DataError(f"{path}:{n}: expected {{'prompt': str}} or {{'messages': [...]}}")
    return out


def generate_samples(
    model: Any, tokenizer: Any, prompts: list[dict[str, Any]], cfg: EvalConfig
) -> list[dict[str, Any]]:
    """One generation per prompt; chat-shaped prompts (or chat_template=true) use the template."""
    import torch

    from hanlm.data.templates import stop_token_ids

    device = next(model.parameters()).device
    samples = []
    for p in prompts:
        chat = "messages" in p or cfg.chat_template
        if chat:
            messages = p.get("messages") or [{"role": "user", "content": p["prompt"]}]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            try:
                stops = stop_token_ids(tokenizer)
            except ValueError:  # a template hanlm does not know: its EOS still stops it
                stops = [tokenizer.eos_token_id]
        else:
            text = p["prompt"]
            stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
        ids = tokenizer.encode(text, add_special_tokens=not chat)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.temperature > 0,
                temperature=cfg.temperature if cfg.temperature > 0 else None,
                top_p=None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, len(ids) :].tolist()
        samples.append(
            {
                **p,
                "output": tokenizer.decode(new, skip_special_tokens=True),
                "new_tokens": len(new),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    return samples


# --------------------------------------------------------------------------- contamination


def read_audit(path: str) -> dict[str, dict[str, str]]:
    """{bench name: {item id: contaminated | partial | clean}} from `hanlm eval contamination`
    output (its contamination.json, or the directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "contamination.json"
    if not p.is_file():
        raise DataError(f"{path}: no contamination audit here (run hanlm eval contamination)")
    data = json.loads(p.read_text(encoding="utf-8"))
    out: dict[str, dict[str, str]] = {}
    try:
        for name, b in data["benchmarks"].items():
            status = dict.fromkeys(b["audited"], "clean")
            status.update(dict.fromkeys(b["partial_ids"], "partial"))
            status.update(dict.fromkeys(b["flagged"], "contaminated"))
            out[name] = status
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"{p}: not a hanlm contamination audit") from None
    return out


# --------------------------------------------------------------------------- run


def _fmt_acc(d: dict[str, Any]) -> str:
    return f"{d['accuracy']:.4f} (n={d['n']})" if d["n"] else "- (n=0)"


def _table(report: dict[str, Any]) -> str:
    lines = []
    for name, b in report["benchmarks"].items():
        lines.append(
            f"{name} ({b['split']}, {report['shots']}-shot, {report['scoring']}): accuracy"
            f" {b['accuracy']:.4f}  macro {b['macro_accuracy']:.4f}  n={b['n']}"
            f"  chance {b['chance']:.2f}  {b['seconds']:.1f}s"
        )
        for s, v in b["subjects"].items():
            lines.append(f"  {s:<24} {v['accuracy']:.4f}  n={v['n']}")
        c = b.get("contamination")
        if c:
            lines.append(
                f"  clean {_fmt_acc(c['clean'])}  contaminated {_fmt_acc(c['contaminated'])}"
                f"  (partial overlap {_fmt_acc(c['partial'])})  unaudited {c['unaudited']}"
            )
    for path, v in report["perplexity"].items():
        lines.append(
            f"perplexity {path}: ppl {v['ppl']:.3f}, bpc {v['bpc']:.4f}, {v['tokens']} tokens"
        )
    if report.get("samples"):
        lines.append(f"samples: {report['samples']['n']} -> {report['samples']['path']}")
    return "\n".join(lines)


def run(cfg: EvalConfig) -> Path:
    from hanlm.runs import Run, atomic_write_json

    if not (cfg.bench or cfg.ppl or cfg.prompts):
        raise ConfigError("nothing to evaluate: give bench=, ppl= or prompts=")
    # Read every input before loading the model, so a bad path fails in a second, not a minute.
    benches = [load_benchmark(s, cfg.split, cfg.shots, cfg.limit) for s in cfg.bench]
    if len({b.name for b in benches}) != len(benches):
        raise ConfigError(f"two benchmarks share a name: {[b.name for b in benches]}")
    audit = read_audit(cfg.contamination) if cfg.contamination else None
    texts = {p: _read_texts(p, cfg.ppl_max_chars) for p in cfg.ppl}
    prompts = read_prompts(cfg.prompts) if cfg.prompts else []

    with Run("eval", cfg, cfg.output_dir, cfg.overwrite, cfg.resume, seed=cfg.seed) as run:
        from hanlm.modeling import load_model, load_tokenizer

        t0 = time.perf_counter()
        tokenizer = load_tokenizer(cfg.model.path)
        model = load_model(cfg.model).eval()
        model_max = getattr(model.config, "max_position_embeddings", None) or 2048
        max_len = min(cfg.max_length or model_max, model_max)
        report: dict[str, Any] = {
            "model": cfg.model.path,
            "split": cfg.split,
            "shots": cfg.shots,
            "scoring": cfg.scoring,
            "chat_template": cfg.chat_template,
            "max_length": max_len,
            "load_seconds": round(time.perf_counter() - t0, 2),
            "benchmarks": {},
            "perplexity": {},
            "samples": None,
        }
        for step, bench in enumerate(benches):
            t = time.perf_counter()
            status = None if audit is None else audit.get(bench.name, {})
            out = run.dir / f"predictions-{bench.name}.jsonl"
            summary = evaluate_benchmark(model, tokenizer, bench, cfg, max_len, out, status)
            summary["seconds"] = round(time.perf_counter() - t, 2)
            report["benchmarks"][bench.name] = summary
            keys = ("accuracy", "macro_accuracy", "n", "seconds")
            run.log(step, bench=bench.name, **{k: summary[k] for k in keys})
        window = min(cfg.ppl_window, model_max)
        for path, text in texts.items():
            t = time.perf_counter()
            res = perplexity(model, tokenizer, text, window, min(cfg.ppl_stride, window))
            report["perplexity"][path] = {**res, "seconds": round(time.perf_counter() - t, 2)}
        if prompts:
            samples = generate_samples(model, tokenizer, prompts, cfg)
            with open(run.dir / "samples.jsonl", "w", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps(s, ensure_ascii=False) + "\n")
            report["samples"] = {"path": "samples.jsonl", "n": len(samples)}
        report["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(run.dir / "eval_report.json", report)
        run.finish(
            {
                **{f"{n}/accuracy": b["accuracy"] for n, b in report["benchmarks"].items()},
                **{f"ppl/{p}/bpc": v["bpc"] for p, v in report["perplexity"].items()},
                "report": "eval_report.json",
            }
        )
    print(_table(report))
    return run.dir
