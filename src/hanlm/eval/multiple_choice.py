"""One multiple-choice benchmark scored (`hanlm eval`, `hanlm.eval.evaluate`): every item's
prompt built in the benchmark's wording and fitted to the model (shots dropped from the end where
too long; optionally inside the chat template), scored group by group (items of one subject with
the same shots share a prompt prefix) by the next-token probabilities of the letters or by each
option's likelihood per character, written as predictions, and summarised: accuracy micro and
macro, per subject and category, and per contamination group when an audit is given.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hanlm.config import ConfigError
from hanlm.data.sources import DataError
from hanlm.eval.benchmarks import LETTERS, Benchmark, Item, Style, build_prompt, pick_style
from hanlm.eval.eval_config import EvalConfig
from hanlm.eval.loglik import common_prefix_len, letter_token_ids, score_letters, score_options

AUDIT_GROUPS = ("clean", "contaminated", "partial", "too_short")


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


def _warn(message: str) -> None:
    print(f"[hanlm] warning: {message}", file=sys.stderr)


def check_dev_shots(bench: Benchmark, shots: int, strict: bool) -> dict[str, int]:
    """{subject: dev examples it has} for the subjects with fewer than `shots` (the question
    itself, in the dev split, never counts); warned about, or with `strict` an error."""
    if not shots:
        return {}
    if not bench.dev:
        raise DataError(f"{bench.name}: shots={shots} but the benchmark has no dev examples")
    short: dict[str, int] = {}
    for it in bench.items:
        pool = [s for s in bench.dev.get(it.subject, []) if s.id != it.id]
        if len(pool) < shots:
            short[it.subject] = min(short.get(it.subject, shots), len(pool))
    if short:
        listed = ", ".join(f"{s} ({n})" for s, n in sorted(short.items()))
        where = next((d[0].where.rsplit(":", 1)[0] for d in bench.dev.values() if d), "dev")
        msg = (
            f"{bench.name} ({bench.split}): shots={shots}, but {len(short)} subject(s) have fewer"
            f" dev examples: {listed} (dev split, e.g. {where})"
        )
        if strict:
            raise DataError(msg + "; lower shots=, add dev examples, or set strict_shots=false")
        _warn(msg + "; their questions get fewer shots (strict_shots=true makes this an error)")
    return short


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

    `audit` maps item ids to their contamination status (one of AUDIT_GROUPS); with it,
    accuracy is also given on each group apart."""
    style = pick_style(bench, cfg.style)
    enc = Encoder(tokenizer, cfg.chat_template)
    sep = "" if cfg.chat_template else style.answer_sep
    short_dev = check_dev_shots(bench, cfg.shots, cfg.strict_shots)
    longest = 1  # tokens the answer needs beyond the prompt
    if cfg.scoring == "loglik":
        options = {sep + o for it in bench.items for o in it.options}
        longest = 1 + max(len(tokenizer.encode(o, add_special_tokens=False)) for o in options)
    prompts, groups, too_long = _fitted_prompts(bench, cfg, style, enc, max_len, longest, short_dev)
    per_item = _score(model, tokenizer, bench, cfg, enc, sep, max_len, prompts, groups)
    rows = _rows(bench, prompts, per_item, audit)
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = summarize(rows, bench.items)
    summary.update(
        layout=bench.layout,
        style=style.name,
        split=bench.split,
        shots=cfg.shots,
        mean_shots=round(sum(r["shots"] for r in rows) / max(1, len(rows)), 3),
        min_shots=min((r["shots"] for r in rows), default=0),
        fewer_shots={
            "questions": sum(r["shots"] < cfg.shots for r in rows),
            "dev_too_small": short_dev,  # subject -> dev examples it has
            "dropped_for_length": len(too_long),
        },
        predictions=out_path.name,
    )
    if cfg.scoring == "letter" and rows:
        summary["mean_letter_mass"] = round(sum(r["mass"] for r in rows) / len(rows), 6)
    if audit is not None:
        # Only items checked and found nowhere are clean: partial overlaps and items too short
        # to check are groups of their own.
        summary["contamination"] = {
            g: _acc([r for r in rows if r["contamination"] == g]) for g in AUDIT_GROUPS
        }
        summary["contamination"]["unaudited"] = sum(r["contamination"] == "unaudited" for r in rows)
    return summary


Prompt = tuple[str, list[int], int]  # (text, ids, shots used)


def _fitted_prompts(
    bench: Benchmark,
    cfg: EvalConfig,
    style: Style,
    enc: Encoder,
    max_len: int,
    longest: int,
    short_dev: dict[str, int],
) -> tuple[list[Prompt], dict[tuple[str, int], list[int]], list[str]]:
    """Every item's prompt (shots dropped where too long, warned about or with strict_shots an
    error), the items grouped by subject and shots used (a group shares a prompt prefix), and the
    ids of the questions whose shots were dropped to fit `max_len`."""
    prompts: list[Prompt] = []
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    too_long: list[str] = []  # questions whose shots were dropped to fit max_len
    for i, it in enumerate(bench.items):
        pool = bench.dev.get(it.subject, [])
        prompts.append(_fit_prompt(it, style, pool, cfg.shots, enc, max_len, longest))
        groups[(it.subject, prompts[-1][2])].append(i)
        if prompts[-1][2] < min(cfg.shots, short_dev.get(it.subject, cfg.shots)):
            too_long.append(it.id)
    if too_long:
        msg = (
            f"{bench.name}: {len(too_long)} question(s) fit fewer than shots={cfg.shots} examples"
            f" in max_length={max_len} tokens (e.g. {too_long[0]})"
        )
        if cfg.strict_shots:
            raise DataError(msg + "; raise max_length=, lower shots=, or set strict_shots=false")
        _warn(msg + "; their last shots were dropped")
    return prompts, groups, too_long


def _score(
    model: Any,
    tokenizer: Any,
    bench: Benchmark,
    cfg: EvalConfig,
    enc: Encoder,
    sep: str,
    max_len: int,
    prompts: list[Prompt],
    groups: dict[tuple[str, int], list[int]],
) -> list[dict[str, Any]]:
    """Each item's scores and prediction, scored group by group."""
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
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
                    n_cont = len(full) - min(common_prefix_len(ctx, full), len(full) - 1)
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
    return per_item


def _rows(
    bench: Benchmark,
    prompts: list[Prompt],
    per_item: list[dict[str, Any]],
    audit: dict[str, str] | None,
) -> list[dict[str, Any]]:
    """The predictions file's rows: per question its prompt, scores, prediction and answer."""
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
    return rows


def _acc(rows: list[dict[str, Any]]) -> dict[str, Any]:
    correct = sum(r["correct"] for r in rows)
    return {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None}


def summarize(rows: list[dict[str, Any]], items: list[Item]) -> dict[str, Any]:
    """Per-subject, per-category and overall accuracy: micro (over all questions) and macro (the
    mean of the per-subject accuracies, each subject counted once)."""
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_subject[r["subject"]].append(r)
    info = {it.subject: it for it in items}
    subjects = {}
    for name, rs in sorted(by_subject.items()):
        it = info[name]
        subjects[name] = {**_acc(rs), "name": it.name_zh or name, "category": it.category}
    # A subject counts in its category and in its further groups (CMMLU's "China specific").
    member_of = {n: {info[n].category, *info[n].groups} - {""} for n in subjects}
    categories = {}
    for cat in sorted(set().union(*member_of.values())):
        members = [s for n, s in subjects.items() if cat in member_of[n]]
        cat_rows = [r for r in rows if cat in member_of[r["subject"]]]
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
