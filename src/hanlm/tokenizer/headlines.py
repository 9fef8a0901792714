"""The headline of `hanlm vocab`: tokens per Chinese character, base -> merged."""

from __future__ import annotations

from hanlm.headline import Figure, Headline, Outcome, display_name, is_num, num


def vocab(h: Headline, o: Outcome) -> None:
    s = o.summary
    reports = o.reports
    rows = (reports.get("vocab_report.json") or {}).get("eval") or {}
    for text in ("chinese_held_out", "chinese_train"):
        row = rows.get(text)
        if row and is_num((row.get("merged") or {}).get("tokens_per_char")):
            merged = row["merged"]["tokens_per_char"]
            base = (row.get("base") or {}).get("tokens_per_char")
            keys: tuple[str, ...] = (f"eval.{text}.base.tokens_per_char",) if base else ()
            keys += (f"eval.{text}.merged.tokens_per_char",)
            break
        merged, ratio = s.get(f"{text}_tokens_per_char"), s.get(f"{text}_ratio")
        if is_num(merged):
            base = merged / ratio if is_num(ratio) and ratio else None
            keys = (f"{text}_tokens_per_char",) + ((f"{text}_ratio",) if base else ())
            break
    else:
        h.verdict = "no tokenizer figures in this stage's summary"
        return
    base = base if is_num(base) else None
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
            f"new tokenizer: {num(merged)} tokens per Chinese character of {where} text"
            " (no base tokenizer to compare)"
        )
    en = (rows.get("english") or {}) if rows else {}
    en_m = (en.get("merged") or {}).get("tokens_per_char", s.get("english_tokens_per_char"))
    en_b = (en.get("base") or {}).get("tokens_per_char")
    if not is_num(en_b) and is_num(en_m) and is_num(s.get("english_ratio")):
        en_b = en_m / s["english_ratio"] if s["english_ratio"] else None
    if is_num(en_m):
        h.figures.append(Figure(display_name("english_tokens_per_char"), en_m, en_b))
        if is_num(en_b) and en_b and en_m / en_b > 1.1:
            more = en_m / en_b - 1
            h.warnings.append(f"English text takes {more:.0%} more tokens than with the base")
