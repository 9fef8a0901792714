"""hanlm dpo's other losses on a tiny random model: KTO (pairs and unpaired answers), ORPO and
SimPO run end to end, start from the loss their formula gives, and refuse data they cannot use."""

import json

import pytest

from hanlm.config import ConfigError, load_config
from hanlm.data.formats import RecordError, convert, detect
from hanlm.pipeline import cli
from hanlm.runs import read_metrics, read_run
from hanlm.testing import SAMPLE_TEXT

GOOD = ["疑是地上霜。", "黄河入海流。", "处处闻啼鸟。", "Hello, world!"]
BAD = ["The quick brown fox.", "0123456789", "😀😀😀", "不亦乐乎？不亦乐乎？"]
QUESTIONS = ["床前明月光的下一句？", "白日依山尽的下一句？", "春眠不觉晓的下一句？", "Say hello."]
NO_WARNINGS = ("warnings",)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    rows = [
        {"prompt": f"{QUESTIONS[i % 4]} #{i}", "chosen": GOOD[i % 4], "rejected": BAD[(i + 1) % 4]}
        for i in range(40)
    ]
    _write(d / "train.jsonl", rows[:32])
    _write(d / "train8.jsonl", rows[:8])  # one batch of 8: the first step sees every pair
    _write(d / "valid.jsonl", rows[32:])
    unpaired = [
        {
            "prompt": f"{QUESTIONS[i % 4]} #{i}",
            "completion": (GOOD if i % 2 else BAD)[i % 4],
            "label": bool(i % 2),
        }
        for i in range(40)
    ]
    _write(d / "unpaired.jsonl", unpaired[:32])
    _write(d / "unpaired_valid.jsonl", unpaired[32:])
    return d


def _dpo(tmp_path, model, name, *extra):
    from hanlm.align.dpo import DPOConfig, run

    cfg = load_config(
        DPOConfig,
        None,
        [
            f"model.path={model}",
            "train.max_steps=4",
            "train.batch_size=4",
            "train.lr=1e-3",
            "train.logging_steps=1",
            "train.warmup_ratio=0",
            "eval_prompts=4",
            "max_new_tokens=8",
            f"output_dir={tmp_path / name}",
            *extra,
        ],
    )
    out = run(cfg)
    return out, read_run(out)["summary"], read_metrics(out)


def _data(pref, train="train", valid="valid"):
    return [
        f"data.paths=[{pref / f'{train}.jsonl'}]",
        f"data.valid_paths=[{pref / f'{valid}.jsonl'}]",
    ]


@pytest.fixture(scope="module")
def gold(tmp_path_factory, tiny_model_path, pref):
    """A reward model to stand as the gold judge (two steps: the figures only need to exist)."""
    from hanlm.align.reward_model import RewardConfig, run

    out = tmp_path_factory.mktemp("gold") / "out"
    cfg = load_config(
        RewardConfig,
        None,
        [f"model.path={tiny_model_path}", *_data(pref), "train.max_steps=2", f"output_dir={out}"],
    )
    return run(cfg)


# --------------------------------------------------------------------------- record format


def test_unpaired_records_are_read_and_bad_ones_named():
    rec = {"prompt": "问", "completion": "答", "label": False}
    assert detect(rec) == "unpaired"
    assert convert(rec, "unpaired") == {
        "prompt": [{"role": "user", "content": "问"}],
        "completion": [{"role": "assistant", "content": "答"}],
        "label": False,
    }
    for bad, field in (
        ({"prompt": "问", "completion": "答", "label": "yes"}, "'label'"),
        ({"prompt": "问", "completion": "答", "label": 1}, "'label'"),
        ({"prompt": "问", "label": True}, "'completion'"),
        ({"completion": "答", "label": True}, "'prompt'"),
        ({"prompt": "问", "completion": "", "label": True}, "'completion'"),
    ):
        with pytest.raises(RecordError, match=field):
            convert(bad, "unpaired")


