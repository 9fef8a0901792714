"""The report's headline logic: verdicts for improved, over-optimised, collapsed and chance-level
stages, readable names, and summaries with missing or odd keys (no browser, no model)."""

from __future__ import annotations

import pytest

from hanlm.headline import display_name
from hanlm.pipeline.headline_rows import stage_headline


def head(command, summary, data=None, reports=None, metrics=None, status="complete"):
    info = {"command": command, "status": status, "summary": summary, "data": data or {}}
    return stage_headline("s", command, info, reports, metrics)


def figures(h):
    return [f.text() for f in h.figures]


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("eval.chinese_held_out.merged.tokens_per_char", "Chinese tokens per character (held out)"),
        ("chinese_held_out_tokens_per_char", "Chinese tokens per character (held out)"),
        (
            "eval.chinese_held_out.base.tokens_per_char",
            "Chinese tokens per character (held out), base tokenizer",
        ),
        ("english_ratio", "English tokens per character, merged ÷ base"),
        ("initial_eval_bpc", "bits per character (held out), before"),
        ("eval_loss", "loss (held out)"),
        ("eval_rm_score", "proxy RM score (the training target, held out)"),
        ("eval_gold_score", "gold RM score (not the target, held out)"),
        ("demo/accuracy", "demo: accuracy"),
        ("ppl//data/zh.valid.jsonl.gz/bpc", "bits per character on zh.valid.jsonl.gz"),
        ("perplexity./data/zh.valid.jsonl.gz.bpc", "bits per character on zh.valid.jsonl.gz"),
        ("benchmarks.demo.subjects.poem.accuracy", "demo · subject · poem: accuracy"),
        ("benchmarks.demo.macro_accuracy", "demo: accuracy, mean over subjects"),
        ("some_new_key", "some new key"),
    ],
)
def test_display_names(key, name):
    assert display_name(key) == name


def test_ppo_better_on_the_gold_judge_names_the_judge_and_the_kl():
    h = head(
        "ppo",
        {
            "initial_eval_rm_score": 1.64,
            "eval_rm_score": 1.90,
            "initial_eval_gold_score": 0.40,
            "eval_gold_score": 0.61,
            "final_kl": 3.1,
        },
    )
    assert h.verdict.startswith("better on the gold judge (+0.21; not the target) at KL 3.1")
    assert "(the target) +0.26" in h.verdict
    assert h.tone == "good" and h.warnings == []
    assert figures(h)[:3] == [
        "proxy RM score (held out; the training target): 1.64 → 1.9",
        "gold RM score (held out; not the target): 0.4 → 0.61",
        "KL to the reference at the end (nats): 3.1",
    ]


def test_ppo_shows_how_the_reward_its_updates_raise_moved():
    """The rollouts' reward (score - β·KL) over the first and last quarter of the steps comes
    right after the proxy and gold scores; a run too short for it (nulls) shows none."""
    s = {
        "initial_eval_rm_score": 1.64,
        "eval_rm_score": 1.90,
        "initial_eval_gold_score": 0.40,
        "eval_gold_score": 0.61,
        "final_kl": 3.1,
    }
    trend = {"reward_first_quarter": 0.33, "reward_last_quarter": 1.37}
    assert figures(head("ppo", {**s, **trend}))[2] == (
        "rollout reward, score - β·KL (the RL objective; first → last quarter of steps):"
        " 0.33 → 1.37"
    )
    short = {"reward_first_quarter": None, "reward_last_quarter": None}
    assert not any("rollout reward" in f for f in figures(head("ppo", {**s, **short})))


