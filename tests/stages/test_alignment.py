"""hanlm reward / ppo / dpo / grpo on a tiny random model: each learns what it should, fast."""

import json

import pytest

from hanlm.align.rewards import RuleConfig, build_rules, score_rules
from hanlm.config import ConfigError, load_config
from hanlm.pipeline import cli
from hanlm.runs import read_metrics, read_run
from hanlm.testing import SAMPLE_TEXT, tiny_tokenizer

# Rule reward for the RL tests: the share of answer tokens that occur in these poems. A random
# model starts near 3% (19 of 550 tokens), so the signal is dense enough to learn in a few steps.
POEMS = "".join(SAMPLE_TEXT[:4])
# Summary keys a run leaves out by its settings (the report shows what is there):
NO_WARNINGS = ("warnings",)  # written only when a judge raised one
NO_REWARD_MODEL = ("eval_rm_score", "eval_gold_score", "eval_gold_score_sem", *NO_WARNINGS)
GOOD = ["疑是地上霜。", "黄河入海流。", "处处闻啼鸟。", "Hello, world!"]
BAD = ["The quick brown fox.", "0123456789", "😀😀😀", "不亦乐乎？不亦乐乎？"]
QUESTIONS = ["床前明月光的下一句？", "白日依山尽的下一句？", "春眠不觉晓的下一句？", "Say hello."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine run faster on one thread (no OpenMP spinning)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    rows = [
        {
            "prompt": f"{QUESTIONS[i % 4]} #{i}",
            "chosen": GOOD[i % 4],
            "rejected": BAD[(i % 4 + i) % 4],
        }
        for i in range(64)
    ]
    for name, part in (("train", rows[:48]), ("valid", rows[48:])):
        (d / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8"
        )
    (d / "ptx.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in SAMPLE_TEXT * 3),
        encoding="utf-8",
    )
    return d


def _data(pref):
    return [f"data.paths=[{pref / 'train.jsonl'}]", f"data.valid_paths=[{pref / 'valid.jsonl'}]"]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_path, pref):
    from hanlm.align.reward_model import RewardConfig, run

    out = tmp_path_factory.mktemp("rm") / "out"
    cfg = load_config(
        RewardConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            *_data(pref),
            "train.max_steps=24",
            "train.lr=3e-3",
            "train.eval_steps=12",
            f"output_dir={out}",
        ],
    )
    return run(cfg)


# --------------------------------------------------------------------------- reward


def test_reward_model_learns_the_preferences_and_loads(reward_dir, summary_declared):
    s = read_run(reward_dir)["summary"]
    summary_declared(reward_dir, absent=["gold_split"])  # no gold model split off here
    assert s["accuracy"] >= 0.9 and s["reward_gap"] > s["initial_reward_gap"] + 1.0
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert any("eval_accuracy" in row for row in read_metrics(reward_dir))


