"""Pooling against sentence-transformers' reference, padding sides, markers, the embed command."""

import json

import pytest
import torch

from hanlm.config import ModelConfig
from hanlm.embed.pooling import Embedder, EmbedOptions, embed_ids, pool
from hanlm.modeling import load_model, load_tokenizer


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 16, generator=g)
    lengths = [7, 4, 1]
    return hidden, lengths


def _mask(lengths, width, side):
    rows = []
    for n in lengths:
        pad = [0] * (width - n)
        rows.append(pad + [1] * n if side == "left" else [1] * n + pad)
    return torch.tensor(rows)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "ours,theirs",
    [("weighted_mean", "weightedmean"), ("mean", "mean"), ("last_token", "lasttoken")],
)
def test_pool_matches_sentence_transformers(side, ours, theirs):
    pytest.importorskip("sentence_transformers")
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Pooling

    hidden, lengths = _batch()
    mask = _mask(lengths, hidden.shape[1], side)
    ref = Pooling(16, pooling_mode=theirs)({"token_embeddings": hidden, "attention_mask": mask})
    torch.testing.assert_close(
        pool(hidden, mask, ours), ref["sentence_embedding"], atol=1e-6, rtol=0
    )


def test_weighted_mean_is_sgpt_formula_and_padding_side_free():
    hidden, lengths = _batch(1)
    width = hidden.shape[1]
    right, left = _mask(lengths, width, "right"), _mask(lengths, width, "left")
    # The same tokens placed at the right or the left of the row: the same vector.
    h_left = hidden.clone()
    for i, n in enumerate(lengths):
        h_left[i, width - n :] = hidden[i, :n]
    torch.testing.assert_close(pool(hidden, right), pool(h_left, left))
    # By hand: w_i = i / sum(1..n) over the row's own tokens.
    n = lengths[1]
    w = torch.arange(1, n + 1, dtype=torch.float32)
    by_hand = (hidden[1, :n] * (w / w.sum())[:, None]).sum(0)
    torch.testing.assert_close(pool(hidden, right)[1], by_hand)
    # Later tokens weigh more than in a plain mean: the two differ.
    assert not torch.allclose(pool(hidden, right, "mean")[0], pool(hidden, right)[0])


def test_embedder_batches_in_any_order_and_marks_queries(tiny_model_path):
    tok = load_tokenizer(str(tiny_model_path))
    model = load_model(ModelConfig(path=str(tiny_model_path)))
    texts = ["床前明月光，疑是地上霜。", "你好", "The quick brown fox 😀", "学而时习之"]
    emb = Embedder(model, tok, EmbedOptions(batch_size=2))
    batched = emb.encode(texts)
    one_by_one = [Embedder(model, tok, EmbedOptions(batch_size=1)).encode([t])[0] for t in texts]
    for a, b in zip(batched, one_by_one):
        assert a == pytest.approx(b, abs=1e-5)
    assert (abs((batched**2).sum(1) - 1) < 1e-5).all()  # L2-normalised
    # The serve path (token ids) gives the same vectors.
    ids = [tok(t)["input_ids"] for t in texts]
    assert embed_ids(model, ids, tok.pad_token_id)[0] == pytest.approx(
        batched[0].tolist(), abs=1e-5
    )
    # Asymmetric markers: a query and a document of the same text differ.
    asym = Embedder(model, tok, EmbedOptions(asymmetric=True))
    q, d = asym.encode(["你好"], "query")[0], asym.encode(["你好"], "document")[0]
    assert abs(float(q @ d) - 1) > 1e-4
    # Truncation is counted, not silent.
    short = Embedder(model, tok, EmbedOptions(max_length=3))
    short.encode(["床前明月光，疑是地上霜。"])
    assert short.truncated == 1


def test_embed_command_writes_vectors(tiny_model_path, tmp_path, capsys):
    from hanlm.pipeline.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "你好"}\n{"text": "床前明月光"}\n', encoding="utf-8")
    out = tmp_path / "v.jsonl"
    assert main(["embed", str(tiny_model_path), f"input={src}", f"output={out}"]) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == ["你好", "床前明月光"]
    assert len(rows[0]["embedding"]) == rows[0]["dim"] == 32
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    assert main(["embed", str(tiny_model_path), f"input={bad}"]) == 1
    assert f"{bad}:2" in capsys.readouterr().err
