"""Pinned numbers, as torchtune pins its recipes: the first five losses of pretrain, SFT, reward,
DPO and PPO on the tiny fp32 model at a fixed seed, and batch 4x1 against 1x4 accumulation.

They must not move when code is only moved or restructured. A change that is meant to change the numbers (a fixed defect, a new default)
updates them in the same commit and says why.
"""

from __future__ import annotations

import json

import pytest

from hanlm.config import load_config
from hanlm.runs import read_metrics

REL, ABS = 1e-4, 1e-6  # fp32 on one machine repeats exactly; this leaves room for BLAS builds

SFT_RECORDS = [
    {"instruction": "床前明月光的下一句是什么？", "output": "疑是地上霜。"},
    {"instruction": "白日依山尽的下一句？", "output": "黄河入海流。"},
    {"instruction": "Say hello.", "output": "Hello, world!"},
    {"instruction": "春眠不觉晓，", "input": "接下一句", "output": "处处闻啼鸟。"},
    {"instruction": "学而时习之的下一句？", "output": "不亦说乎？"},
    {"instruction": "Count to three.", "output": "1, 2, 3 😀"},
    {"instruction": "举头望明月的下一句？", "output": "低头思故乡。"},
    {"instruction": "欲穷千里目的下一句？", "output": "更上一层楼。"},
]
PAIRS = [
    {"prompt": r["instruction"], "chosen": r["output"], "rejected": "The quick brown fox."}
    for r in SFT_RECORDS
]

