"""The judges that are not the optimisation target: rule checks and collapse detectors."""

import gzip
import json

from hanlm import ASSETS
from hanlm.align.checks import (
    check_answer,
    collapse,
    judge_answers,
    reward_trend,
    trend_warnings,
    warnings_for,
)


def _pairs(n=1500):
    rows = []
    for split in ("valid", "train"):
        with gzip.open(ASSETS / f"preference.{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows[:n]


def test_rule_checks_find_the_typed_defects_of_the_embedded_preferences():
    """Each rejected answer's defect (meta.defect) is found; the chosen answers pass."""
    pairs = _pairs()
    found = wrong_chosen = 0
    for r in pairs:
        want = {"other_poem": "off_topic", "other_idiom": "off_topic"}.get(
            r["meta"]["defect"], r["meta"]["defect"]
        )
        bad = check_answer(r["prompt"], r["rejected"], r["chosen"])
        found += want in bad["defects"]
        assert not bad["correct"], r
        good = check_answer(r["prompt"], r["chosen"], r["chosen"])
        wrong_chosen += bool(good["defects"]) or not good["correct"]
    assert found / len(pairs) > 0.97, found
    assert wrong_chosen / len(pairs) < 0.005, wrong_chosen


def test_each_defect_by_hand():
    prompt, ref = "「床前明月光」的下一句是什么？", "下一句是「疑是地上霜」。"
    assert check_answer(prompt, "疑是地上霜。", ref) == {"defects": [], "correct": True}
    assert check_answer(prompt, "下一句是「床前明月光」。", ref)["defects"] == ["echo"]
    assert check_answer(prompt, "下一句是「疑是」。", ref)["defects"] == ["truncated"]
    assert check_answer(prompt, "霜上地是疑", ref)["defects"] == ["scrambled"]
    assert check_answer(prompt, "疑是疑是疑是疑是", ref)["defects"] == ["looping"]
    assert check_answer(prompt, "黄河入海流", ref)["defects"] == ["off_topic"]
    assert check_answer(prompt, "疑是地上霜", ref, stopped=False) == {
        "defects": ["no_stop"],
        "correct": True,
    }
    assert check_answer(prompt, "whatever", None)["correct"] is None


def test_collapse_detectors_see_one_answer_for_every_prompt():
    prompts = [f"问题{i}" for i in range(8)]
    varied = collapse(prompts, [f"答案{i}" for i in range(8)])
    assert varied["distinct_answers"] == 1 and varied["shared_answer_rate"] == 0
    hacked = collapse(prompts, ["下一句是一回"] * 6 + ["答案6", "答案7"])
    assert hacked["distinct_answers"] == 3 / 8
    assert hacked["top_answer_share"] == 6 / 8 and hacked["shared_answer_rate"] == 6 / 8
    # the same answer to the same prompt twice is not prompt-independent
    assert collapse(["a", "a"], ["x", "x"])["shared_answer_rate"] == 0


def test_warnings_name_over_optimisation_and_collapse():
    before = {"rm_score": 1.6, "gold_score": 0.4, "distinct_answers": 0.9, "top_answer_share": 0.05}
    after = {"rm_score": 2.6, "gold_score": 0.1, "distinct_answers": 0.15, "top_answer_share": 0.6}
    text = " ".join(warnings_for(before, after))
    assert "over-optimisation" in text and "collapse" in text and "60%" in text
    better = {"rm_score": 2.0, "gold_score": 0.6, "distinct_answers": 0.9, "top_answer_share": 0.05}
    assert warnings_for(before, better) == []


def test_a_ppo_run_that_lowers_its_own_reward_is_warned_about():
    """The rollouts' reward (score - β·KL, what PPO's updates raise) over the first and last
    quarter of the steps: a fall beyond twice its standard error is a warning; noise or a rise
    is not; a run too short to tell says nothing."""
    rising = [{"step": i, "reward": 0.1 * i + (-1) ** i * 0.05} for i in range(1, 21)]
    trend = reward_trend(rising)
    assert trend["reward_first_quarter"] < trend["reward_last_quarter"]
    assert trend_warnings(trend, ptx=True) == []
    falling = [{"step": i, "reward": 2.0 - 0.1 * i + (-1) ** i * 0.05} for i in range(1, 21)]
    (warning,) = trend_warnings(reward_trend(falling), ptx=True)
    assert warning.startswith("PPO lowered its own objective") and "ptx_coef" in warning
    assert "train.lr" in trend_warnings(reward_trend(falling), ptx=False)[0]
    noisy = [{"step": i, "reward": (-1) ** i * 1.0 - 0.01 * i} for i in range(1, 21)]
    assert trend_warnings(reward_trend(noisy), ptx=False) == []
    assert reward_trend(rising[:7]) is None
    # a resume logs the steps since its checkpoint again: each step counts once, its last row
    resumed = [*rising[:5], {"step": 3, "reward": 99.0}, *rising[2:]]
    assert reward_trend(resumed) == trend


def test_judge_answers_gives_rates():
    out = judge_answers(
        ["「床前明月光」的下一句是什么？"] * 2,
        ["疑是地上霜。", "床前明月光"],
        ["疑是地上霜。", "疑是地上霜。"],
        [True, False],
    )
    assert out["correct"] == 0.5 and out["defect_rate"] == 0.5
    assert out["defect_echo"] == 0.5 and out["defect_no_stop"] == 0.5