def test_reward_score_one_answer_and_a_file(reward_dir, pref, capsys, tmp_path):
    assert (
        cli.main(
            ["reward", "score", str(reward_dir), "--prompt", QUESTIONS[0], "--response", GOOD[0]]
        )
        == 0
    )
    good = float(capsys.readouterr().out.strip())
    assert (
        cli.main(
            ["reward", "score", str(reward_dir), "--prompt", QUESTIONS[0], "--response", BAD[1]]
        )
        == 0
    )
    assert good > float(capsys.readouterr().out.strip())

    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"prompt": QUESTIONS[0], "response": GOOD[0]}, ensure_ascii=False) + "\n"
    )
    out = tmp_path / "scores.jsonl"
    assert cli.main(["reward", "score", str(reward_dir), f"file={answers}", f"output={out}"]) == 0
    assert abs(json.loads(out.read_text())["reward"] - good) < 1e-4
    assert cli.main(["reward", "score", str(reward_dir), f"file={pref / 'valid.jsonl'}"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 16 and all("chosen_reward" in r and "rejected_reward" in r for r in rows)
    assert "pairwise accuracy" in captured.err
    assert cli.main(["reward", "score", str(reward_dir), "--prompt", "x"]) == 2  # no response


def test_reward_score_accuracy_per_group(reward_dir, capsys, tmp_path):
    # group "kept" holds ordinary pairs, group "flipped" the same pairs with the sides swapped,
    # and one record has no meta: the per-group figures must follow the scores written out.
    rows = []
    for i in range(8):
        pair = {"prompt": QUESTIONS[i % 4], "chosen": GOOD[i % 4], "rejected": BAD[(i + 1) % 4]}
        rows.append({**pair, "meta": {"kind": "kept"}})
        swapped = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
        rows.append({**swapped, "meta": {"kind": "flipped"}})
    rows.append({"prompt": QUESTIONS[0], "chosen": GOOD[0], "rejected": BAD[1]})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    argv = ["reward", "score", str(reward_dir), f"file={pairs}", f"output={out}"]
    assert cli.main([*argv, "group_by=meta.kind"]) == 0
    err = capsys.readouterr().err
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    won = [r["chosen_reward"] > r["rejected_reward"] for r in scored]
    kept, flipped = sum(won[0:16:2]) / 8, sum(won[1:16:2]) / 8
    assert kept >= 0.75 and flipped <= 0.25  # the trained model ranks good answers first
    assert f"meta.kind=kept: {kept:.4f} over 8" in err
    assert f"meta.kind=flipped: {flipped:.4f} over 8" in err
    assert "meta.kind=(missing): " in err and " over 1" in err


# --------------------------------------------------------------------------- rule rewards


def test_builtin_and_imported_rule_rewards():
    tok = tiny_tokenizer()
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    cfg = RuleConfig(
        funcs=["length", "stop", "regex", "token_share", "hanlm.align.rewards:text_of"],
        length_min=2,
        length_max=4,
        regex="月",
        target="明月",
    )
    fns = build_rules(cfg, tok, stops)
    assert [f.__name__ for f in fns[:4]] == ["length", "stop", "regex", "token_share"]
    target = tok("明月", add_special_tokens=False)["input_ids"]
    ids = [[*target, 7, stops[0]], [7, 7]]
    comps = [[{"role": "assistant", "content": "明月光"}], "太长的一个回答"]
    assert fns[0]([], comps) == [1.0, 0.0]  # 3 characters fit [2, 4]; 7 do not
    assert fns[1]([], comps, completion_ids=ids) == [1.0, 0.0]
    assert fns[2]([], comps) == [1.0, 0.0]
    share = len(target) / (len(target) + 1)  # the stop token is not counted
    assert fns[3]([], comps, completion_ids=ids) == [pytest.approx(share), 0.0]
    total, means = score_rules(fns[:4], [1, 1, 1, 2], [], comps, ids)
    assert total == pytest.approx([3 + 2 * share, 0.0]) and means["rule_stop"] == 0.5
    for bad in (
        {"funcs": ["nope"]},
        {"funcs": ["regex"]},
        {"funcs": ["token_share"]},
        {"funcs": ["stop"], "weights": [1.0, 2.0]},
        {"funcs": ["regex"], "regex": "("},
    ):
        with pytest.raises(ConfigError):
            load_config(RuleConfig, None, list(bad.items()))
    with pytest.raises(ConfigError, match="cannot import"):
        build_rules(RuleConfig(funcs=["no_such_module_x:f"]), tok, stops)


# --------------------------------------------------------------------------- PPO


def ppo_argv(model, pref, out, *extra, rules="token_share"):
    """A short PPO-ptx run on rule rewards (4 prompts a rollout, 3 steps, checkpoints at 2):
    the argument list the torchrun and DeepSpeed tests share."""
    return [
        f"model.path={model}",
        *_data(pref),
        f"ptx_data.paths=[{pref / 'ptx.jsonl'}]",
        f"rules.funcs=[{rules}]",
        f"rules.target={POEMS}",
        "max_new_tokens=6",
        "rollout_batch=4",
        "train.batch_size=2",
        "train.grad_accum=2",
        "ppo_epochs=1",
        "ptx_coef=1.0",
        "ptx_block=16",
        "ptx_batch=2",
        "kl_target=1.0",
        "train.lr=1e-3",
        "train.max_steps=3",
        "train.save_steps=2",
        "train.eval_steps=2",
        "eval_prompts=4",
        "eval_ptx_blocks=0",
        f"output_dir={out}",
        *extra,
    ]


def _ppo(tmp, model, pref, *extra):
    from hanlm.align.ppo import PPOConfig, run

    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.path={model}",
            *_data(pref),
            "max_new_tokens=6",
            "rollout_batch=16",
            "train.batch_size=16",
            "ppo_epochs=2",
            "eval_prompts=8",
            "eval_ptx_blocks=0",
            f"output_dir={tmp}",
            *extra,
        ],
    )
    return run(cfg)