PINNED = {
    "pretrain": [
        6.279751300811768,
        6.213199615478516,
        6.247243404388428,
        6.136240482330322,
        6.201755523681641,
    ],
    # train.batching=grouped (the CPU default): batches of similar lengths
    "sft_grouped": [
        6.239797115325928,
        6.252387523651123,
        6.181396961212158,
        6.239770412445068,
        6.038092136383057,
    ],
    # random batches; padding-free batches hold the same conversations, so the same losses
    "sft": [
        6.230989933013916,
        6.258121967315674,
        6.251535892486572,
        6.219095706939697,
        6.1490325927734375,
    ],
    "reward": [
        0.6908838748931885,
        0.6532306671142578,
        0.5917611122131348,
        0.4697788953781128,
        0.364908367395401,
    ],
    "dpo": [
        0.6931471824645996,
        0.6685960292816162,
        0.6481677293777466,
        0.636794924736023,
        0.6222598552703857,
    ],
    # train.batching=grouped (the default): pairs of similar lengths batched together
    "reward_grouped": [
        0.6900728940963745,
        0.6492022275924683,
        0.5684443116188049,
        0.41680824756622314,
        0.30925148725509644,
    ],
    "dpo_grouped": [
        0.6931471824645996,
        0.6663318872451782,
        0.6510100364685059,
        0.6349373459815979,
        0.6234155893325806,
    ],
    "ppo_loss": [
        0.0035214098170399666,
        0.0029841959476470947,
        0.005925208330154419,
        0.0008442848920822144,
        0.0004329681396484375,
    ],
    "ppo_value_loss": [
        0.00617709755897522,
        0.004924156935885549,
        0.24160975962877274,
        0.0070498231798410416,
        0.008109884103760123,
    ],
    "ppo_score": [-1.0, -1.0, -0.45, -0.9583333333333334, -0.9583333333333334],
    # with the critic centred on the first rollout's shifted scores (a trainable offset)
    "ppo_centered_loss": [
        0.0034509794786572456,
        0.002700202167034149,
        0.006200678646564484,
        0.0012216567993164062,
        0.0009663701057434082,
    ],
    "ppo_centered_value_loss": [
        0.006913274992257357,
        0.004879257176071405,
        0.21445347368717194,
        0.010834904853254557,
        0.01381698390468955,
    ],
    "ppo_centered_score": [-1.0, -1.0, -0.45, -0.9583333333333334, -0.9583333333333334],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from hanlm.testing import SAMPLE_TEXT

    d = tmp_path_factory.mktemp("pinned")

    def write(name, rows):
        (d / name).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        return d / name

    return {
        "text": write("text.jsonl", [{"text": t} for t in SAMPLE_TEXT * 4]),
        "sft": write("sft.jsonl", SFT_RECORDS),
        "pref": write("pref.jsonl", PAIRS),
    }


def _run(stage: str, out, *overrides: str):
    from hanlm.pipeline import cli

    cmd = cli.COMMANDS[stage]
    module = __import__(cmd.module, fromlist=["run"])
    cfg = load_config(getattr(module, cmd.config), None, [*overrides, f"output_dir={out}"])
    return module.run(cfg)


def _losses(out, key: str = "loss", n: int = 5) -> list[float]:
    rows = [r[key] for r in read_metrics(out) if key in r]
    return rows[:n]


COMMON = ["train.precision=fp32", "train.seed=7", "train.logging_steps=1", "train.eval_steps=0"]


def _pretrain(tmp, model, files, *extra):
    return _run(
        "pretrain",
        tmp,
        f"model.path={model}",
        f"data.paths=[{files['text']}]",
        "data.dedup=none",
        "block_size=24",
        "train.lr=1e-3",
        "train.warmup_ratio=0",
        f"cache_dir={tmp.parent / 'cache'}",
        *COMMON,
        *extra,
    )


def _sft(tmp, model, files, *extra):
    return _run(
        "sft",
        tmp,
        f"model.path={model}",
        f"data.paths=[{files['sft']}]",
        "data.dedup=none",
        "train.lr=1e-3",
        "train.warmup_ratio=0",
        "eval_prompts=0",
        *COMMON,
        *extra,
    )


def _check(name: str, got: list[float]) -> None:
    want = PINNED[name]
    assert len(got) == 5, got
    assert want is not None, f"pin {name}: {got}"
    assert got == pytest.approx(want, rel=REL, abs=ABS), (name, got)


def test_pretrain_first_losses(tmp_path, tiny_model_path, files):
    out = _pretrain(
        tmp_path / "out", tiny_model_path, files, "train.batch_size=2", "train.max_steps=5"
    )
    _check("pretrain", _losses(out))


@pytest.mark.parametrize(
    "batching,pin", [("random", "sft"), ("padding_free", "sft"), ("grouped", "sft_grouped")]
)
def test_sft_first_losses(tmp_path, tiny_model_path, files, batching, pin):
    out = _sft(
        tmp_path / "out",
        tiny_model_path,
        files,
        "train.batch_size=2",
        "train.max_steps=5",
        f"train.batching={batching}",
    )
    _check(pin, _losses(out))


@pytest.mark.parametrize("batching", ["random", "grouped"])
def test_reward_first_losses(tmp_path, tiny_model_path, files, batching):
    out = _run(
        "reward",
        tmp_path / "out",
        f"model.path={tiny_model_path}",
        f"data.paths=[{files['pref']}]",
        "data.dedup=none",
        "train.batch_size=2",
        "train.max_steps=5",
        "train.lr=3e-3",
        "train.warmup_ratio=0",
        f"train.batching={batching}",
        *COMMON,
    )
    _check("reward" if batching == "random" else "reward_grouped", _losses(out))


@pytest.mark.parametrize("batching", ["random", "grouped"])
def test_dpo_first_losses(tmp_path, tiny_model_path, files, batching):
    out = _run(
        "dpo",
        tmp_path / "out",
        f"model.path={tiny_model_path}",
        f"data.paths=[{files['pref']}]",
        "data.dedup=none",
        "train.batch_size=2",
        "train.max_steps=5",
        "train.lr=1e-3",
        "train.warmup_ratio=0",
        f"ref_cache_dir={tmp_path / 'ref'}",
        f"train.batching={batching}",
        *COMMON,
    )
    _check("dpo" if batching == "random" else "dpo_grouped", _losses(out))


@pytest.mark.parametrize("center", [False, True])
def test_ppo_first_losses(tmp_path, tiny_model_path, files, center):
    """PPO's first losses with the critic centred on the first scores and without (`center`)."""
    from hanlm.testing import SAMPLE_TEXT

    out = _run(
        "ppo",
        tmp_path / "out",
        f"model.path={tiny_model_path}",
        f"data.paths=[{files['pref']}]",
        "data.dedup=none",
        "rules.funcs=[token_share]",
        f"rules.target={''.join(SAMPLE_TEXT[:4])}",
        "max_new_tokens=6",
        "rollout_batch=4",
        "ppo_epochs=1",
        "train.batch_size=2",
        "train.max_steps=5",
        "train.lr=1e-3",
        "eval_prompts=0",
        "eval_ptx_blocks=0",
        f"center_value={str(center).lower()}",
        *COMMON,
    )
    got = {k: _losses(out, k) for k in ("loss", "value_loss", "score")}
    tag = "ppo_centered" if center else "ppo"
    assert PINNED.get(f"{tag}_loss") is not None, json.dumps(got)
    for key in ("loss", "value_loss", "score"):
        _check(f"{tag}_{key}", got[key])


def _weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_batch_4x1_equals_1x4_accumulation(tmp_path, tiny_model_path, files, stage):
    """One optimiser step on 4 examples, as one batch or as 4 accumulated micro-batches, gives
    the same loss and the same weights (fp32)."""
    import torch

    go = _pretrain if stage == "pretrain" else _sft
    a = go(tmp_path / "a", tiny_model_path, files, "train.batch_size=4", "train.max_steps=1")
    b = go(
        tmp_path / "b",
        tiny_model_path,
        files,
        "train.batch_size=1",
        "train.grad_accum=4",
        "train.max_steps=1",
    )
    assert _losses(a, n=1) == pytest.approx(_losses(b, n=1), rel=REL)
    wa, wb = _weights(a), _weights(b)
    start = _weights(tiny_model_path)
    moved = max(float((wa[k] - start[k]).abs().max()) for k in wa if k in start)
    assert moved > 1e-4  # the step did something
    # Each weight moved by about lr = 1e-3; embedding rows whose gradient is near Adam's eps
    # differ by float noise (measured up to 2.6e-6 here), 400x below the step.
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-5, msg=k)