def test_ppo_proxy_up_gold_down_is_over_optimisation():
    summary = {
        "initial_eval_rm_score": 1.64,
        "eval_rm_score": 2.59,
        "initial_eval_gold_score": 0.40,
        "eval_gold_score": 0.10,
    }
    metrics = [{"step": 0}, {"step": 10, "kl": 2.0}, {"step": 20, "kl": 4.5}]
    h = head("ppo", summary, metrics=metrics)  # no final_kl: the last logged KL
    assert h.verdict.startswith("proxy score rose but the gold judge fell: over-optimisation")
    assert h.verdict.endswith("at KL 4.5") and h.tone == "bad"
    assert h.warnings == [
        "over-optimisation: the proxy score rose by 0.95 while the gold judge fell by 0.3"
    ]
    # the stage's own warning is shown once, not doubled by the report's
    own = "over-optimisation: the proxy score rose by 0.950 while the gold judge fell by 0.300"
    h = head("ppo", {**summary, "warnings": [own]})
    assert h.warnings == [own] and "over-optimisation" in h.verdict


def test_ppo_collapse_and_fallback_to_eval_score():
    h = head(
        "grpo",
        {
            "initial_eval_score": 0.2,
            "eval_score": 0.9,
            "initial_eval_distinct_answers": 0.5,
            "eval_distinct_answers": 0.1,
        },
    )
    assert figures(h)[0] == "proxy RM score (held out; the training target): 0.2 → 0.9"
    assert "no judge other than the target" in h.verdict
    assert h.verdict.endswith("; the answers collapsed") and h.tone == "bad"
    assert h.warnings == ["collapse: distinct answers fell from 50% to 10% of prompts"]


def test_rule_checks_judge_when_there_is_no_gold_model():
    h = head(
        "ppo",
        {
            "initial_eval_score": 0.1,
            "eval_score": 0.5,
            "initial_eval_defect_rate": 0.4,
            "eval_defect_rate": 0.12,
            "final_kl": 2.0,
        },
    )
    assert h.verdict == (
        "better on the rule checks (not the target): answers with a rule-detected defect −0.28"
        " at KL 2"
    )
    assert h.tone == "good"
    assert "answers with a rule-detected defect: 40% → 12%" in figures(h)


@pytest.mark.parametrize(
    ("accuracy", "verdict", "tone"),
    [
        (0.52, "no better than chance: held-out pair accuracy 0.52 (0.5)", "bad"),
        (0.81, "ranks held-out preference pairs above chance: accuracy 0.81", "good"),
    ],
)
def test_reward_accuracy_against_chance(accuracy, verdict, tone):
    h = head("reward", {"initial_accuracy": 0.5, "accuracy": accuracy}, {"valid_pairs": 200})
    assert h.verdict.startswith(verdict) and h.tone == tone
    assert bool(h.warnings) == (tone == "bad")


def test_reward_shows_the_gold_split():
    h = head("reward", {"accuracy": 0.8, "gold_split": {"proxy_pairs": 900, "gold_pairs": 900}})
    assert "gold split: proxy_pairs 900, gold_pairs 900" in figures(h)


def test_dpo_chance_and_gold():
    h = head("dpo", {"initial_reward_accuracy": 0.5, "reward_accuracy": 0.53}, {"valid": 100})
    assert h.verdict.startswith("no better than chance: prefers the chosen answer in 53%")
    h = head("dpo", {"initial_reward_accuracy": 0.5, "reward_accuracy": 0.8})
    assert "DPO's own objective, so the judge is the target" in h.verdict
    h = head(
        "dpo",
        {
            "initial_reward_accuracy": 0.5,
            "reward_accuracy": 0.8,
            "initial_eval_gold_score": 0.3,
            "eval_gold_score": 0.1,
        },
    )
    assert h.verdict.startswith("preference accuracy rose but the gold judge fell")


def test_eval_against_chance_and_contamination():
    report = {
        "benchmarks": {
            "demo": {
                "accuracy": 0.27,
                "n": 200,
                "chance": 0.25,
                "contamination": {
                    "clean": {"n": 197, "accuracy": 0.269},
                    "contaminated": {"n": 3, "accuracy": 0.333},
                },
            },
            "big": {"accuracy": 0.6, "n": 1000, "chance": 0.25},
        }
    }
    h = head("eval", {}, reports={"eval_report.json": report})
    assert h.verdict == (
        "demo: no better than chance (0.27 vs 0.25); big: above chance (0.6 vs 0.25)"
    )
    assert h.warnings[0].startswith("contamination: 3 of 200 demo items appear in the training")
    # without the report file: the summary's accuracies, no chance to compare with
    h = head("eval", {"demo/accuracy": 0.3})
    assert h.verdict == "demo: accuracy 0.3"