def test_ppo_raises_a_rule_reward_within_a_few_dozen_steps(
    tmp_path, tiny_model_path, pref, summary_declared
):
    out = _ppo(
        tmp_path / "ppo",
        tiny_model_path,
        pref,
        "rules.funcs=[token_share]",
        f"rules.target={POEMS}",
        "train.max_steps=20",
        "train.lr=1e-2",
        "train.eval_steps=0",
    )
    rows = [r for r in read_metrics(out) if "score" in r]
    assert len(rows) == 20
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert last > first + 0.2, (first, last)
    for key in ("kl", "entropy", "clip_frac", "value_loss", "explained_variance", "length"):
        assert key in rows[-1]
    s = read_run(out)["summary"]
    assert s["eval_score"] > s["initial_eval_score"]
    # the reward the updates raise rose over the run, and no warning says otherwise
    assert s["reward_last_quarter"] > s["reward_first_quarter"]
    assert not any("lowered its own objective" in w for w in s["warnings"])
    summary_declared(out, absent=NO_REWARD_MODEL)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).generation_config.eos_token_id


def test_ppo_ptx_term_enters_the_loss_and_resume_repeats_a_step(
    tmp_path, tiny_model_path, pref, reward_dir
):
    common = (
        f"reward_model={reward_dir}",
        "lora.enabled=true",
        "lora.r=4",
        f"ptx_data.paths=[{pref / 'ptx.jsonl'}]",
        "ptx_block=16",
        "ptx_batch=2",
        "rollout_batch=8",
        "train.batch_size=4",
        "train.grad_accum=2",
        "ppo_epochs=1",
        "kl_target=1.0",
        "train.lr=1e-3",
        "train.save_steps=2",
    )
    out = _ppo(tmp_path / "a", tiny_model_path, pref, *common, "ptx_coef=1.0", "train.max_steps=3")
    rows = read_metrics(out)
    step1 = next(r for r in rows if r["step"] == 1)
    # loss = pg_loss + 1.0 x ptx_loss (entropy_coef is 0), averaged over the micro-batches
    assert step1["loss"] == pytest.approx(step1["pg_loss"] + step1["ptx_loss"], rel=1e-5)
    assert step1["ptx_loss"] > 0 and "rm_score" in step1
    assert (out / "checkpoints" / "checkpoint-2" / "state.pt").is_file()

    plain = _ppo(tmp_path / "b", tiny_model_path, pref, *common, "ptx_coef=0", "train.max_steps=1")
    row = next(r for r in read_metrics(plain) if r["step"] == 1)
    assert "ptx_loss" not in row and row["loss"] == pytest.approx(row["pg_loss"])
    # the same seed gives the same first rollout; only the update differs
    assert row["rm_score"] == pytest.approx(step1["rm_score"]) and row["kl"] == step1["kl"]

    # resuming from step 2 repeats step 3 exactly
    _ppo(out, tiny_model_path, pref, *common, "ptx_coef=1.0", "train.max_steps=3", "resume=true")
    again = [r for r in read_metrics(out) if r["step"] == 3 and "score" in r]
    assert len(again) == 2
    for key in ("score", "kl", "pg_loss", "ptx_loss", "value_loss"):
        assert again[0][key] == pytest.approx(again[1][key], rel=1e-4, abs=1e-7), key
    assert read_run(out)["summary"]["initial_eval_score"] is not None


# A rule reward that notes which prompts each process scored (and gives nothing).
SEEN_RULE = """
import json, os


def seen(prompts, completions, completion_ids=None, **kw):
    path = os.path.join(os.environ["SEEN_DIR"], "rank" + os.environ.get("RANK", "0") + ".jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps([p[-1]["content"] for p in prompts], ensure_ascii=False) + "\\n")
    return [0.0] * len(completions)
"""


