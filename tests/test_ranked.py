"""Ranked preference data (InstructGPT's K answers per prompt): the format and its errors, the
per-prompt-averaged K-choose-2 loss on hand-computed values, Kendall τ, and `hanlm reward`
learning a ranking that is a known function of the text."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from hanlm.config import load_config
from hanlm.data.check import DataCheckConfig, check
from hanlm.data.formats import RecordError, convert, detect, ranked_pairs
from hanlm.losses import kendall_tau, ranked_ranking_loss
from hanlm.runs import read_metrics, read_run


def _rec(**kw):
    return {"prompt": "床前明月光的下一句？", "responses": ["疑是地上霜。", "😀", "Hello"], **kw}


def test_ranked_records_convert_with_ties_and_page_extras():
    rec = _rec(ranking=[[0, 2], 1], labeller="小李", models=["a", "a", "b"], all_bad=False)
    assert detect(rec) == "ranked"
    out = convert(rec, "ranked")
    assert out["ranking"] == [[0, 2], [1]]
    assert out["prompt"] == [{"role": "user", "content": "床前明月光的下一句？"}]
    assert out["responses"][1] == [{"role": "assistant", "content": "😀"}]
    assert ranked_pairs(out["ranking"]) == [(0, 1), (2, 1)]  # the tie (0, 2) is no pair
    assert ranked_pairs([[0], [1], [2], [3]]) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


@pytest.mark.parametrize(
    "ranking, message",
    [
        ([0, 3, 1], "index 3 is out of range for 3 responses"),
        ([0, 1], "response(s) [2] are not ranked"),
        ([0, [1, 0], 2], "response 0 appears twice"),
        ([True, 1, 2], "expected an index or a list of indices"),
        ([0, [], 1, 2], "empty tie group"),
        ("0,1,2", "expected a list"),
    ],
)
def test_bad_rankings_say_what_is_wrong(ranking, message):
    with pytest.raises(RecordError, match=re.escape(message)):
        convert(_rec(ranking=ranking), "ranked")


def test_data_check_detects_ranked_data_and_lists_bad_lines(tmp_path):
    path = tmp_path / "ranked.jsonl"
    rows = [_rec(ranking=[1, 0, 2]), _rec(ranking=[0, 1]), _rec(ranking=[[0, 1, 2]])]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    lines: list[str] = []
    res = check(DataCheckConfig(paths=[str(path)]), out=lines.append)[str(path)]
    assert res["format"] == "ranked" and res["good"] == 2 and res["bad"] == 1
    assert res["bad_records"][0].startswith(f"{path}:2: ranking: response(s) [2] are not ranked")
    text = "\n".join(lines)
    assert "format: ranked (detected) -> ranked" in text
    assert "responses[1]/assistant: 😀" in text and "ranking (best first" in text


def test_ranked_loss_averages_within_each_prompt_first():
    import torch

    # prompt 0: answers r = [2, 1, 0] ranked 0 > 1 > 2 -> 3 pairs with gaps 1, 2, 1
    # prompt 1: answers r = [0, 3] ranked 0 > 1 -> 1 pair with gap -3
    rewards = torch.tensor([2.0, 1.0, 0.0, 0.0, 3.0])
    winners, losers = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4])
    owner = torch.tensor([0, 0, 0, 1])

    def nls(x):  # -log σ(x)
        return math.log1p(math.exp(-x))

    prompt0 = (nls(1) + nls(2) + nls(1)) / 3
    prompt1 = nls(-3)
    got = ranked_ranking_loss(rewards, winners, losers, owner).item()
    assert got == pytest.approx((prompt0 + prompt1) / 2, rel=1e-6)
    # pairs as separate samples would weigh prompt 0 three times: a different number
    assert got != pytest.approx((3 * prompt0 + prompt1) / 4, rel=1e-3)
    # a margin shifts every gap; one pair per prompt is the pairwise loss
    m = ranked_ranking_loss(rewards, winners, losers, owner, margin=0.5).item()
    assert m == pytest.approx(((nls(0.5) + nls(1.5) + nls(0.5)) / 3 + nls(-3.5)) / 2, rel=1e-6)


def test_kendall_tau_b_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(50):
        k = rng.randint(2, 7)
        levels = [rng.randint(0, 3) for _ in range(k)]
        scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(k)]
        groups = [
            [i for i in range(k) if levels[i] == v] for v in sorted(set(levels), reverse=True)
        ]
        ours = kendall_tau(scores, groups)
        ref = stats.kendalltau(levels, scores).statistic
        if math.isnan(ref):
            assert ours is None
        else:
            assert ours == pytest.approx(ref, abs=1e-9)
    assert kendall_tau([3.0, 2.0, 1.0], [[0], [1], [2]]) == 1.0
    assert kendall_tau([1.0, 2.0, 3.0], [[0], [1], [2]]) == -1.0


# --------------------------------------------------------------------------- the stage

# The ranking is a known function of the text: an answer with more of the poem's characters
# (and fewer digits) ranks higher; equal counts are ties.
POEM = "床前明月光疑是地上霜举头望"
DIGITS = "0123456789"


def _answer(rng: random.Random, good: int, length: int = 6) -> str:
    chars = [rng.choice(POEM) for _ in range(good)] + [
        rng.choice(DIGITS) for _ in range(length - good)
    ]
    rng.shuffle(chars)
    return "".join(chars)


def _ranked_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        levels = rng.sample([0, 2, 4, 6], k=rng.choice([2, 3, 4]))
        if rng.random() < 0.3:
            levels.append(levels[0])  # a tie
        responses = [_answer(rng, g) for g in levels]
        groups = [
            [j for j, g in enumerate(levels) if g == v] for v in sorted(set(levels), reverse=True)
        ]
        ranking = [g[0] if len(g) == 1 else g for g in groups]
        rows.append({"prompt": f"写一句诗 #{i}", "responses": responses, "ranking": ranking})
    return rows


@pytest.fixture(scope="module")
def ranked_rm(tmp_path_factory, tiny_model_path):
    import torch

    from hanlm.align.reward_model import RewardConfig, run

    d = tmp_path_factory.mktemp("ranked")
    for name, rows in (("train", _ranked_rows(48, 0)), ("valid", _ranked_rows(16, 1))):
        (d / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8"
        )
    cfg = load_config(
        RewardConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            f"data.paths=[{d / 'train.jsonl'}]",
            f"data.valid_paths=[{d / 'valid.jsonl'}]",
            "train.max_steps=30",
            "train.batch_size=4",
            "train.lr=3e-3",
            "train.eval_steps=15",
            f"output_dir={d / 'out'}",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(threads)


def test_reward_learns_a_known_ranking_from_ranked_data(ranked_rm):
    info = read_run(ranked_rm)
    s, data = info["summary"], info["data"]
    assert data["kind"] == "ranked" and data["train_prompts"] == 48
    assert data["train_pairs"] == sum(
        len(ranked_pairs(convert(r, "ranked")["ranking"])) for r in _ranked_rows(48, 0)
    )
    assert s["loss"].startswith("ranked") and s["prompts"] == 16
    assert s["accuracy"] >= 0.85 and s["accuracy"] > s["initial_accuracy"] + 0.2
    assert s["kendall_tau"] >= 0.7 and s["kendall_tau"] > s["initial_kendall_tau"] + 0.3
    assert any("eval_loss" in row for row in read_metrics(ranked_rm))


def test_reward_score_on_ranked_records(ranked_rm, tmp_path, capsys):
    from hanlm.pipeline import cli

    rows = _ranked_rows(16, 1)
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    out = tmp_path / "scored.jsonl"
    assert cli.main(["reward", "score", str(ranked_rm), f"file={path}", f"output={out}"]) == 0
    scored = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    assert len(scored) == 16 and all(len(r["rewards"]) == len(r["responses"]) for r in scored)
    s = read_run(ranked_rm)["summary"]
    taus = [r["kendall_tau"] for r in scored if r["kendall_tau"] is not None]
    assert sum(taus) / len(taus) == pytest.approx(s["kendall_tau"], abs=1e-3)
    assert f"pair accuracy {s['accuracy']:.4f} over {s['pairs']} pairs" in capsys.readouterr().err


def test_ranked_reward_data_refuses_grouped_batches(tmp_path, tiny_model_path):
    """A row of ranked data is a prompt with all its answers: grouped batches are refused with
    the reason before the model loads (auto trains it in random batches)."""
    from hanlm.align.reward_model import RewardConfig, run
    from hanlm.config import ConfigError

    data = tmp_path / "ranked.jsonl"
    data.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _ranked_rows(8, 0)), "utf-8"
    )
    cfg = load_config(
        RewardConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            f"data.paths=[{data}]",
            "train.batching=grouped",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    with pytest.raises(ConfigError, match="ranked answers train in random batches"):
        run(cfg)
    assert not (tmp_path / "out" / "model.safetensors").exists()