def test_data_check_reads_unpaired_records(tmp_path, capsys):
    rows = [
        {"prompt": "床前明月光的下一句？", "completion": "疑是地上霜。", "label": True},
        {"prompt": "问", "completion": "答", "label": "yes"},
    ]
    path = _write(tmp_path / "u.jsonl", rows)
    assert cli.main(["data", "check", str(path)]) != 0  # one bad record
    out = capsys.readouterr().out
    assert "format: unpaired (detected) -> unpaired" in out
    assert "label: true (desirable)" in out
    assert f"{path}:2: field 'label': expected true" in out


# --------------------------------------------------------------------------- first losses


def _answer_logps(model, tok, rows):
    """Per-token mean log-prob of each row's chosen and rejected answer, and the mean token NLL
    of the chosen sequences, the way trl's ORPO and CPO trainers tokenize them: the chat template
    as text, BOS before the prompt, the answer's text continuing it, EOS after."""
    import torch

    means, nll_sum, nll_n = [], 0.0, 0
    with torch.no_grad():
        for r in rows:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            pair = []
            for side in ("chosen", "rejected"):
                full = tok.apply_chat_template(
                    [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r[side]},
                    ],
                    tokenize=False,
                )
                p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                ids = [
                    tok.bos_token_id,
                    *tok(full, add_special_tokens=False)["input_ids"],
                    tok.eos_token_id,
                ]
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
                token = logp[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
                pair.append(float(token[len(p_ids) :].mean()))  # answer tokens, EOS included
                if side == "chosen":
                    nll_sum, nll_n = nll_sum - float(token.sum()), nll_n + len(ids) - 1
            means.append(pair)
    return means, nll_sum / nll_n


def _formula(loss, model_dir, pref, beta=0.1, gamma=0.5):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(x) for x in (pref / "train8.jsonl").read_text("utf-8").splitlines()]
    means, nll = _answer_logps(model, tok, rows)
    c, r = torch.tensor([m[0] for m in means]), torch.tensor([m[1] for m in means])
    if loss == "simpo":  # -log σ(β(mean log p(y_w) - mean log p(y_l)) - γ)
        return float(-F.logsigmoid(beta * (c - r) - gamma).mean())
    # ORPO: NLL of the chosen sequence - λ log σ(log odds(y_w) - log odds(y_l))
    log_odds = (c - r) - (torch.log1p(-c.exp()) - torch.log1p(-r.exp()))
    return nll - beta * float(F.logsigmoid(log_odds).mean())


# The first training step's loss on the tiny fp32 model (test preset, seed 0) and these 8 pairs,
# one batch: computed once and pinned. KTO's is its formula's value at the start exactly: the
# policy is the reference, so every log-ratio and the KL estimate are 0 and each answer's loss is
# 1 - σ(0) = 0.5.
FIRST_LOSS = {"kto": 0.5, "orpo": 6.353423, "simpo": 0.972630}


@pytest.mark.parametrize("loss", ["kto", "orpo", "simpo"])
def test_each_loss_runs_judged_by_gold_from_its_pinned_first_loss(
    loss, tmp_path, tiny_model_path, pref, gold, summary_declared, capsys
):
    from hanlm.pipeline.headline_rows import stage_headline

    out, s, metrics = _dpo(
        tmp_path,
        tiny_model_path,
        loss,
        f"loss_type={loss}",
        "train.batch_size=8",
        *_data(pref, "train8"),
        f"gold_reward_model={gold}",
    )
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[0] == pytest.approx(FIRST_LOSS[loss], abs=1e-4)
    if loss != "kto":  # and recomputed from the formula, apart from trl's loss code
        assert losses[0] == pytest.approx(_formula(loss, tiny_model_path, pref), abs=1e-4)
    assert losses[-1] < losses[0]
    summary_declared(out, absent=NO_WARNINGS)
    assert s["initial_reward_accuracy"] == 0.5 and s["reward_accuracy"] > 0.5
    # judged by the gold reward model like DPO: before and after, in the headline
    assert {"initial_eval_gold_score", "eval_gold_score", "eval_gold_score_sem"} <= set(s)
    h = stage_headline(loss, "dpo", read_run(out), metrics=metrics)
    assert "gold judge" in h.verdict
    assert any(f.name.startswith("gold RM score") for f in h.figures)
    text = capsys.readouterr()
    assert "trl.experimental" not in text.out + text.err  # trl's notice stays out
    if loss == "kto":
        assert "8 preference pairs -> 16 unpaired answers (chosen -> label true" in text.out
    info = read_run(out)
    assert info["config"]["loss_type"] == loss