def test_ppo_data_parallel_under_torchrun(tmp_path, tiny_model_path, pref):
    """Two CPU processes (gloo): disjoint prompts, gradients averaged (the processes end with
    the same weights), one writer, and a resume that repeats the last step exactly."""
    import os
    import subprocess
    import sys

    (tmp_path / "seen_rule.py").write_text(SEEN_RULE)
    out = tmp_path / "ppo"
    argv = ppo_argv(tiny_model_path, pref, out, rules="token_share,seen_rule:seen")

    def launch(*extra, seen):
        (tmp_path / seen).mkdir()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "SEEN_DIR": str(tmp_path / seen),
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "2", "-m", "hanlm.pipeline.cli", "ppo", *argv, *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc

    proc = launch(seen="seen")
    info = read_run(out)
    s = info["summary"]
    assert info["status"] == "complete" and s["world_size"] == 2 and s["global_rollout_batch"] == 8
    assert s["weights_equal_across_processes"] is True  # false if gradients were not averaged
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # one writer: no row per process
    assert proc.stdout.count("[hanlm] ppo: held-out score") == 1
    assert proc.stdout.count("hanlm ppo: done ->") == 1
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).generation_config.eos_token_id
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # each process scored its own 4 training prompts per step; only the first evaluates
    def calls(rank):
        path = tmp_path / "seen" / f"rank{rank}.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def train(batch):
        return int(batch[0].rsplit("#", 1)[1]) < 48  # valid prompts are #48..#63

    first = [b for b in calls(0) if train(b)]
    second = calls(1)
    assert len(first) == len(second) == 3 and all(train(b) for b in second)
    held_out = [b for b in calls(0) if not train(b)]  # 4 prompts before, at step 2, at the end
    assert sum(len(b) for b in held_out) == 3 * 4
    for a, b in zip(first, second):
        assert len(a) == len(b) == 4 and not set(a) & set(b)

    # resuming from step 2 (every process's random state) repeats step 3 exactly
    launch("resume=true", seen="seen-resume")
    again = [r for r in read_metrics(out) if r["step"] == 3]
    assert len(again) == 2
    for key in ("score", "kl", "pg_loss", "ptx_loss", "value_loss", "loss"):
        assert again[0][key] == pytest.approx(again[1][key], rel=1e-6, abs=1e-9), key


def test_ppo_helpers():
    from hanlm.align.rollouts import Cycler, prompts_of

    c = Cycler(5, seed=1)
    first = c.take(7)
    state = c.state_dict()
    rest = c.take(6)
    d = Cycler(5, seed=1)
    d.load_state_dict(state)
    assert d.take(6) == rest and sorted(first[:5]) == list(range(5))
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    pref = {"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": []}
    assert prompts_of([chat, pref]) == [chat["messages"][:1], pref["prompt"]]


# --------------------------------------------------------------------------- DPO


def test_dpo_margins_rise_and_reference_logprobs_are_cached(
    tmp_path, tiny_model_path, pref, reward_dir, summary_declared
):
    from hanlm.align.dpo import DPOConfig, run

    cache = tmp_path / "cache"

    def dpo(name, *extra):
        cfg = load_config(
            DPOConfig,
            None,
            [
                f"model.path={tiny_model_path}",
                *_data(pref),
                "train.max_steps=12",
                "train.lr=1e-3",
                "train.eval_steps=6",
                "precompute_ref=true",
                f"ref_cache_dir={cache}",
                f"output_dir={tmp_path / name}",
                *extra,
            ],
        )
        return read_run(run(cfg))["summary"]

    first = dpo("one", f"gold_reward_model={reward_dir}")
    summary_declared(tmp_path / "one", absent=NO_WARNINGS)
    assert first["ref_cache"] == "miss"
    assert first["reward_margin"] > 0.05 and first["reward_accuracy"] >= 0.9
    # the start through the same path as the end: the policy is the reference, every pair a
    # tie, so chance (comparing the reference with itself through another path would give 0.0)
    assert first["initial_reward_accuracy"] == 0.5 and first["reward_accuracy_chance"] == 0.5
    # greedy held-out answers before and after, judged by the gold RM and the rule checks
    for key in ("gold_score", "distinct_answers", "defect_rate", "correct"):
        assert f"initial_eval_{key}" in first and f"eval_{key}" in first, key
    # another loss and learning rate: the reference side is the same, so the cache serves it
    second = dpo("two", "loss_type=ipo", "train.lr=5e-4")
    assert second["ref_cache"] == "hit" and second["ref_cache_dir"] == first["ref_cache_dir"]
    assert second["reward_margin"] > 0
    manifest = json.loads((tmp_path / first["ref_cache_dir"] / "manifest.json").read_text())
    assert manifest["runs"] == 2 and manifest["hits"] == 1


