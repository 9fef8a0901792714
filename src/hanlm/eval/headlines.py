"""The headlines of `hanlm eval` (benchmark accuracy against chance, contamination) and of the
contamination audit."""

from __future__ import annotations

from pathlib import Path

from hanlm.headline import Figure, Headline, Outcome, band, is_num, num, pct


def evaluate(h: Headline, o: Outcome) -> None:
    s = o.summary
    reports = o.reports
    report = reports.get("eval_report.json") or {}
    benches = report.get("benchmarks") or {
        k[: -len("/accuracy")]: {"accuracy": v} for k, v in s.items() if k.endswith("/accuracy")
    }
    parts, tones = [], []
    for name, b in benches.items():
        acc, chance, n = b.get("accuracy"), b.get("chance"), b.get("n")
        if not is_num(acc):
            continue
        note = ", ".join(
            x
            for x in (
                f"chance {num(chance)}" if is_num(chance) else "",
                f"n={n}" if is_num(n) else "",
            )
            if x
        )
        key = f"benchmarks.{name}.accuracy" if report else f"{name}/accuracy"
        h.figures.append(Figure(f"{name} accuracy", acc, note=note, keys=(key,)))
        if is_num(chance):
            if acc > chance + band(n, chance):
                parts.append(f"{name}: above chance ({num(acc)} vs {num(chance)})")
                tones.append("good")
            else:
                parts.append(f"{name}: no better than chance ({num(acc)} vs {num(chance)})")
                tones.append("bad")
        else:
            parts.append(f"{name}: accuracy {num(acc)}")
        c = b.get("contamination") or {}
        dirty, clean = c.get("contaminated") or {}, c.get("clean") or {}
        if is_num(dirty.get("n")) and dirty["n"] > 0:
            total = n if is_num(n) else dirty["n"] + (clean.get("n") or 0)
            h.warnings.append(
                f"contamination: {dirty['n']} of {total} {name} items appear in the training"
                f" data (accuracy {num(clean.get('accuracy'))} on the clean items,"
                f" {num(dirty.get('accuracy'))} on the contaminated)"
            )
            if is_num(clean.get("accuracy")):
                h.figures.append(Figure(f"{name} accuracy on clean items", clean["accuracy"]))
    for path, v in (report.get("perplexity") or {}).items():
        if is_num((v or {}).get("bpc")):
            h.figures.append(Figure(f"bits per character on {Path(path).name}", v["bpc"]))
    for name, v in (report.get("recite") or {}).items():  # the memorisation probe, per group
        for group, g in (v.get("groups") or {}).items():
            if is_num(g.get("bpc")):
                label = f"{name} reference answers, {group}: bits per character (n={g['n']})"
                h.figures.append(Figure(label, g["bpc"]))
    _tool_use(h, report.get("tool_use") or {}, parts)
    h.verdict = "; ".join(parts) or "no benchmark accuracy in this stage's summary"
    if tones:
        h.tone = "good" if all(t == "good" for t in tones) else "bad"


TOOL_LABELS = {
    "right_tool": "calls the right tool",
    "valid_args": "call arguments valid (schema)",
    "correct_args": "call arguments equal the reference",
    "answer_uses_result": "final answer contains the tool's result",
    "no_tool_direct": "answers directly when no tool is needed",
}


def _tool_use(h: Headline, u: dict, parts: list[str]) -> None:
    """The tool-use measure: exact match against the reference calls and tool results."""
    if not u:
        return
    for key, label in TOOL_LABELS.items():
        if is_num(u.get(key)):
            n = u["n_no_tool"] if key == "no_tool_direct" else u.get("n_tool")
            label = f"tool use: {label}"
            h.figures.append(Figure(label, u[key], note=f"n={n}", keys=(f"tool_use.{key}",)))
    if is_num(u.get("malformed_calls")) and u["malformed_calls"]:
        h.warnings.append(f"tool use: {u['malformed_calls']} malformed <tool_call> blocks")
    if is_num(u.get("correct_args")):
        parts.append(
            f"tool use: right tool {num(u.get('right_tool'))}, correct arguments"
            f" {num(u['correct_args'])}, answers with the result {num(u.get('answer_uses_result'))}"
        )


