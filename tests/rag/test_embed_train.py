"""`hanlm embed train`: InfoNCE falls; trainable=bias touches only biases (added at zero)."""

import json

import pytest
import torch

from hanlm.config import ModelConfig, load_config
from hanlm.modeling import load_model

PAIRS = [
    ("李白的字是什么", "李白，字太白，号青莲居士。"),
    ("杜甫的字", "杜甫，字子美，自号少陵野老。"),
    ("苏轼号什么", "苏轼，字子瞻，号东坡居士。"),
    ("王阮是哪里人", "王阮，字南卿，德安人。"),
    ("静夜思的开头", "床前明月光，疑是地上霜。"),
    ("登鹳雀楼的开头", "白日依山尽，黄河入海流。"),
    ("春晓的开头", "春眠不觉晓，处处闻啼鸟。"),
    ("论语第一句", "学而时习之，不亦说乎？"),
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"query": q, "positive": d} for q, d in PAIRS]
    rows[0]["negative"] = "杜甫，字子美。"  # a hard negative
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    return p


def _train(tiny_model_path, pairs_file, out, trainable, steps=25, *extra):
    from hanlm.embed.train import EmbedTrainConfig, run

    cfg = load_config(
        EmbedTrainConfig,
        overrides=[
            f"model.path={tiny_model_path}",
            f"data=[{pairs_file}]",
            f"output_dir={out}",
            f"trainable={trainable}",
            "valid_fraction=0",
            "train.batch_size=8",
            f"train.max_steps={steps}",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            "train.logging_steps=1",
            *extra,
        ],
    )
    return run(cfg)


def _loss(path, pairs_file):
    from hanlm.embed.pooling import Embedder
    from hanlm.embed.train import info_nce, read_pairs
    from hanlm.modeling import load_tokenizer

    model = load_model(ModelConfig(path=str(path))).eval()
    emb = Embedder(model, load_tokenizer(str(path)))
    with torch.no_grad():
        return float(info_nce(emb, read_pairs([str(pairs_file)]), 0.05))


def test_bias_training_lowers_info_nce_and_changes_only_biases(
    tiny_model_path, pairs_file, tmp_path
):
    out = _train(tiny_model_path, pairs_file, tmp_path / "bias", "bias")
    assert _loss(out, pairs_file) < _loss(tiny_model_path, pairs_file) - 0.1
    before = load_model(ModelConfig(path=str(tiny_model_path))).state_dict()
    after = load_model(ModelConfig(path=str(out))).state_dict()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True  # loads as plain HF
    added = [k for k in after if k not in before]
    assert added and all(k.endswith(".bias") for k in added)
    assert any(after[k].abs().sum() > 0 for k in added)  # they were trained from zero
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # every original weight untouched
    info = json.loads((out / "hanlm.json").read_text())["summary"]
    assert info["biases_added"] == len(added) and info["first_loss"] > info["last_loss"]


def test_lora_training_merges_into_a_plain_model(tiny_model_path, pairs_file, tmp_path):
    out = _train(tiny_model_path, pairs_file, tmp_path / "lora", "lora", steps=10)
    assert not (out / "adapter_config.json").exists()
    assert _loss(out, pairs_file) < _loss(tiny_model_path, pairs_file)


def test_bad_pairs_are_errors_naming_the_line(tmp_path):
    from hanlm.config import ConfigError
    from hanlm.embed.train import batches, read_pairs

    p = tmp_path / "p.jsonl"
    p.write_text('{"query": "a", "positive": "b"}\n{"query": "a"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"p.jsonl:2"):
        read_pairs([str(p)])
    # A batch never holds the same positive twice (it would be its own false negative).
    import random

    rows = [{"query": str(i), "positive": "same" if i < 3 else str(i)} for i in range(8)]
    for b in batches(rows, 4, random.Random(0)):
        assert len({rows[i]["positive"] for i in b}) == len(b)


def test_embed_train_shows_progress_and_reports_to_tensorboard(
    tiny_model_path, pairs_file, tmp_path, capsys
):
    from hanlm.testing import tensorboard_scalars

    out = _train(
        tiny_model_path, pairs_file, tmp_path / "tb", "bias", 6, "train.report_to=tensorboard"
    )
    text = capsys.readouterr().out
    assert "[embed train] step 6/6  loss " in text and "[embed train] trained 6 steps in " in text
    loss = tensorboard_scalars(out / "tensorboard")["loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6] and len({v for _, v in loss}) > 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["loss"], 5) for r in rows if "loss" in r] == [round(v, 5) for _, v in loss]