def test_dpo_with_lora_and_hinge_needs_no_reference_copy(tmp_path, tiny_model_path, pref):
    from hanlm.align.dpo import DPOConfig, run

    cfg = load_config(
        DPOConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            *_data(pref),
            "loss_type=hinge",
            "lora.enabled=true",
            "train.max_steps=6",
            "train.lr=5e-3",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    s = read_run(run(cfg))["summary"]
    assert s["trainable_pct"] < 50 and s["reward_margin"] > 0 and "ref_cache" not in s


def test_dpo_drops_pairs_whose_answers_are_identical(tmp_path, tiny_model_path, pref, capsys):
    from hanlm.align.dpo import DPOConfig, run

    rows = [json.loads(x) for x in (pref / "train.jsonl").read_text().splitlines()]
    rows[0]["rejected"] = rows[0]["chosen"]
    rows[1]["rejected"] = rows[1]["chosen"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = load_config(
        DPOConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            f"data.paths=[{data}]",
            "data.dedup=none",
            "train.max_steps=1",
            "eval_prompts=0",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    out = run(cfg)
    assert read_run(out)["data"]["dropped_identical"] == 2
    assert (
        "dropped 2 pairs whose chosen and rejected answers are identical" in capsys.readouterr().err
    )


# --------------------------------------------------------------------------- GRPO


def test_grpo_raises_a_builtin_rule_reward(
    tmp_path, tiny_model_path, pref, reward_dir, summary_declared
):
    from hanlm.align.grpo import GRPOConfig, run

    cfg = load_config(
        GRPOConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            *_data(pref),
            "rules.funcs=[token_share]",
            f"rules.target={POEMS}",
            "max_new_tokens=6",
            "num_generations=4",
            "train.batch_size=16",
            "train.max_steps=30",
            "train.lr=1e-2",
            "train.scheduler=constant",
            "train.warmup_ratio=0",
            "train.logging_steps=3",
            "eval_prompts=8",
            f"gold_reward_model={reward_dir}",
            f"output_dir={tmp_path / 'g'}",
        ],
    )
    out = run(cfg)
    s = read_run(out)["summary"]
    assert s["last_train_reward"] > s["first_train_reward"] + 0.2
    summary_declared(out, absent=("eval_rm_score", *NO_WARNINGS))  # rule rewards only
    assert s["eval_score"] > s["initial_eval_score"]
    # judged apart from its target: the gold reward model, rule checks, collapse detectors
    assert {"initial_eval_gold_score", "eval_gold_score", "eval_distinct_answers"} <= set(s)
    assert isinstance(s["warnings"], list) and (out / "samples.jsonl").is_file()


def test_grpo_checks_whole_groups_and_a_reward(tiny_model_path):
    from hanlm.align.grpo import GRPOConfig

    with pytest.raises(ConfigError, match="must divide by num_generations=3"):
        load_config(GRPOConfig, None, ["num_generations=3", "rules.funcs=[stop]"])
    with pytest.raises(ConfigError, match="no reward"):
        load_config(GRPOConfig, None, [f"model.path={tiny_model_path}"])


def test_a_planted_hack_is_caught_by_the_judges_that_were_not_its_target(
    tmp_path, tiny_model_path, pref, reward_dir
):
    """The proxy rewards one character; PPO learns to answer every prompt with it. The gold
    reward model (trained on the preferences, not optimised) and the collapse detectors say so."""
    out = _ppo(
        tmp_path / "hack",
        tiny_model_path,
        pref,
        "rules.funcs=[token_share]",
        "rules.target=霜",
        f"gold_reward_model={reward_dir}",
        "missing_stop_penalty=0",
        "train.max_steps=20",
        "train.lr=1e-2",
        "train.eval_steps=0",
    )
    s = read_run(out)["summary"]
    assert s["eval_score"] > s["initial_eval_score"] + 0.3  # the proxy was gamed
    # a random model already answers every prompt alike; now it is the proxy's string
    assert s["eval_top_answer_share"] >= 0.5 and s["eval_shared_answer_rate"] >= 0.5
    assert s["eval_defect_looping"] > s["initial_eval_defect_looping"]
    assert any("more looping answers" in w for w in s["warnings"]), s["warnings"]
    assert "eval_gold_score" in s and "initial_eval_gold_score" in s
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"before", "after"} <= set(rows[0])
    assert "霜" in rows[0]["after"]["answer"] and "gold_score" in rows[0]["after"]


@pytest.mark.parametrize("center", [True, False])
def test_the_critic_starts_centred_on_the_shifted_scores(
    tmp_path, tiny_model_path, pref, reward_dir, center
):
    """The value model starts from the reward model, on its raw scale; the rewards are shifted
    by the SFT policy's mean score. Centring moves the critic by the mean gap at the last answer
    token, so the first rollout's value error (over every answer token, where the critic's
    values still vary) is small: under a fifth of the shift, where uncentred it is over half."""
    out = _ppo(
        tmp_path / "c",
        tiny_model_path,
        pref,
        f"reward_model={reward_dir}",
        "missing_stop_penalty=0",
        f"center_value={str(center).lower()}",
        "train.max_steps=1",
        "eval_prompts=0",
    )
    row = next(r for r in read_metrics(out) if r["step"] == 1)
    shift = read_run(out)["summary"]["score_shift"]
    assert abs(shift) > 0.5  # the reward model's scores are far from 0
    if center:
        assert abs(row["value_error"]) < 0.2 * abs(shift), row["value_error"]
    else:
        assert abs(row["value_error"]) > 0.5 * abs(shift), row["value_error"]


def test_ppo_reports_to_tensorboard_through_accelerate(tmp_path, tiny_model_path, pref, capfd):
    """PPO's own loop (not a Trainer) writes its curves with accelerate's TensorBoard tracker
    into RUN/tensorboard, and shows one progress line instead of a line of figures per step."""
    from hanlm.testing import tensorboard_scalars

    out = tmp_path / "ppo"
    argv = ppo_argv(tiny_model_path, pref, out, "train.report_to=tensorboard", "train.max_steps=3")
    assert cli.main(["ppo", *argv]) == 0
    text = capfd.readouterr().out
    assert "[ppo] step 3/3  score " in text and " lr " in text and "ETA 0s" in text
    assert "[ppo] eval at step 2/3: score " in text and "[hanlm] ppo step" not in text
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["score"]] == [1, 2, 3]
    assert len({v for _, v in scalars["pg_loss"]}) > 1  # the curve moves
    assert [s for s, _ in scalars["eval_score"]] == [0, 2, 3]  # before training, then when due
    assert [s for s, _ in scalars["lr"]] == [1, 2, 3]


def test_ppo_reports_to_wandb_and_mlflow_through_accelerate(
    offline_trackers, tiny_model_path, pref
):
    """PPO's loop logs each step and each evaluation with accelerate's wandb and mlflow trackers
    (offline), in runs named after the run directory, ended with the stage."""
    from hanlm.testing import mlflow_file_runs, wandb_offline_runs

    out = offline_trackers / "ppo-run"
    argv = ppo_argv(tiny_model_path, pref, out, "train.report_to=[wandb, mlflow]")
    assert cli.main(["ppo", *argv]) == 0
    [(rows, code)] = wandb_offline_runs(offline_trackers / "wandb-dir")
    assert code == 0
    assert [r["_step"] for r in rows if "score" in r] == [1, 2, 3]
    assert [r["_step"] for r in rows if "eval_score" in r] == [0, 2, 3]
    [(name, status, score)] = mlflow_file_runs(offline_trackers / "mlruns", "score")
    assert (name, status) == ("ppo-run", "FINISHED") and [s for s, _ in score] == [1, 2, 3]
    assert [v for _, v in score] == pytest.approx([r["score"] for r in rows if "score" in r])