def audit(h: Headline, o: Outcome) -> None:
    s = o.summary
    reports = o.reports
    benches = (reports.get("contamination.json") or {}).get("benchmarks") or {
        k[: -len("/contaminated")]: {"contaminated": v}
        for k, v in s.items()
        if k.endswith("/contaminated")
    }
    found = 0
    for name, b in benches.items():
        c, items = b.get("contaminated"), b.get("items")
        if not is_num(c):
            continue
        found += c
        of = f" of {items}" if is_num(items) else ""
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


POSITION_BIAS_WARN = 0.2  # a judge whose verdict changes with the order this often is doubtful


def judge(h: Headline, o: Outcome) -> None:
    """`hanlm judge`: mean grades, or a's win rate over b; beside them, how far to trust the
    judge (position bias, agreement with a gold reward model and with people)."""
    s = o.summary
    report = o.reports.get("judge_report.json") or {}
    parts = []
    for key in sorted(k for k in s if k.endswith("/score") and is_num(s[k])):
        model, se = key[: -len("/score")], s.get(f"{key[: -len('/score')]}/score_se")
        note = f"± {num(se)}, 1-10" if is_num(se) else "1-10"
        h.figures.append(Figure(f"{model}: judge's mean grade", s[key], note=note, keys=(key,)))
        parts.append(f"{model} {num(s[key])}")
        rows = ((report.get("single") or {}).get(model)) or {}
        for group, r in rows.items():
            if group != "overall" and is_num(r.get("mean")):
                label = f"{model} · {group}: mean grade (n={r['n']})"
                h.figures.append(Figure(label, r["mean"], note=f"± {num(r.get('se'))}"))
    if parts:
        h.verdict = "mean grade by the judge: " + ", ".join(parts)
    rate, se = s.get("win_rate"), s.get("win_rate_se")
    if is_num(rate):
        note = f"± {num(se)}; ties count half" if is_num(se) else "ties count half"
        h.figures.append(Figure("a's win rate over b (both orders agree)", rate, note=note))
        for group, r in (report.get("pairwise") or {}).items():
            if group != "overall" and is_num(r.get("win_rate")):
                label = f"{group}: a's win rate (n={r['n']})"
                h.figures.append(Figure(label, r["win_rate"], note=f"± {num(r.get('se'))}"))
        if is_num(se) and abs(rate - 0.5) > 2 * se:
            h.verdict = f"{'a' if rate > 0.5 else 'b'} judged better ({num(rate)} ± {num(se)})"
        else:
            h.verdict = f"no clear winner ({num(rate)} ± {num(se)}, within two standard errors)"
    if report.get("judge"):
        h.verdict = f"{h.verdict} (judge: {report['judge']})".strip()
    trust = []
    bias = s.get("position_bias")
    if is_num(bias):
        name = "position bias (pairs whose verdict changes with the order)"
        h.figures.append(Figure(name, bias, pct=True))
        if bias > POSITION_BIAS_WARN:
            h.warnings.append(
                f"position bias: the judge's verdict changes with the order of the answers in"
                f" {pct(bias)} of pairs; its verdicts are weak evidence"
            )
    for key, who in (("gold_agreement", "the gold reward model"), ("label_agreement", "people")):
        v = s.get(key)
        if is_num(v):
            h.figures.append(Figure(f"agreement with {who}", v, pct=True, note="chance 50%"))
            trust.append(f"agrees with {who} on {pct(v)}")
    if trust:
        h.verdict = "; ".join(x for x in (h.verdict, "judge " + ", ".join(trust)) if x)
    if is_num(s.get("unparsed")) and s["unparsed"]:
        h.warnings.append(f"{s['unparsed']} verdicts unparseable after a retry (left out)")