def test_vocab_from_the_summary_alone_and_pretrain_loss_fallback():
    h = head("vocab", {"chinese_held_out_tokens_per_char": 0.6, "chinese_held_out_ratio": 0.75})
    assert figures(h)[0] == "Chinese tokens per character (held out): 0.8 → 0.6 (base → merged)"
    assert h.verdict == "Chinese held-out text takes 25% fewer tokens than with the base tokenizer"
    h = head("vocab", {"chinese_held_out_tokens_per_char": 0.6})
    assert "no base tokenizer to compare" in h.verdict
    h = head("pretrain", {"initial_eval_loss": 9.0, "eval_loss": 4.0})
    assert h.verdict.startswith("predicts held-out text better: −5 loss") and h.tone == "good"


@pytest.mark.parametrize(
    "command", ["vocab", "pretrain", "sft", "reward", "ppo", "grpo", "dpo", "eval", "bake"]
)
@pytest.mark.parametrize(
    "summary",
    [
        {},
        {"eval_score": "n/a", "accuracy": None, "warnings": None, "initial_eval_gold_score": 1},
        {"eval_score": float("nan"), "final_kl": "x", "gold_split": [1, 2], "warnings": "w"},
    ],
)
def test_missing_or_odd_keys_never_fail(command, summary):
    h = head(command, summary, reports={"eval_report.json": {"benchmarks": {"x": {}}}})
    assert h.verdict


def test_not_run_and_failed_stages():
    assert stage_headline("s", "ppo", None).verdict == "not run"
    h = head("sft", {"answer_loss": 1.0}, status="failed")
    assert h.warnings[0].startswith("the stage is failed") and h.tone == "bad"


def test_a_gold_change_within_two_standard_errors_is_no_clear_change():
    s = {
        "initial_eval_rm_score": 2.04,
        "eval_rm_score": 2.50,
        "initial_eval_gold_score": 1.83,
        "eval_gold_score": 1.70,
        "initial_eval_gold_score_sem": 0.08,
        "eval_gold_score_sem": 0.06,
        "final_kl": 1.5,
    }
    h = head("ppo", s)
    assert h.verdict.startswith("no clear change on the gold judge (−0.13, within ±0.2")
    assert not any("over-optimisation" in w for w in h.warnings)
    # the same change with tight errors is over-optimisation
    h = head("ppo", {**s, "initial_eval_gold_score_sem": 0.01, "eval_gold_score_sem": 0.01})
    assert h.tone == "bad" and any("over-optimisation" in w for w in h.warnings)


def test_held_out_scores_give_the_gold_standard_error(tiny_model_path):
    from hanlm.align.rollouts import held_out_scores
    from hanlm.config import ModelConfig
    from hanlm.data.templates import stop_token_ids
    from hanlm.modeling import load_model, load_tokenizer

    def gold(prompts, texts, ids, stopped, batch_size):  # a judge with known scores
        return [float(i + 1) for i in range(len(texts))], {}

    tok = load_tokenizer(str(tiny_model_path))
    model = load_model(ModelConfig(path=str(tiny_model_path), dtype="float32"))
    prompts = [[{"role": "user", "content": q}] for q in ("一", "二", "三", "四")]
    out = held_out_scores(model, tok, prompts, stop_token_ids(tok), None, 2, gold=gold)
    assert out["gold_score"] == 2.5
    # sample std of 1..4 is sqrt(5/3); over sqrt(4) prompts
    assert abs(out["gold_score_sem"] - (5 / 3) ** 0.5 / 2) < 1e-9
