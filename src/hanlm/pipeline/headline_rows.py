"""The report's headline row of each stage, from what the stage declares (`hanlm.stage.Command`):
its headline function, the summary keys that function reads and the reports it wrote.

The figures, verdict rules and readable names are in `hanlm.headline`; each command's headline
function lives in its feature package (e.g. `hanlm.train.headlines:sft`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from hanlm.headline import Headline, Outcome
from hanlm.pipeline.commands import COMMANDS
from hanlm.stage import Summary


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
    if not info:
        h.verdict = "not run"
        return h
    cmd = COMMANDS.get(command)
    if cmd is None or not cmd.headline:
        h.verdict = "no headline figure for this command"
    else:
        module, func = cmd.headline.split(":")
        summary = Summary(command, info.get("summary") or {}, cmd.summary)
        outcome = Outcome(summary, info.get("data") or {}, reports or {}, metrics or [])
        getattr(importlib.import_module(module), func)(h, outcome)
    if status != "complete":
        h.warnings.insert(0, f"the stage is {status}: these figures may be partial or missing")
        h.tone = "bad"
    return h


def load_reports(stage_dir: Path, command: str) -> dict[str, Any]:
    """The JSON reports `command` declares, read from beside its hanlm.json (unreadable ones are
    left out)."""
    cmd = COMMANDS.get(command)
    out = {}
    for name in cmd.reports if cmd else ():
        p = stage_dir / name
        if p.is_file():
            try:
                out[name] = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
    return out