@pytest.mark.parametrize("loss", ["kto", "orpo", "simpo"])
def test_each_loss_trains_lora_adapters_only(loss, tmp_path, tiny_model_path, pref):
    """With LoRA: only the adapters train (KTO's reference is the adapter disabled; ORPO and SimPO
    have none), the loss falls, and the merged model differs from the base in the adapted
    projections only."""
    import torch
    from transformers import AutoModelForCausalLM

    out, s, metrics = _dpo(
        tmp_path,
        tiny_model_path,
        loss,
        f"loss_type={loss}",
        "lora.enabled=true",
        "lora.r=4",
        "train.lr=5e-3",
        "train.batch_size=8",
        *_data(pref, "train8"),
    )
    assert s["trainable_pct"] < 50
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), sorted(changed)[:5]


def test_the_headline_names_the_method_and_reads_the_gold_judge():
    from hanlm.pipeline.headline_rows import stage_headline

    def head(summary):
        return stage_headline("s", "dpo", {"status": "complete", "summary": summary})

    start = {"initial_reward_accuracy": 0.5, "reward_accuracy": 0.8}
    assert "ORPO's own objective" in head({**start, "loss_type": "orpo"}).verdict
    assert "DPO's own objective" in head({**start, "loss_type": "sigmoid"}).verdict
    gold = {"initial_eval_gold_score": 0.1, "eval_gold_score": 0.9, "loss_type": "kto"}
    h = head({**start, **gold, "initial_eval_gold_score_sem": 0.1, "eval_gold_score_sem": 0.1})
    assert h.verdict.startswith("better on the gold judge (+0.8")


def test_data_a_loss_cannot_use_is_refused_before_a_model_loads(
    tmp_path, tiny_model_path, pref, monkeypatch, capsys
):
    import hanlm.align.dpo as dpo

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(dpo, "load_model", no_model)
    chat = _write(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}],
    )
    for loss, data, says in (
        ("orpo", pref / "unpaired.jsonl", "train them with loss_type=kto, or give pairs"),
        ("simpo", pref / "unpaired.jsonl", "train them with loss_type=kto"),
        ("sigmoid", pref / "unpaired.jsonl", "loss_type=sigmoid compares a chosen"),
        ("kto", chat, "or unpaired labelled answers"),
    ):
        argv = ["dpo", f"model.path={tiny_model_path}", f"loss_type={loss}", f"data.paths=[{data}]"]
        assert cli.main([*argv, f"output_dir={tmp_path / loss}"]) == 1
        err = capsys.readouterr().err
        assert str(data) in err and says in err and "Traceback" not in err, err
    # settings a method cannot use, refused as the config is read
    from hanlm.align.dpo import DPOConfig

    for bad, says in (
        (["loss_type=orpo", "ref_model=x"], "uses no reference model"),
        (["loss_type=simpo", "precompute_ref=true"], "uses no reference model"),
        (["loss_type=kto", "precompute_ref=true"], "drop precompute_ref"),
        (["loss_type=kto", "train.batch_size=1"], "batch_size >= 2"),
    ):
        with pytest.raises(ConfigError, match=says):
            load_config(DPOConfig, None, bad)


def test_kto_learns_from_unpaired_answers(tmp_path, tiny_model_path, pref, gold, summary_declared):
    out, s, metrics = _dpo(
        tmp_path,
        tiny_model_path,
        "kto",
        "loss_type=kto",
        *_data(pref, "unpaired", "unpaired_valid"),
        f"gold_reward_model={gold}",
    )
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[0] == pytest.approx(0.5, abs=1e-6) and losses[-1] < 0.5
    # no held-out pairs to measure; the held-out prompts are answered and judged
    summary_declared(out, absent=("reward_accuracy", "reward_margin", *NO_WARNINGS))
    assert {"initial_eval_gold_score", "eval_gold_score"} <= set(s)
    assert read_run(out)["data"]["dropped_too_long"] == 0


# --------------------------------------------------------------------------- GRPO losses


