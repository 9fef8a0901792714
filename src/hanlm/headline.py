"""What a stage achieved, as the report's headline row shows it, and the readable names of
measures: shared by the report and by every feature's headline functions.

A feature's headline function (named by its `Command.headline`, e.g. `hanlm.train.headlines:sft`)
takes a `Headline` and the stage's `Outcome` (its declared `Summary`, the `data` counts of its
hanlm.json, the reports it wrote, its metrics) and adds the figure that matters before -> after,
a plain-language verdict and warnings. A verdict that claims an improvement names its judge and
says whether that judge was what the stage optimised (a proxy reward model is the target; a gold
reward model and rule checks are not). Only figures present in the summary are shown; missing
keys never fail the report.

`display_name` turns a raw key (`eval.chinese_held_out.merged.tokens_per_char`) into the name the
report shows (`Chinese tokens per character (held out)`); the raw keys stay in a details section.

Pure Python over JSON: no stage module and no model is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hanlm.stage import Summary

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


def num(v: Any) -> str:
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


def pct(v: Any) -> str:
    return f"{v:.0%}" if isinstance(v, (int, float)) and not isinstance(v, bool) else num(v)


def signed(v: float) -> str:
    return ("+" if v >= 0 else "−") + num(abs(v))


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
        f = pct if self.pct else num
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


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def pair(s: Mapping[str, Any], key: str) -> tuple[Any, Any]:
    """(initial_KEY, KEY) from a summary; each None when missing or not a number."""
    before, after = s.get(f"initial_{key}"), s.get(key)
    return (before if is_num(before) else None), (after if is_num(after) else None)


def figure(s: Mapping[str, Any], key: str, name: str = "", **kw: Any) -> Figure | None:
    before, after = pair(s, key)
    if after is None:
        return None
    keys = (f"initial_{key}", key) if before is not None else (key,)
    return Figure(name or display_name(key), after, before, keys=keys, **kw)


def band(n: Any, p: float = CHANCE) -> float:
    """Two standard errors of an accuracy at chance `p` on `n` items (0.05 when n is unknown)."""
    return 2 * math.sqrt(p * (1 - p) / n) if is_num(n) and n > 0 else 0.05


def has_warning(warnings: list[str], prefix: str) -> bool:
    return any(w.lower().startswith(prefix) for w in warnings)


@dataclass
class Outcome:
    """What a stage left behind, as its headline function reads it."""

    summary: Summary
    data: dict[str, Any] = field(default_factory=dict)  # hanlm.json's `data` (record counts)
    reports: dict[str, Any] = field(default_factory=dict)  # file name -> parsed JSON report
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows
