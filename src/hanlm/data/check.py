"""`hanlm data check`: what format is this data, how much is there, and what is wrong with it.

Dataset-format confusion is the commonest complaint of users of other toolkits, so this reads
every record the way training would, lists each bad one with file:line, and shows length
statistics and samples in the canonical form a stage will see.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any, Literal

from hanlm.config import DataConfig, opt
from hanlm.data import formats
from hanlm.data.loader import RecordReader
from hanlm.data.sources import DataError, resolve
from hanlm.modeling import load_tokenizer


@dataclass
class DataCheckConfig:
    paths: list[str] = opt([], "data files, directories, globs or saved datasets to check")
    format: Literal[
        "auto", "text", "alpaca", "sharegpt", "messages", "preference", "ranked", "unpaired"
    ] = opt("auto", "record format; auto detects it per file from the first record")
    text_field: str = opt("text", "field holding the text for the text format")
    txt_unit: Literal["line", "paragraph", "file"] = opt(
        "paragraph", "what one record of a .txt file is"
    )
    tokenizer: str = opt("", "tokenizer directory (or model dir / hub id) for token statistics")
    samples: int = opt(2, "sample records shown per file")
    show_bad: int = opt(20, "bad records listed per file (all are counted)")
    require_answer: bool = opt(True, "chat records must contain an assistant turn")


def _flatten(rec: dict[str, Any]) -> str:
    if "text" in rec:
        return rec["text"]
    return "\n".join(m["content"] for v in formats.message_lists(rec) for m in v)


def _show(rec: dict[str, Any], width: int = 160) -> str:
    def cut(s: str) -> str:
        s = s.replace("\n", "⏎")
        return s if len(s) <= width else s[: width - 1] + "…"

    if "text" in rec:
        return "    text: " + cut(rec["text"])
    lines = []
    for key, msgs in rec.items():
        if key == "ranking":
            lines.append(f"    ranking (best first, ties grouped): {msgs}")
            continue
        if key == "tools":
            lines.append(f"    tools: {', '.join(t['function']['name'] for t in msgs)}")
            continue
        if key == "label":
            lines.append(
                f"    label: {str(msgs).lower()} ({'desirable' if msgs else 'undesirable'})"
            )
            continue
        for i, side in enumerate(msgs if key == "responses" else [msgs]):
            for m in side:
                label = m["role"] if key == "messages" else f"{key}/{m['role']}"
                label = f"responses[{i}]/{m['role']}" if key == "responses" else label
                calls = [
                    c["function"]["name"]
                    + f"({json.dumps(c['function']['arguments'], ensure_ascii=False)})"
                    for c in m.get("tool_calls") or ()
                ]
                lines.append(f"    {label}: {cut(' '.join([m['content'], *calls]).strip())}")
    return "\n".join(lines)


def _dist(values: list[int]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    p95 = v[min(len(v) - 1, int(0.95 * len(v)))]
    return (
        f"min {v[0]}  mean {statistics.fmean(v):.1f}  median {v[len(v) // 2]}"
        f"  p95 {p95}  max {v[-1]}"
    )


def _load_tokenizer(name: str) -> Any:
    return load_tokenizer(name)


def check(cfg: DataCheckConfig, out: Any = print) -> dict[str, Any]:
    """Check every file; returns per-file results. Printing goes through `out`."""
    if not cfg.paths:
        raise DataError("give at least one path: hanlm data check PATH [PATH ...]")
    tok = _load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    results: dict[str, Any] = {}
    for spec in cfg.paths:
        for source in resolve(spec):
            dcfg = DataConfig(
                paths=[source],
                format=cfg.format,
                text_field=cfg.text_field,
                txt_unit=cfg.txt_unit,
                on_bad_record="skip",
                clean=False,
                normalize="none",
                min_chars=0,
                dedup="none",
            )
            reader = RecordReader(dcfg, None, cfg.require_answer)
            chars: list[int] = []
            tokens: list[int] = []
            turns: list[int] = []
            with_system = 0
            samples: list[dict[str, Any]] = []
            error = None
            try:
                for rec, _ in reader.records(source):
                    text = _flatten(rec)
                    chars.append(len(text))
                    if tok is not None:
                        tokens.append(len(tok(text, add_special_tokens=False)["input_ids"]))
                    if "messages" in rec:
                        turns.append(sum(m["role"] == "assistant" for m in rec["messages"]))
                        with_system += rec["messages"][0]["role"] == "system"
                    if len(samples) < cfg.samples:
                        samples.append(rec)
            except DataError as e:  # e.g. an empty file, a wrong kind, unreadable bytes
                error = str(e)
            st = reader.stats
            fmt = st.formats.get(source, cfg.format if cfg.format != "auto" else "unknown")
            how = "detected" if cfg.format == "auto" else "given"
            out(f"== {source}")
            kind = formats.kind_of(fmt) if fmt in formats.FORMATS else "?"
            out(f"format: {fmt} ({how}) -> {kind}")
            out(f"records: {st.kept} good, {st.bad} bad")
            if error:
                out(f"ERROR: {error}")
            if chars:
                out(f"characters per record: {_dist(chars)}")
                out(f"characters in all: {sum(chars):,}")
            if tokens:
                out(f"tokens per record ({cfg.tokenizer}): {_dist(tokens)}")
                out(f"tokens per character: {sum(tokens) / max(1, sum(chars)):.3f}")
            if turns:
                multi = sum(t > 1 for t in turns)
                out(f"assistant turns per record: {_dist(turns)}")
                out(f"multi-turn records: {multi}; with a system prompt: {with_system}")
            if st.bad_records:
                shown = st.bad_records[: cfg.show_bad]
                out(f"bad records ({st.bad}; first {len(shown)}):")
                for msg in shown:
                    out(f"  {msg}")
            if st.unteachable:
                shown = st.unteachable_records[: cfg.show_bad]
                out(
                    f"WARNING: {st.unteachable} well-formed records teach nothing"
                    f" (first {len(shown)}):"
                )
                for msg in shown:
                    out(f"  {msg}")
            for i, rec in enumerate(samples, 1):
                out(f"  sample {i}:")
                out(_show(rec))
            out("")
            results[source] = {
                "format": fmt,
                "good": st.kept,
                "bad": st.bad,
                "error": error,
                "bad_records": list(st.bad_records),
                "unteachable": st.unteachable,
                "chars": sum(chars),
            }
    n_bad = sum(r["bad"] for r in results.values())
    n_err = sum(1 for r in results.values() if r["error"])
    n_idle = sum(r["unteachable"] for r in results.values())
    total = sum(r["good"] for r in results.values())
    verdict = "OK" if not n_bad and not n_err else "PROBLEMS FOUND"
    idle = f" ({n_idle} of them teach nothing: see the warnings)" if n_idle else ""
    out(
        f"checked {len(results)} file(s): {total:,} good records{idle}, {n_bad} bad,"
        f" {n_err} unreadable -> {verdict}"
    )
    return results


def run(cfg: DataCheckConfig) -> int:
    results = check(cfg)
    bad = any(r["bad"] or r["error"] for r in results.values())
    return 1 if bad else 0
