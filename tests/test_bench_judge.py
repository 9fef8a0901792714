"""benchmarks/judge_methods.py: a method's held-out answers become inputs `hanlm judge` reads
back as they were written, and the gold reward model's change is paired per prompt."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def jm():
    path = ROOT / "benchmarks" / "judge_methods.py"
    spec = importlib.util.spec_from_file_location("hanlm_judge_methods", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hanlm_judge_methods"] = mod
    spec.loader.exec_module(mod)
    return mod


def _row(prompt: str, ref: str | None, before: tuple[str, float], after: tuple[str, float]):
    side = lambda a, g: {"prompt": prompt, "answer": a, "reference": ref, "gold_score": g}  # noqa: E731
    return {"before": side(*before), "after": side(*after)}


ROWS = [
    _row("床前明月光的下一句是什么？", "疑是地上霜", ("床前明月光", -1.0), ("举头望明月", 2.0)),
    _row("画蛇添足是什么意思？", None, ("画蛇", 0.0), ("多此一举", 1.0)),
    _row("李白是哪个朝代的？", "唐", ("唐", 1.0), ("唐", 0.0)),
]


def test_the_judge_reads_the_inputs_as_written(jm, tmp_path):
    from hanlm.eval.judge import JudgeConfig, answers_from_file, load_questions

    q, a, b = jm.judge_inputs(ROWS, tmp_path)
    cfg = JudgeConfig(mode="pairwise", questions=str(q), a=str(a), b=str(b))
    questions = load_questions(cfg)
    assert [x["turns"] for x in questions] == [[r["before"]["prompt"]] for r in ROWS]
    # the reference goes to the judge where the prompt has one, and only there
    assert [x.get("reference") for x in questions] == [["疑是地上霜"], None, ["唐"]]
    after, before = answers_from_file(a, questions), answers_from_file(b, questions)
    assert [after[i] for i in range(3)] == [["举头望明月"], ["多此一举"], ["唐"]]
    assert [before[i] for i in range(3)] == [["床前明月光"], ["画蛇"], ["唐"]]


def test_the_gold_change_is_paired_per_prompt(jm):
    g = jm.gold_change(ROWS)
    assert g["before"] == pytest.approx(0.0) and g["after"] == pytest.approx(1.0)
    # differences 3, 1, -1: mean 1, sample sd 2, s.e. 2 / sqrt(3)
    assert g["change"] == pytest.approx(1.0)
    assert g["se"] == pytest.approx(2 / 3**0.5)
    assert (g["up"], g["down"]) == (2, 1)
