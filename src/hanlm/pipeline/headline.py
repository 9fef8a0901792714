"""What a recipe run achieved, stage by stage: the report's headline table and readable names.

`stage_headline` reads one stage's `hanlm.json` (its `summary` and `data`), the reports the stage
wrote beside it (`vocab_report.json`, `eval_report.json`, `contamination.json`) and its metrics,
and returns the figure that matters before -> after with a plain-language verdict and warnings.
A verdict that claims an improvement names its judge and says whether that judge was what the
stage optimised (a proxy reward model is the target; a gold reward model and rule checks are not).
Only figures present in the summary are shown; missing keys never fail the report.

`display_name` turns a raw key (`eval.chinese_held_out.merged.tokens_per_char`) into the name the
report shows (`Chinese tokens per character (held out)`); the raw keys stay in a details section.

Pure Python over JSON: no stage module and no model is imported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_FILES = ("vocab_report.json", "eval_report.json", "contamination.json")
CHANCE = 0.5  # a preference pair: chosen vs rejected
# Smallest change called a change when the noise is unknown: reward-model scores (logits), shares.
SCORE_TOL = 0.02
SHARE_TOL = 0.02

# --------------------------------------------------------------------------- display names

# Leaf names; `eval_` adds "(held out)" and `initial_` adds ", before" (see `display_name`).
DISPLAY_NAMES: dict[str, str] = {
    "loss": "training loss",
    "eval_loss": "loss (held out)",
    "train_loss": "training loss (mean over the run)",
    "bpc": "bits per character",
    "ppl": "perplexity",
    "tokens_per_char": "tokens per character",
    "byte_fallback_rate": "byte-fallback share",
    "chars": "characters",
    "tokens": "tokens",
    "ratio": "tokens per character, merged ÷ base",
    "vocab_size": "vocabulary size",
    "base_vocab_size": "base vocabulary size",
    "pieces_added": "pieces added to the vocabulary",
    "model_rows": "model embedding rows",
    "answer_loss": "answer loss (held-out chats)",
    "stop_rate": "stop rate (answers that end)",
    "accuracy": "pair accuracy (held out; chance 0.5)",
    "reward_gap": "reward gap chosen − rejected (held out)",
    "reward_mean": "reward mean (held out)",
    "reward_std": "reward spread (held out)",
    "score": "total reward",
    "rm_score": "proxy RM score (the training target)",
    "gold_score": "gold RM score (not the target)",
    "final_kl": "KL to the reference at the end (nats)",
    "kl": "KL to the reference (nats)",
    "kl_k3": "KL to the reference, k3 estimate (nats)",
    "beta": "KL coefficient β",
    "final_beta": "KL coefficient β at the end",
    "final_score": "total reward of the last rollouts",
    "score_shift": "score shift",
    "reward": "reward (training rollouts)",
    "mean_reward": "mean reward",
    "distinct_answers": "distinct answers (share of prompts)",
    "top_answer_share": "share of the most frequent answer",
    "shared_answer_rate": "answers shared between different prompts",
    "defect_rate": "answers with a rule-detected defect",
    "correct": "correct answers (rule check)",
    "length": "answer length (tokens)",
    "ptx_loss": "pretraining loss",
    "entropy": "policy entropy",
    "explained_variance": "value explained variance",
    "value_loss": "value loss",
    "pg_loss": "policy-gradient loss",
    "clip_frac": "clipped ratio share",
    "approx_kl": "approximate KL of the update",
    "reward_accuracy": "implicit-reward accuracy (held out; chance 0.5)",
    "reward_margin": "implicit-reward margin (held out)",
    "logp_accuracy": "log-prob preference accuracy (held out)",
    "chosen_logp": "log-prob of chosen answers",
    "rejected_logp": "log-prob of rejected answers",
    "rewards/margins": "implicit-reward margin",
    "rewards/accuracies": "implicit-reward accuracy",
    "macro_accuracy": "accuracy, mean over subjects",
    "n": "items",
    "chance": "chance accuracy",
    "contaminated": "items found in the training data",
    "steps": "steps",
    "seconds": "seconds",
    "peak_memory_mb": "peak memory (MB)",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "epoch": "epoch",
    "warnings": "warnings",
    "gold_split": "gold split",
}
_TEXTS = {
    "chinese_held_out": ("Chinese", " (held out)"),
    "chinese_train": ("Chinese", " (training text)"),
    "english": ("English", ""),
}


def _plain(word: str) -> str:
    return word.replace("_", " ")


def display_name(key: str) -> str:
    """The readable name of a measure key (summary, metrics or a flattened report key)."""
    if key in DISPLAY_NAMES:
        return DISPLAY_NAMES[key]
    if key.startswith("initial_"):
        return display_name(key[len("initial_") :]) + ", before"
    if key.startswith("eval_"):
        name = display_name(key[len("eval_") :])
        if "held out" in name:
            return name
        return f"{name[:-1]}, held out)" if name.endswith(")") else f"{name} (held out)"
    for text, (lang, where) in _TEXTS.items():  # the tokenizer report's rows
        if key.startswith(f"eval.{text}.base."):
            leaf = key[len(f"eval.{text}.base.") :]
            return f"{lang} {display_name(leaf)}{where}, base tokenizer"
        for pre in (f"eval.{text}.merged.", f"eval.{text}.", f"{text}_"):
            if key.startswith(pre):
                return f"{lang} {display_name(key[len(pre) :])}{where}"
    if key.startswith("perplexity.") and "." in key[len("perplexity.") :]:
        path, leaf = key[len("perplexity.") :].rsplit(".", 1)
        return f"{display_name(leaf)} on {Path(path).name}"
    if key.startswith("ppl/") and key.count("/") >= 2:
        path, leaf = key[len("ppl/") :].rsplit("/", 1)
        return f"{display_name(leaf)} on {Path(path).name}"
    if "/" in key and key.rsplit("/", 1)[1] in ("accuracy", "contaminated"):
        bench, leaf = key.rsplit("/", 1)
        what = "accuracy" if leaf == "accuracy" else DISPLAY_NAMES[leaf]
        return f"{bench}: {what}"
    if "." in key:
        *path, leaf = key.split(".")
        if path and path[0] == "benchmarks":
            path = path[1:]
        path = [{"subjects": "subject", "categories": "category"}.get(p, p) for p in path]
        name = "accuracy" if leaf == "accuracy" else display_name(leaf)  # not a pair accuracy
        return f"{' · '.join(_plain(p) for p in path)}: {name}"
    return _plain(key)


# --------------------------------------------------------------------------- figures


def _num(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "—" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if math.isnan(v):
        return "nan"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if a >= 0.01 or a == 0 else f"{v:.2g}"


def _pct(v: Any) -> str:
    return f"{v:.0%}" if isinstance(v, (int, float)) and not isinstance(v, bool) else _num(v)


def _signed(v: float) -> str:
    return ("+" if v >= 0 else "−") + _num(abs(v))


@dataclass
class Figure:
    """One measure before -> after (`before` None: only the end value is known)."""

    name: str
    after: Any
    before: Any = None
    pct: bool = False  # a share, shown as a percentage
    note: str = ""
    keys: tuple[str, ...] = ()  # the raw keys it was read from

    def text(self) -> str:
        f = _pct if self.pct else _num
        body = f(self.after) if self.before is None else f"{f(self.before)} → {f(self.after)}"
        return f"{self.name}: {body}" + (f" ({self.note})" if self.note else "")


@dataclass
class Headline:
    stage: str
    command: str
    status: str
    figures: list[Figure] = field(default_factory=list)
    verdict: str = ""
    tone: str = ""  # "good", "bad" or "" (neutral)
    warnings: list[str] = field(default_factory=list)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _pair(s: dict[str, Any], key: str) -> tuple[Any, Any]:
    """(initial_KEY, KEY) from a summary; each None when missing or not a number."""
    before, after = s.get(f"initial_{key}"), s.get(key)
    return (before if _is_num(before) else None), (after if _is_num(after) else None)


def _fig(s: dict[str, Any], key: str, name: str = "", **kw: Any) -> Figure | None:
    before, after = _pair(s, key)
    if after is None:
        return None
    keys = (f"initial_{key}", key) if before is not None else (key,)
    return Figure(name or display_name(key), after, before, keys=keys, **kw)


def _band(n: Any, p: float = CHANCE) -> float:
    """Two standard errors of an accuracy at chance `p` on `n` items (0.05 when n is unknown)."""
    return 2 * math.sqrt(p * (1 - p) / n) if _is_num(n) and n > 0 else 0.05


def _has(warnings: list[str], prefix: str) -> bool:
    return any(w.lower().startswith(prefix) for w in warnings)


# --------------------------------------------------------------------------- per command


def _vocab(h: Headline, s: dict[str, Any], reports: dict[str, Any]) -> None:
    rows = (reports.get("vocab_report.json") or {}).get("eval") or {}
    for text in ("chinese_held_out", "chinese_train"):
        row = rows.get(text)
        if row and _is_num((row.get("merged") or {}).get("tokens_per_char")):
            merged = row["merged"]["tokens_per_char"]
            base = (row.get("base") or {}).get("tokens_per_char")
            keys: tuple[str, ...] = (f"eval.{text}.base.tokens_per_char",) if base else ()
            keys += (f"eval.{text}.merged.tokens_per_char",)
            break
        merged, ratio = s.get(f"{text}_tokens_per_char"), s.get(f"{text}_ratio")
        if _is_num(merged):
            base = merged / ratio if _is_num(ratio) and ratio else None
            keys = (f"{text}_tokens_per_char",) + ((f"{text}_ratio",) if base else ())
            break
    else:
        h.verdict = "no tokenizer figures in this stage's summary"
        return
    base = base if _is_num(base) else None
    name = display_name(f"{text}_tokens_per_char")
    h.figures.append(Figure(name, merged, base, note="base → merged" if base else "", keys=keys))
    where = "held-out" if text == "chinese_held_out" else "training"
    if text == "chinese_train":
        h.warnings.append("measured on the training text: no held-out text was given")
    if base:
        change = merged / base - 1
        if abs(change) > 0.02:
            fewer = "fewer" if change < 0 else "more"
            h.verdict = f"Chinese {where} text takes {abs(change):.0%} {fewer} tokens than with"
            h.verdict += " the base tokenizer"
            h.tone = "good" if change < 0 else "bad"
        else:
            h.verdict = "Chinese text takes as many tokens as with the base tokenizer"
    else:
        h.verdict = (
            f"new tokenizer: {_num(merged)} tokens per Chinese character of {where} text"
            " (no base tokenizer to compare)"
        )
    en = (rows.get("english") or {}) if rows else {}
    en_m = (en.get("merged") or {}).get("tokens_per_char", s.get("english_tokens_per_char"))
    en_b = (en.get("base") or {}).get("tokens_per_char")
    if not _is_num(en_b) and _is_num(en_m) and _is_num(s.get("english_ratio")):
        en_b = en_m / s["english_ratio"] if s["english_ratio"] else None
    if _is_num(en_m):
        h.figures.append(Figure(display_name("english_tokens_per_char"), en_m, en_b))
        if _is_num(en_b) and en_b and en_m / en_b > 1.1:
            more = en_m / en_b - 1
            h.warnings.append(f"English text takes {more:.0%} more tokens than with the base")


def _pretrain(h: Headline, s: dict[str, Any]) -> None:
    fig = _fig(s, "eval_bpc")
    if fig is None:
        fig = _fig(s, "eval_loss")
    if fig is None:
        h.verdict = "no held-out figure (give validation data)"
        return
    h.figures.append(fig)
    unit = "bits per character" if "bpc" in fig.keys[-1] else "loss"
    if fig.before is None:
        h.verdict = f"held-out text: {_num(fig.after)} {unit}"
        return
    d = fig.after - fig.before
    if d < 0:
        h.verdict = (
            f"predicts held-out text better: {_signed(d)} {unit} (the training loss, measured on"
            " text it did not train on)"
        )
        h.tone = "good"
    else:
        h.verdict = f"held-out {unit} did not fall ({_signed(d)})"
        h.tone = "bad"
        h.warnings.append(f"held-out {unit} rose from {_num(fig.before)} to {_num(fig.after)}")


def _sft(h: Headline, s: dict[str, Any]) -> None:
    loss = _fig(s, "answer_loss")
    stop = _fig(s, "stop_rate", pct=True)
    h.figures += [f for f in (loss, stop) if f]
    parts = []
    if loss and loss.before is not None:
        d = loss.after - loss.before
        if d < 0:
            parts.append(
                f"predicts held-out answers better (answer loss {_signed(d)}; the training loss"
                " on unseen chats)"
            )
            h.tone = "good"
        else:
            parts.append(f"answer loss on held-out chats did not fall ({_signed(d)})")
            h.tone = "bad"
    if stop:
        was = f", was {_pct(stop.before)}" if stop.before is not None else ""
        parts.append(f"{_pct(stop.after)} of held-out answers end by themselves{was}")
        if stop.after < 0.5:
            h.warnings.append(
                f"only {_pct(stop.after)} of held-out answers stop: the rest run to the length"
                " limit"
            )
    h.verdict = "; ".join(parts) or "no held-out figures in this stage's summary"


def _reward(h: Headline, s: dict[str, Any], data: dict[str, Any]) -> None:
    acc = _fig(s, "accuracy")
    if acc:
        h.figures.append(acc)
        n = data.get("valid_pairs")
        if acc.after > CHANCE + _band(n):
            was = f", was {_num(acc.before)}" if acc.before is not None else ""
            h.verdict = (
                f"ranks held-out preference pairs above chance: accuracy {_num(acc.after)}"
                f" (chance 0.5{was}; pairs it did not train on)"
            )
            h.tone = "good"
        else:
            h.verdict = f"no better than chance: held-out pair accuracy {_num(acc.after)} (0.5)"
            h.tone = "bad"
            h.warnings.append("the reward model ranks held-out pairs no better than chance")
    else:
        h.verdict = "no held-out pair accuracy in this stage's summary"
    gap = _fig(s, "reward_gap")
    if gap:
        h.figures.append(gap)
    split = s.get("gold_split")
    if split not in (None, "", {}):
        text = (
            ", ".join(f"{k} {_num(v)}" for k, v in split.items())
            if isinstance(split, dict)
            else str(split)
        )
        h.figures.append(Figure(display_name("gold_split"), text, keys=("gold_split",)))


def _policy(h: Headline, s: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    """PPO and GRPO: proxy vs gold score on held-out prompts, KL, collapse and defects."""
    proxy_key = "eval_rm_score" if _pair(s, "eval_rm_score")[1] is not None else "eval_score"
    proxy = _fig(s, proxy_key, "proxy RM score (held out; the training target)")
    gold = _fig(s, "eval_gold_score", "gold RM score (held out; not the target)")
    kl = s.get("final_kl")
    if not _is_num(kl):
        kl = next((m["kl"] for m in reversed(metrics) if _is_num(m.get("kl"))), None)
    distinct = _fig(s, "eval_distinct_answers", pct=True)
    top = _fig(s, "eval_top_answer_share", pct=True)
    defects = _fig(s, "eval_defect_rate", "answers with a rule-detected defect", pct=True)
    correct = _fig(s, "eval_correct", "correct answers (rule check; not the target)", pct=True)
    h.figures += [f for f in (proxy, gold) if f]
    if kl is not None:
        h.figures.append(Figure(display_name("final_kl"), kl, keys=("final_kl",)))
    h.figures += [f for f in (distinct, top, defects, correct) if f]
    _judged(h, s, proxy, gold, kl, "proxy score")
    if h.verdict:
        return
    at_kl = f" at KL {_num(kl)}" if kl is not None else ""
    for judge in (correct, defects):
        if judge and judge.before is not None:
            d = judge.after - judge.before
            better = d > SHARE_TOL if judge is correct else d < -SHARE_TOL
            worse = d < -SHARE_TOL if judge is correct else d > SHARE_TOL
            what = judge.name.split(" (")[0]
            if better:
                h.verdict = f"better on the rule checks (not the target): {what} {_signed(d)}"
                h.tone = "good"
            elif worse:
                h.verdict = f"worse on the rule checks (not the target): {what} {_signed(d)}"
                h.tone = "bad"
            else:
                h.verdict = f"no change on the rule checks (not the target): {what} {_signed(d)}"
            h.verdict += at_kl
            break
    else:
        if proxy and proxy.before is not None:
            h.verdict = (
                f"proxy RM score (the training target) {_signed(proxy.after - proxy.before)}"
                f"{at_kl}; no judge other than the target, so this does not show better answers"
            )
        else:
            h.verdict = "no held-out score in this stage's summary"
    _collapse(h, distinct, top)


def _judged(
    h: Headline, s: dict[str, Any], proxy: Figure | None, gold: Figure | None, kl: Any, what: str
) -> None:
    """The verdict from the gold judge (and the summary's warnings) when there is one."""
    own = s.get("warnings") or []
    h.warnings += [own] if isinstance(own, str) else [str(w) for w in own]
    dp = proxy.after - proxy.before if proxy and proxy.before is not None else None
    dg = gold.after - gold.before if gold and gold.before is not None else None
    at_kl = f" at KL {_num(kl)}" if _is_num(kl) else ""
    # Two standard errors of the difference of the two means over the held-out prompts.
    sems = [s.get(f"{p}eval_gold_score_sem") for p in ("initial_", "")]
    noise = 2 * sum(x**2 for x in sems) ** 0.5 if all(_is_num(x) for x in sems) else 0.0
    fell = dg is not None and dg < -max(SCORE_TOL, noise)
    over = _has(h.warnings, "over-optim")
    if dp is not None and dp > SCORE_TOL and fell and not over:
        h.warnings.append(
            f"over-optimisation: the {what} rose by {_num(dp)} while the gold judge fell by"
            f" {_num(-dg)}"
        )
        over = True
    if over:
        both = dp is not None and dg is not None
        change = f" ({what} {_signed(dp)}, gold {_signed(dg)})" if both else ""
        h.verdict = f"{what} rose but the gold judge fell: over-optimisation{change}{at_kl}"
        h.tone = "bad"
    elif dg is not None:
        also = f"; {what} (the target) {_signed(dp)}" if dp is not None else ""
        if abs(dg) <= noise:
            h.verdict = (
                f"no clear change on the gold judge ({_signed(dg)}, within ±{_num(noise)}, two"
                f" standard errors){at_kl}{also}"
            )
        elif dg > SCORE_TOL:
            h.verdict = f"better on the gold judge ({_signed(dg)}; not the target){at_kl}{also}"
            h.tone = "good"
        elif dg < -SCORE_TOL:
            h.verdict = f"worse on the gold judge ({_signed(dg)}; not the target){at_kl}{also}"
            h.tone = "bad"
        else:
            h.verdict = f"no change on the gold judge ({_signed(dg)}){at_kl}{also}"


def _collapse(h: Headline, distinct: Figure | None, top: Figure | None) -> None:
    if not _has(h.warnings, "collapse"):
        if distinct and distinct.before and distinct.after < 0.5 * distinct.before:
            h.warnings.append(
                f"collapse: distinct answers fell from {_pct(distinct.before)} to"
                f" {_pct(distinct.after)} of prompts"
            )
        elif top and top.after >= 0.5:
            h.warnings.append(f"collapse: one answer is given to {_pct(top.after)} of the prompts")
    if _has(h.warnings, "collapse"):
        h.verdict += "; the answers collapsed"
        h.tone = "bad"


def _dpo(h: Headline, s: dict[str, Any], data: dict[str, Any]) -> None:
    acc = _fig(s, "reward_accuracy")
    margin = _fig(s, "reward_margin")
    gold = _fig(s, "eval_gold_score", "gold RM score (held out; not the target)")
    h.figures += [f for f in (acc, margin, gold) if f]
    for key in ("eval_distinct_answers", "eval_defect_rate", "eval_correct"):
        f = _fig(s, key, pct=True)
        if f:
            h.figures.append(f)
    _judged(h, s, acc, gold, None, "preference accuracy")
    if not h.verdict:
        if acc is None:
            h.verdict = "no held-out preference figures in this stage's summary"
        elif acc.after > CHANCE + _band(data.get("valid")):
            h.verdict = (
                f"prefers the chosen answer in {_pct(acc.after)} of held-out pairs (chance 50%;"
                " this is DPO's own objective, so the judge is the target)"
            )
            h.tone = "good"
        else:
            h.verdict = (
                f"no better than chance: prefers the chosen answer in {_pct(acc.after)} of"
                " held-out pairs (chance 50%)"
            )
            h.tone = "bad"
    _collapse(h, _fig(s, "eval_distinct_answers"), _fig(s, "eval_top_answer_share"))


def _eval(h: Headline, s: dict[str, Any], reports: dict[str, Any]) -> None:
    report = reports.get("eval_report.json") or {}
    benches = report.get("benchmarks") or {
        k[: -len("/accuracy")]: {"accuracy": v} for k, v in s.items() if k.endswith("/accuracy")
    }
    parts, tones = [], []
    for name, b in benches.items():
        acc, chance, n = b.get("accuracy"), b.get("chance"), b.get("n")
        if not _is_num(acc):
            continue
        note = ", ".join(
            x
            for x in (
                f"chance {_num(chance)}" if _is_num(chance) else "",
                f"n={n}" if _is_num(n) else "",
            )
            if x
        )
        key = f"benchmarks.{name}.accuracy" if report else f"{name}/accuracy"
        h.figures.append(Figure(f"{name} accuracy", acc, note=note, keys=(key,)))
        if _is_num(chance):
            if acc > chance + _band(n, chance):
                parts.append(f"{name}: above chance ({_num(acc)} vs {_num(chance)})")
                tones.append("good")
            else:
                parts.append(f"{name}: no better than chance ({_num(acc)} vs {_num(chance)})")
                tones.append("bad")
        else:
            parts.append(f"{name}: accuracy {_num(acc)}")
        c = b.get("contamination") or {}
        dirty, clean = c.get("contaminated") or {}, c.get("clean") or {}
        if _is_num(dirty.get("n")) and dirty["n"] > 0:
            total = n if _is_num(n) else dirty["n"] + (clean.get("n") or 0)
            h.warnings.append(
                f"contamination: {dirty['n']} of {total} {name} items appear in the training"
                f" data (accuracy {_num(clean.get('accuracy'))} on the clean items,"
                f" {_num(dirty.get('accuracy'))} on the contaminated)"
            )
            if _is_num(clean.get("accuracy")):
                h.figures.append(Figure(f"{name} accuracy on clean items", clean["accuracy"]))
    for path, v in (report.get("perplexity") or {}).items():
        if _is_num((v or {}).get("bpc")):
            h.figures.append(Figure(f"bits per character on {Path(path).name}", v["bpc"]))
    for name, v in (report.get("recite") or {}).items():  # the memorisation probe, per group
        for group, g in (v.get("groups") or {}).items():
            if _is_num(g.get("bpc")):
                label = f"{name} reference answers, {group}: bits per character (n={g['n']})"
                h.figures.append(Figure(label, g["bpc"]))
    h.verdict = "; ".join(parts) or "no benchmark accuracy in this stage's summary"
    if tones:
        h.tone = "good" if all(t == "good" for t in tones) else "bad"


def _audit(h: Headline, s: dict[str, Any], reports: dict[str, Any]) -> None:
    benches = (reports.get("contamination.json") or {}).get("benchmarks") or {
        k[: -len("/contaminated")]: {"contaminated": v}
        for k, v in s.items()
        if k.endswith("/contaminated")
    }
    found = 0
    for name, b in benches.items():
        c, items = b.get("contaminated"), b.get("items")
        if not _is_num(c):
            continue
        found += c
        of = f" of {items}" if _is_num(items) else ""
        h.figures.append(Figure(f"{name} items found in the training data", f"{c}{of}"))
        if c:
            h.warnings.append(f"contamination: {c}{of} {name} items appear in the training data")
    if not benches:
        h.verdict = "no audit figures in this stage's summary"
    elif found:
        h.verdict = f"{found} benchmark items found in the training data"
        h.tone = "bad"
    else:
        h.verdict = "no benchmark item found in the training data"
        h.tone = "good"


def stage_headline(
    stage: str,
    command: str,
    info: dict[str, Any] | None,
    reports: dict[str, Any] | None = None,
    metrics: list[dict[str, Any]] | None = None,
    status: str = "",
) -> Headline:
    """The headline row of one stage from its `hanlm.json` (`info`), reports and metrics."""
    info = info or {}
    status = status or info.get("status") or "not run"
    h = Headline(stage, command, status)
    s = info.get("summary") or {}
    if not info:
        h.verdict = "not run"
        return h
    reports, metrics, data = reports or {}, metrics or [], info.get("data") or {}
    if command == "vocab":
        _vocab(h, s, reports)
    elif command == "pretrain":
        _pretrain(h, s)
    elif command == "sft":
        _sft(h, s)
    elif command == "reward":
        _reward(h, s, data)
    elif command in ("ppo", "grpo"):
        _policy(h, s, metrics)
    elif command == "dpo":
        _dpo(h, s, data)
    elif command == "eval":
        _eval(h, s, reports)
    elif command == "eval contamination":
        _audit(h, s, reports)
    else:
        h.verdict = "no headline figure for this command"
    if status != "complete":
        h.warnings.insert(0, f"the stage is {status}: these figures may be partial or missing")
        h.tone = "bad"
    return h


def load_reports(stage_dir: Path) -> dict[str, Any]:
    """The JSON reports a stage wrote beside its hanlm.json (unreadable ones are left out)."""
    out = {}
    for name in REPORT_FILES:
        p = stage_dir / name
        if p.is_file():
            try:
                out[name] = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
    return out
