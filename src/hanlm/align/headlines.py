"""The headlines of the alignment stages: reward-model pair accuracy; PPO, GRPO and DPO (and
KTO, ORPO, SimPO) judged by the gold reward model and rule checks beside the proxy they
optimised."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hanlm.headline import (
    CHANCE,
    SCORE_TOL,
    SHARE_TOL,
    Figure,
    Headline,
    Outcome,
    band,
    display_name,
    figure,
    has_warning,
    is_num,
    num,
    pair,
    pct,
    signed,
)


def reward(h: Headline, o: Outcome) -> None:
    s = o.summary
    data = o.data
    acc = figure(s, "accuracy")
    if acc:
        h.figures.append(acc)
        n = data.get("valid_pairs")
        if acc.after > CHANCE + band(n):
            was = f", was {num(acc.before)}" if acc.before is not None else ""
            h.verdict = (
                f"ranks held-out preference pairs above chance: accuracy {num(acc.after)}"
                f" (chance 0.5{was}; pairs it did not train on)"
            )
            h.tone = "good"
        else:
            h.verdict = f"no better than chance: held-out pair accuracy {num(acc.after)} (0.5)"
            h.tone = "bad"
            h.warnings.append("the reward model ranks held-out pairs no better than chance")
    else:
        h.verdict = "no held-out pair accuracy in this stage's summary"
    gap = figure(s, "reward_gap")
    if gap:
        h.figures.append(gap)
    split = s.get("gold_split")
    if split not in (None, "", {}):
        text = (
            ", ".join(f"{k} {num(v)}" for k, v in split.items())
            if isinstance(split, dict)
            else str(split)
        )
        h.figures.append(Figure(display_name("gold_split"), text, keys=("gold_split",)))


def ppo(h: Headline, o: Outcome) -> None:
    """PPO: its summary records the final KL, and how the reward its updates raise moved over
    the run (after the proxy and gold scores)."""
    policy(h, o, o.summary.get("final_kl"))
    s = o.summary
    if is_num(s.get("reward_last_quarter")) and is_num(s.get("reward_first_quarter")):
        trend = Figure(
            "rollout reward, score - β·KL (the RL objective; first → last quarter of steps)",
            s["reward_last_quarter"],
            s["reward_first_quarter"],
            keys=("reward_first_quarter", "reward_last_quarter"),
        )
        h.figures.insert(min(2, len(h.figures)), trend)


def grpo(h: Headline, o: Outcome) -> None:
    """GRPO: the KL comes from the metrics."""
    policy(h, o, None)


def policy(h: Headline, o: Outcome, kl: Any) -> None:
    """PPO and GRPO: proxy vs gold score on held-out prompts, KL, collapse and defects."""
    s = o.summary
    metrics = o.metrics
    proxy_key = "eval_rm_score" if pair(s, "eval_rm_score")[1] is not None else "eval_score"
    proxy = figure(s, proxy_key, "proxy RM score (held out; the training target)")
    gold = figure(s, "eval_gold_score", "gold RM score (held out; not the target)")
    if not is_num(kl):
        kl = next((m["kl"] for m in reversed(metrics) if is_num(m.get("kl"))), None)
    distinct = figure(s, "eval_distinct_answers", pct=True)
    top = figure(s, "eval_top_answer_share", pct=True)
    defects = figure(s, "eval_defect_rate", "answers with a rule-detected defect", pct=True)
    correct = figure(s, "eval_correct", "correct answers (rule check; not the target)", pct=True)
    h.figures += [f for f in (proxy, gold) if f]
    if kl is not None:
        h.figures.append(Figure(display_name("final_kl"), kl, keys=("final_kl",)))
    h.figures += [f for f in (distinct, top, defects, correct) if f]
    judged(h, s, proxy, gold, kl, "proxy score")
    if h.verdict:
        return
    at_kl = f" at KL {num(kl)}" if kl is not None else ""
    for judge in (correct, defects):
        if judge and judge.before is not None:
            d = judge.after - judge.before
            better = d > SHARE_TOL if judge is correct else d < -SHARE_TOL
            worse = d < -SHARE_TOL if judge is correct else d > SHARE_TOL
            what = judge.name.split(" (")[0]
            if better:
                h.verdict = f"better on the rule checks (not the target): {what} {signed(d)}"
                h.tone = "good"
            elif worse:
                h.verdict = f"worse on the rule checks (not the target): {what} {signed(d)}"
                h.tone = "bad"
            else:
                h.verdict = f"no change on the rule checks (not the target): {what} {signed(d)}"
            h.verdict += at_kl
            break
    else:
        if proxy and proxy.before is not None:
            h.verdict = (
                f"proxy RM score (the training target) {signed(proxy.after - proxy.before)}"
                f"{at_kl}; no judge other than the target, so this does not show better answers"
            )
        else:
            h.verdict = "no held-out score in this stage's summary"
    collapse(h, distinct, top)


def judged(
    h: Headline, s: Mapping[str, Any], proxy: Figure | None, gold: Figure | None, kl: Any, what: str
) -> None:
    """The verdict from the gold judge (and the summary's warnings) when there is one."""
    own = s.get("warnings") or []
    h.warnings += [own] if isinstance(own, str) else [str(w) for w in own]
    dp = proxy.after - proxy.before if proxy and proxy.before is not None else None
    dg = gold.after - gold.before if gold and gold.before is not None else None
    at_kl = f" at KL {num(kl)}" if is_num(kl) else ""
    # Two standard errors of the difference of the two means over the held-out prompts.
    sems = [s.get(f"{p}eval_gold_score_sem") for p in ("initial_", "")]
    noise = 2 * sum(x**2 for x in sems) ** 0.5 if all(is_num(x) for x in sems) else 0.0
    fell = dg is not None and dg < -max(SCORE_TOL, noise)
    over = has_warning(h.warnings, "over-optim")
    if dp is not None and dp > SCORE_TOL and fell and not over:
        h.warnings.append(
            f"over-optimisation: the {what} rose by {num(dp)} while the gold judge fell by"
            f" {num(-dg)}"
        )
        over = True
    if over:
        both = dp is not None and dg is not None
        change = f" ({what} {signed(dp)}, gold {signed(dg)})" if both else ""
        h.verdict = f"{what} rose but the gold judge fell: over-optimisation{change}{at_kl}"
        h.tone = "bad"
    elif dg is not None:
        also = f"; {what} (the target) {signed(dp)}" if dp is not None else ""
        if abs(dg) <= noise:
            h.verdict = (
                f"no clear change on the gold judge ({signed(dg)}, within ±{num(noise)}, two"
                f" standard errors){at_kl}{also}"
            )
        elif dg > SCORE_TOL:
            h.verdict = f"better on the gold judge ({signed(dg)}; not the target){at_kl}{also}"
            h.tone = "good"
        elif dg < -SCORE_TOL:
            h.verdict = f"worse on the gold judge ({signed(dg)}; not the target){at_kl}{also}"
            h.tone = "bad"
        else:
            h.verdict = f"no change on the gold judge ({signed(dg)}){at_kl}{also}"


def collapse(h: Headline, distinct: Figure | None, top: Figure | None) -> None:
    if not has_warning(h.warnings, "collapse"):
        if distinct and distinct.before and distinct.after < 0.5 * distinct.before:
            h.warnings.append(
                f"collapse: distinct answers fell from {pct(distinct.before)} to"
                f" {pct(distinct.after)} of prompts"
            )
        elif top and top.after >= 0.5:
            h.warnings.append(f"collapse: one answer is given to {pct(top.after)} of the prompts")
    if has_warning(h.warnings, "collapse"):
        h.verdict += "; the answers collapsed"
        h.tone = "bad"


# `hanlm dpo`'s losses by the method's name
METHODS = {"sigmoid": "DPO", "ipo": "IPO", "hinge": "SLiC", "robust": "robust DPO"}


def dpo(h: Headline, o: Outcome) -> None:
    """DPO and the other preference losses of `hanlm dpo` (KTO, ORPO, SimPO)."""
    s = o.summary
    data = o.data
    loss = s.get("loss_type") or "sigmoid"
    method = METHODS.get(loss, str(loss).upper())
    acc = figure(s, "reward_accuracy")
    margin = figure(s, "reward_margin")
    gold = figure(s, "eval_gold_score", "gold RM score (held out; not the target)")
    h.figures += [f for f in (acc, margin, gold) if f]
    for key in ("eval_distinct_answers", "eval_defect_rate", "eval_correct"):
        f = figure(s, key, pct=True)
        if f:
            h.figures.append(f)
    judged(h, s, acc, gold, None, "preference accuracy")
    if not h.verdict:
        if acc is None:
            h.verdict = "no held-out preference figures in this stage's summary"
        elif acc.after > CHANCE + band(data.get("valid")):
            h.verdict = (
                f"prefers the chosen answer in {pct(acc.after)} of held-out pairs (chance 50%;"
                f" this is {method}'s own objective, so the judge is the target)"
            )
            h.tone = "good"
        else:
            h.verdict = (
                f"no better than chance: prefers the chosen answer in {pct(acc.after)} of"
                " held-out pairs (chance 50%)"
            )
            h.tone = "bad"
    collapse(h, figure(s, "eval_distinct_answers"), figure(s, "eval_top_answer_share"))
