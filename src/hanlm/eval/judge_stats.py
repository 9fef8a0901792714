"""The figures of `hanlm judge` from its judgments: the per-category tables (mean grade or win
rate with standard errors and counts), the pairs' combined verdicts (a win only when both orders
agree), the judge's position bias, and its agreement with other judges (a gold reward model,
people's rankings from `hanlm label`). Pure Python over the judgment records, except
`reward_scores`, which loads the gold reward model."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from hanlm.config import ModelConfig
from hanlm.generation import load_reward_model, score_conversations, trained_max_length
from hanlm.modeling import load_tokenizer

OVERALL = "overall"


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); nan below 2 values)."""
    n = len(values)
    if not n:
        return math.nan, math.nan
    m = sum(values) / n
    if n < 2:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


# --------------------------------------------------------------------------- single grades


def single_table(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {category or "overall" or "turn N": {mean, se, n, unparsed}}} of the grades."""
    grades: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    unparsed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        for group in (r["category"], OVERALL, f"turn {r['turn']}"):
            if r["score"] is None:
                unparsed[r["model"]][group] += 1
            else:
                grades[r["model"]][group].append(float(r["score"]))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model in sorted(set(grades) | set(unparsed)):
        rows = {}
        for group in sorted(set(grades[model]) | set(unparsed[model]), key=_group_order):
            m, se = mean_se(grades[model][group])
            rows[group] = {
                "mean": m,
                "se": se,
                "n": len(grades[model][group]),
                "unparsed": unparsed[model][group],
            }
        out[model] = rows
    return out


def _group_order(group: str) -> tuple[int, str]:
    return (2 if group == OVERALL else 1 if group.startswith("turn ") else 0, group)


# --------------------------------------------------------------------------- pairs


def combine(first: str | None, second: str | None) -> tuple[str | None, bool | None]:
    """(outcome, consistent) of a pair judged in both orders, each verdict already mapped to the
    models ("a", "b", "tie"; None = unparseable): a model wins only when both orders say so;
    orders that disagree make a tie (MT-bench's rule). Unparseable in either order: (None,
    None), left out of every figure."""
    if first is None or second is None:
        return None, None
    if first == second:
        return first, True
    return "tie", False


def pair_outcomes(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pairs' combined outcomes, by pair id (records of the two orders share a `pair`)."""
    by_pair: dict[str, dict[str, Any]] = {}
    for r in records:
        p = by_pair.setdefault(
            r["pair"], {"category": r["category"], "turn": r.get("turn"), "orders": {}}
        )
        p["orders"][r["order"]] = r["winner"]
    out = {}
    for pid, p in by_pair.items():
        if len(p["orders"]) < 2:
            continue  # one order still to judge (an interrupted run)
        outcome, consistent = combine(p["orders"].get("ab"), p["orders"].get("ba"))
        out[pid] = {**p, "outcome": outcome, "consistent": consistent}
    return out


