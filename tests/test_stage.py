"""Commands declare themselves once, in their own package, and the CLI, recipe runner and report
read that declaration: the headline reads only declared summary keys."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import pytest

import hanlm
from hanlm.pipeline import commands
from hanlm.pipeline.headline_rows import stage_headline
from hanlm.stage import Summary, UndeclaredSummaryKey, missing_summary_keys


def _declared_in() -> dict[str, str]:
    out = {}
    for m in pkgutil.iter_modules(hanlm.__path__):
        if m.ispkg:
            for cmd in getattr(importlib.import_module(f"hanlm.{m.name}"), "COMMANDS", ()):
                out[cmd.name] = m.name
    return out


def test_every_command_is_declared_by_the_package_that_runs_it():
    where = _declared_in()
    assert set(where) == set(commands.COMMANDS)
    for name, cmd in commands.COMMANDS.items():
        assert cmd.module.startswith(f"hanlm.{where[name]}."), (name, cmd.module)
        if cmd.headline:
            module, func = cmd.headline.split(":")
            assert module.startswith(f"hanlm.{where[name]}."), (name, cmd.headline)
            assert callable(getattr(importlib.import_module(module), func))
            assert cmd.summary or cmd.reports, f"{name}: a headline reads a declared summary"


def test_resumable_commands_have_a_resume_setting():
    """A recipe resumes an interrupted stage with `resume=true`: its config must have it."""
    resumable = [n for n, c in commands.COMMANDS.items() if c.resumable]
    assert {"pretrain", "sft", "ppo"} <= set(resumable)
    for name in resumable:
        fields = {f.name for f in dataclasses.fields(commands.config_class(name))}
        assert "resume" in fields, name


def test_summary_refuses_keys_its_declaration_does_not_list():
    s = Summary("sft", {"stop_rate": 0.5, "initial_stop_rate": 0.1, "steps": 3}, ("stop_rate",))
    assert s["stop_rate"] == 0.5 and s.get("initial_stop_rate") == 0.1
    assert list(s) == ["stop_rate", "initial_stop_rate"]  # undeclared keys stay out of sight
    with pytest.raises(UndeclaredSummaryKey, match="'steps'"):
        s.get("steps")
    with pytest.raises(UndeclaredSummaryKey, match="'answer_los'"):
        _ = "answer_los" in s
    pattern = Summary("eval", {"bench/accuracy": 0.3, "bench/n": 4}, ("*/accuracy",))
    assert dict(pattern) == {"bench/accuracy": 0.3}


def test_a_headline_reading_an_undeclared_key_fails(monkeypatch):
    info = {"status": "complete", "summary": {"answer_loss": 2.0, "stop_rate": 0.9}}
    assert "90%" in stage_headline("s", "sft", info).verdict
    narrowed = dataclasses.replace(commands.COMMANDS["sft"], summary=("answer_loss",))
    monkeypatch.setitem(commands.COMMANDS, "sft", narrowed)
    with pytest.raises(UndeclaredSummaryKey, match="stop_rate"):
        stage_headline("s", "sft", info)


def test_a_renamed_summary_key_is_reported_missing():
    cmd = commands.COMMANDS["sft"]
    assert missing_summary_keys(cmd, {"answer_loss": 1.0, "stop_share": 0.5}) == ["stop_rate"]
    assert missing_summary_keys(cmd, {"answer_loss": 1.0}, absent=("stop_rate",)) == []
    evaluate = commands.COMMANDS["eval"]
    assert missing_summary_keys(evaluate, {"x/accuracy": 0.25}, absent=("tools/*",)) == []
    assert missing_summary_keys(evaluate, {"x/acc": 0.25}, absent=("tools/*",)) == ["*/accuracy"]
    assert missing_summary_keys(evaluate, {"x/accuracy": 0.25}) == ["tools/*"]