def test_grpo_losses_come_with_their_papers_settings():
    from hanlm.align.grpo import GRPOConfig, loss_settings

    def settings(*extra):
        return loss_settings(load_config(GRPOConfig, None, ["rules.funcs=[stop]", *extra]))

    assert settings() == {
        "loss_type": "dapo",
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "scale_rewards": "group",
        "mask_truncated_completions": False,
    }
    assert settings("loss_type=grpo") == {
        "loss_type": "grpo",
        "epsilon": 0.2,
        "epsilon_high": 0.2,
        "scale_rewards": "group",
        "mask_truncated_completions": False,
    }
    dr = settings("loss_type=dr_grpo")
    assert dr["scale_rewards"] == "none" and dr["epsilon_high"] == 0.2
    assert settings("loss_type=dr_grpo", "scale_rewards=group")["scale_rewards"] == "group"
    assert settings("epsilon_high=0.3")["epsilon_high"] == 0.3
    with pytest.raises(ConfigError, match="epsilon_high=0.1 must be >= epsilon"):
        settings("epsilon_high=0.1")


def test_grpo_first_losses_follow_each_aggregation(tmp_path, tiny_model_path, pref):
    """One step of each loss on the same sampled answers (same seed, same advantages): at ratio
    1 an answer's token terms are all -A. grpo averages per answer, and the advantages of a group
    sum to 0, so its first loss is 0; dapo divides Σ A·n by the tokens Σ n; dr_grpo divides it by
    answers x max_new_tokens. So dr_grpo's loss = dapo's x mean answer length / max_new_tokens."""
    from hanlm.align.grpo import GRPOConfig, run

    def first(loss):
        cfg = load_config(
            GRPOConfig,
            None,
            [
                f"model.path={tiny_model_path}",
                *_data(pref),
                "rules.funcs=[token_share]",
                f"rules.target={''.join(SAMPLE_TEXT[:4])}",
                "max_new_tokens=8",
                "num_generations=4",
                "train.batch_size=8",
                "train.max_steps=1",
                "train.logging_steps=1",
                "eval_prompts=0",
                f"loss_type={loss}",
                "scale_rewards=group",
                f"output_dir={tmp_path / loss}",
            ],
        )
        out = run(cfg)
        row = next(m for m in read_metrics(out) if "loss" in m)
        return row, read_run(out)

    grpo, _ = first("grpo")
    dapo, info = first("dapo")
    dr, _ = first("dr_grpo")
    assert info["loss"]["epsilon_high"] == 0.28
    assert grpo["loss"] == pytest.approx(0.0, abs=1e-6)
    assert dapo["loss"] != 0
    mean_len = dapo["completions/mean_length"]
    assert dr["completions/mean_length"] == mean_len  # the same answers
    assert dr["loss"] == pytest.approx(dapo["loss"] * mean_len / 8, rel=1e-4)


@pytest.mark.parametrize(
    "name", ["preference-methods", "preference-methods-demo", "preference-methods-qwen"]
)
def test_the_recipe_sets_each_loss_through_the_config_class(tmp_path, name):
    from hanlm.pipeline.recipe import RecipeError, find_recipe, load_recipe, resolve_config

    recipe = load_recipe(find_recipe(name))
    stages = {s.name: s for s in recipe.stages}
    losses = {
        n: resolve_config(recipe, stages[n])["loss_type"] for n in ("dpo", "kto", "orpo", "simpo")
    }
    assert losses == {"dpo": "sigmoid", "kto": "kto", "orpo": "orpo", "simpo": "simpo"}
    # the same pairs, budget and judge for each
    configs = [resolve_config(recipe, stages[n]) for n in losses]
    same = ("train", "lora", "data", "model")
    assert all(c["half"] == "first" for c in configs)
    assert all(c.get(k) == configs[0].get(k) for c in configs for k in same)
    assert len({c["gold_reward_model"] for c in configs}) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "stages:\n  a:\n    command: dpo\n    config: {loss_type: orpo, ref_model: x}\n", "utf-8"
    )
    with pytest.raises(RecipeError, match="stage 'a': loss_type=orpo uses no reference model"):
        resolve_config(load_recipe(bad), load_recipe(bad).stages[0])