def pair_table(outcomes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{category or "overall" or "turn N": {a_wins, b_wins, ties, n, win_rate (a's, ties
    counting half), se, inconsistent, position_bias, unparsed}}."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in outcomes.values():
        groups[p["category"]].append(p)
        groups[OVERALL].append(p)
        if p.get("turn"):
            groups[f"turn {p['turn']}"].append(p)
    table = {}
    for group in sorted(groups, key=_group_order):
        rows = groups[group]
        judged = [p for p in rows if p["outcome"] is not None]
        points = [{"a": 1.0, "b": 0.0, "tie": 0.5}[p["outcome"]] for p in judged]
        rate, se = mean_se(points)
        changed = sum(1 for p in judged if not p["consistent"])
        table[group] = {
            "a_wins": sum(1 for p in judged if p["outcome"] == "a"),
            "b_wins": sum(1 for p in judged if p["outcome"] == "b"),
            "ties": sum(1 for p in judged if p["outcome"] == "tie"),
            "n": len(judged),
            "win_rate": rate,
            "se": se,
            "inconsistent": changed,
            "position_bias": changed / len(judged) if judged else math.nan,
            "unparsed": len(rows) - len(judged),
        }
    return table


def first_position_share(records: Iterable[dict[str, Any]]) -> float:
    """Of the single-order verdicts that name a winner, the share that named the first shown."""
    named = [r for r in records if r.get("position") in ("first", "second")]
    if not named:
        return math.nan
    return sum(r["position"] == "first" for r in named) / len(named)


# --------------------------------------------------------------------------- agreement


def agreement(pairs: list[tuple[str | None, str]]) -> dict[str, Any]:
    """The judge's combined outcomes against another judge's preferences ("a", "b" or "tie"),
    MT-bench's way: `agreement` over the pairs where both name a winner; `agreement_with_ties`
    over every pair the judge could grade (a tie matching a tie)."""
    graded = [(j, o) for j, o in pairs if j is not None]
    strict = [(j, o) for j, o in graded if j != "tie" and o != "tie"]
    agree = sum(j == o for j, o in strict)
    return {
        "agreement": agree / len(strict) if strict else math.nan,
        "agree": agree,
        "disagree": len(strict) - agree,
        "judge_ties": sum(j == "tie" for j, _ in graded),
        "other_ties": sum(o == "tie" for _, o in graded),
        "agreement_with_ties": (
            sum(j == o for j, o in graded) / len(graded) if graded else math.nan
        ),
        "n": len(graded),
        "unparsed": len(pairs) - len(graded),
    }


def ranked_pairs(ranking: list[Any]) -> list[tuple[int, int]]:
    """(better, worse) answer indexes of a `hanlm label` ranking (tie groups, best first)."""
    groups = [g if isinstance(g, list) else [g] for g in ranking]
    return [
        (w, lose) for i, g in enumerate(groups) for h in groups[i + 1 :] for w in g for lose in h
    ]


def reward_scores(
    path: str, conversations: list[list[dict[str, str]]], batch: int = 8
) -> list[float]:
    """The gold reward model's score of each whole conversation (`hanlm reward`'s output, or any
    one-output sequence classifier), on the conversation cut to the length it was trained with."""
    model = load_reward_model(ModelConfig(path=path, dtype="float32"))
    tok = load_tokenizer(path)
    model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token
    return score_conversations(model, tok, conversations, batch, trained_max_length(path))


# --------------------------------------------------------------------------- figures


def _conversation(q: dict[str, Any], answers: list[str], turn: int) -> list[dict[str, str]]:
    out = []
    for text, ans in zip(q["turns"][:turn], answers[:turn]):
        out += [{"role": "user", "content": text}, {"role": "assistant", "content": ans}]
    return out


def gold_preferences(
    path: str, questions: list[dict[str, Any]], answers: dict[str, dict[Any, list[str]]]
) -> dict[str, str]:
    """{pair id: "a" | "b" | "tie"}: which conversation the gold reward model scores higher."""
    ids, convs = [], []
    for q in questions:
        for turn in range(1, len(q["turns"]) + 1):
            ids.append(f"{q['question_id']}/{turn}")
            for m in ("a", "b"):
                convs.append(_conversation(q, answers[m][q["question_id"]], turn))
    scores = reward_scores(path, convs)
    out = {}
    for k, pid in enumerate(ids):
        sa, sb = scores[2 * k], scores[2 * k + 1]
        out[pid] = "a" if sa > sb else "b" if sb > sa else "tie"
    return out


def figures(
    mode: str,
    questions: list[dict[str, Any]],
    answers: dict[str, dict[Any, list[str]]],
    labels: list[dict[str, Any]],
    records: list[dict[str, Any]],
    gold_reward_model: str = "",
    labels_path: str = "",
) -> dict[str, Any]:
    """judge_report.json: the tables and the trust figures."""
    report: dict[str, Any] = {"mode": mode, "judge": None, "questions": len(questions)}
    if records:
        report["judge"] = records[0]["judge"]
    singles = [r for r in records if r["kind"] == "single"]
    pairs = [r for r in records if r["kind"] == "pair" and not r["pair"].startswith("label/")]
    ranked = [r for r in records if r["kind"] == "pair" and r["pair"].startswith("label/")]
    if singles:
        report["single"] = single_table(singles)
    if pairs:
        outcomes = pair_outcomes(pairs)
        report["pairwise"] = pair_table(outcomes)
        report["first_position_share"] = first_position_share(pairs)
        if gold_reward_model:
            gold = gold_preferences(gold_reward_model, questions, answers)
            both = [(p["outcome"], gold[pid]) for pid, p in outcomes.items() if pid in gold]
            report["gold"] = {"model": gold_reward_model, **agreement(both)}
    if ranked:
        outcomes = pair_outcomes(ranked)
        people = {}
        for rec in labels:
            for w, lose in ranked_pairs(rec["ranking"]):
                people[f"label/{rec['line']}/{min(w, lose)}/{max(w, lose)}"] = (
                    "a" if w < lose else "b"
                )
        both = [(p["outcome"], people[pid]) for pid, p in outcomes.items() if pid in people]
        table = pair_table(outcomes)
        report["labels"] = {
            "path": labels_path,
            **agreement(both),
            "position_bias": table[OVERALL]["position_bias"],
            "first_position_share": first_position_share(ranked),
        }
    return report


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of the report (the keys `hanlm.eval`'s Command declares)."""
    s: dict[str, Any] = {}
    unparsed = 0
    for model, rows in (report.get("single") or {}).items():
        overall = rows[OVERALL]
        s[f"{model}/score"], s[f"{model}/score_se"] = overall["mean"], overall["se"]
        s[f"{model}/graded"] = overall["n"]
        unparsed += overall["unparsed"]
    if "pairwise" in report:
        overall = report["pairwise"][OVERALL]
        s.update(
            win_rate=overall["win_rate"],
            win_rate_se=overall["se"],
            a_wins=overall["a_wins"],
            b_wins=overall["b_wins"],
            ties=overall["ties"],
            pairs=overall["n"],
            position_bias=overall["position_bias"],
        )
        unparsed += overall["unparsed"]
    if "gold" in report:
        s["gold_agreement"], s["gold_pairs"] = report["gold"]["agreement"], report["gold"]["n"]
    if "labels" in report:
        s["label_agreement"] = report["labels"]["agreement"]
        s["label_pairs"] = report["labels"]["n"]
        s.setdefault("position_bias", report["labels"]["position_bias"])
    s["unparsed"] = unparsed
    return s


def print_report(report: dict[str, Any]) -> None:
    out = [f"[hanlm] judge: {report['judge']}"]
    if "single" in report:
        out.append(format_single(report["single"]))
    if "pairwise" in report:
        out.append(format_pairs(report["pairwise"]))
    for name in ("gold", "labels"):
        g = report.get(name)
        if g:
            out.append(
                f"agreement with {'the gold reward model' if name == 'gold' else 'people'}:"
                f" {fmt(g['agreement'])} ({g['agree']} of {g['agree'] + g['disagree']} pairs"
                f" where both name a winner; judge ties {g['judge_ties']}, other ties"
                f" {g['other_ties']}, with ties {fmt(g['agreement_with_ties'])})"
            )
    print("\n\n".join(out))


# --------------------------------------------------------------------------- printing


def fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def format_single(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [f"{'model':<8} {'category':<12} {'mean':>6} {'± se':>6} {'n':>4} {'unparsed':>8}"]
    for model, rows in table.items():
        for group, r in rows.items():
            lines.append(
                f"{model:<8} {group:<12} {fmt(r['mean']):>6} {fmt(r['se']):>6} {r['n']:>4}"
                f" {r['unparsed']:>8}"
            )
    return "\n".join(lines)


def format_pairs(table: dict[str, dict[str, Any]], title: str = "a vs b") -> str:
    head = (
        f"{title:<12} {'a wins':>6} {'b wins':>6} {'ties':>5} {'n':>4} {'a win rate':>10}"
        f" {'± se':>5} {'order changed':>13} {'unparsed':>8}"
    )
    lines = [head]
    for group, r in table.items():
        lines.append(
            f"{group:<12} {r['a_wins']:>6} {r['b_wins']:>6} {r['ties']:>5} {r['n']:>4}"
            f" {fmt(r['win_rate']):>10} {fmt(r['se']):>5}"
            f" {r['inconsistent']:>6} ({fmt(r['position_bias'])}) {r['unparsed']:>8}"
        )
    return "\n".join(lines)
