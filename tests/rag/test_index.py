"""Index build, save/load, incremental add, refusal of another model, BM25 and hybrid."""

import json

import numpy as np
import pytest

from hanlm.config import InferenceModelConfig
from hanlm.embed.pooling import EmbedOptions, load_embedder
from hanlm.pipeline.cli import main
from hanlm.rag.bm25 import BM25, rrf, tokenize
from hanlm.rag.chunking import Chunk
from hanlm.rag.index import IndexMismatch, RagIndex, index_embedder


@pytest.fixture(scope="module")
def built(tiny_model_path, docs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "idx"
    args = ["rag", "index", str(docs_dir), f"model.path={tiny_model_path}", f"output_dir={out}"]
    assert main([*args, "chunk.max_chars=40", "chunk.overlap=0"]) == 0
    return out


def test_index_saves_and_loads_with_its_settings(built, tiny_model_path):
    idx = RagIndex.load(built)
    assert (
        idx.index.ntotal == len(idx.chunks) == idx.meta["count"] == 4
    )  # 3 bios + the poem (25 chars)
    rec = idx.meta["embedding"]
    assert rec["pooling"] == "weighted_mean" and rec["dim"] == 32
    assert json.loads((built / "hanlm.json").read_text(encoding="utf-8"))["status"] == "complete"
    # A document found by its own text, dense: the top hit is itself (cosine 1).
    emb = index_embedder(idx, InferenceModelConfig())
    target = next(c for c in idx.chunks if c.doc_id == "bio:王阮")
    vec = emb.encode([target.text], "document")
    (row, score), *_ = idx.dense(vec, 3)[0]
    assert idx.chunks[row].id == target.id and score == pytest.approx(1.0, abs=1e-4)
    # Stored vectors are the ones the embedder gives now.
    assert np.allclose(idx.index.reconstruct(row), vec[0], atol=1e-5)


def test_a_query_with_another_model_or_pooling_is_refused(built, tmp_path, capsys):
    from hanlm.testing import tiny_model_dir

    other = tiny_model_dir(tmp_path / "other", seed=1)
    idx = RagIndex.load(built)
    with pytest.raises(IndexMismatch, match="model_fingerprint"):
        idx.search(["李白"], load_embedder(InferenceModelConfig(path=str(other))), mode="dense")
    rec = idx.meta["embedding"]
    same_model_mean = load_embedder(
        InferenceModelConfig(path=rec["model_path"]), EmbedOptions(pooling="mean")
    )
    with pytest.raises(IndexMismatch, match="pooling"):
        idx.search(["李白"], same_model_mean, mode="dense")
    assert main(["rag", "search", str(built), "李白", f"model.path={other}"]) == 1
    assert "built with the embedding model" in capsys.readouterr().err


def test_incremental_add_keeps_old_rows_and_skips_repeats(built, tmp_path, capsys, bios):
    import shutil

    idx_dir = tmp_path / "idx"
    shutil.copytree(built, idx_dir)
    before = RagIndex.load(idx_dir)
    new = tmp_path / "more.jsonl"
    new.write_text(json.dumps(bios[3], ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["rag", "add", str(new), f"index={idx_dir}"]) == 0
    after = RagIndex.load(idx_dir)
    assert after.meta["count"] == before.meta["count"] + 1
    assert [c.id for c in after.chunks[:-1]] == [c.id for c in before.chunks]
    assert after.chunks[-1].doc_id == "bio:苏轼"
    assert np.allclose(after.index.reconstruct(0), before.index.reconstruct(0))
    assert main(["rag", "add", str(new), f"index={idx_dir}"]) == 0  # the same file again
    assert RagIndex.load(idx_dir).meta["count"] == after.meta["count"]
    assert "already in the index" in capsys.readouterr().err
    # BM25 finds the added document by its words.
    hits = RagIndex.load(idx_dir).search(["苏轼号东坡居士"], None, k=1, mode="bm25")[0]
    assert hits[0].chunk.doc_id == "bio:苏轼"


def test_search_command_prints_ranked_sources(built, capsys):
    assert main(["rag", "search", str(built), "王阮字南卿", "--json", "--k", "2"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    hits = out[0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2]
    assert hits[0]["doc_id"] == "bio:王阮" and hits[0]["source"].endswith("bios.jsonl")
    assert hits[0]["record"] == 2 and hits[0]["start"] == 0


def test_bm25_and_rrf():
    assert tokenize("李白，字太白。Hello!", "bigram") == [
        "李",
        "白",
        "李白",
        "字",
        "太",
        "白",
        "字太",
        "太白",
        "hello",
    ]
    assert "，" not in tokenize("王阮，字南卿", "jieba")
    bm = BM25("bigram")
    bm.add(["李白字太白", "杜甫字子美", "苏轼字子瞻"])
    assert bm.search("子美是谁", 3)[0][0] == 1
    assert bm.search("英文", 3) == []  # nothing shared, nothing returned
    # RRF: a row ranked first by both beats rows ranked first by one.
    fused = rrf([[1, 2, 3], [1, 3, 2]])
    assert fused[0][0] == 1 and {r for r, _ in fused[1:]} == {2, 3}
    assert fused[0][1] == pytest.approx(2 / 61)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_exact_neighbours(kind, tiny_model_path):
    emb = load_embedder(InferenceModelConfig(path=str(tiny_model_path)))
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(400, emb.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    chunks = [Chunk(f"s:{i}", "s", i, 0, 1, "x") for i in range(400)]
    idx = RagIndex.create(emb, kind, bm25="")
    idx.add(chunks, emb, vectors=vecs)
    rows = [hits[0][0] for hits in idx.dense(vecs[:20], 1)]
    assert rows == list(range(20))
