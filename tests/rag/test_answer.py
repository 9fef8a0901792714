"""Grounded answers: numbered sources in the prompt, [n] citations mapped back to them."""

import json

import pytest

from hanlm.pipeline.cli import main
from hanlm.rag.answer import INSTRUCTION, citation_marks, citations, grounded_question
from hanlm.rag.chunking import Chunk
from hanlm.rag.index import Hit


def _hits():
    texts = ["李白，字太白。", "杜甫，字子美。", "苏轼，字子瞻。"]
    return [
        Hit(Chunk(f"bios.jsonl:{i + 1}:0-7", "bios.jsonl", i + 1, 0, 7, t, f"bio:{i}"), 0.5, i + 1)
        for i, t in enumerate(texts)
    ]


def test_prompt_numbers_the_sources_in_rank_order():
    text = grounded_question("杜甫字什么？", _hits())
    assert text.startswith(INSTRUCTION)
    assert "[1] 李白，字太白。\n[2] 杜甫，字子美。\n[3] 苏轼，字子瞻。" in text
    assert text.endswith("问题：杜甫字什么？")


def test_citations_map_to_the_returned_sources():
    hits = _hits()
    cited, unknown = citations("杜甫字子美[2]，与李白[1]齐名[2]；见[7]。", hits)
    assert [c["n"] for c in cited] == [2, 1]  # first mention order, no repeats
    assert cited[0]["id"] == hits[1].chunk.id and cited[0]["text"] == "杜甫，字子美。"
    assert cited[1]["doc_id"] == "bio:0"
    assert unknown == [7]  # a mark naming no source is reported
    assert citations("不知道。", hits) == ([], [])
    assert citation_marks("见[12]与[3]，又见[12]。") == [12, 3]  # several digits, each once


def test_rag_ask_returns_answer_and_sources(tiny_model_path, bigram_index, capsys):
    idx = bigram_index
    capsys.readouterr()
    q = "王阮字什么？"
    args = ["rag", "ask", str(idx), str(tiny_model_path), q, "--json"]
    assert main([*args, "--generation.max_new_tokens", "6", "retrieval.k=2"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["question"] == q and isinstance(r["answer"], str)
    assert [s["n"] for s in r["sources"]] == [1, 2]
    assert r["sources"][0]["doc_id"] == "bio:王阮"  # hybrid: BM25 bigrams put it first
    cited, unknown = r["cited"], r["unknown_citations"]
    assert set(cited) <= {1, 2} and all(n > 2 for n in unknown)


def test_chat_with_retrieval_grounds_the_prompt(tiny_model_path, bigram_index, tmp_path):
    import io

    from hanlm.config import load_config
    from hanlm.serve.chat import ChatConfig, run

    idx = bigram_index
    cfg = load_config(
        ChatConfig,
        overrides=[
            f"model.path={tiny_model_path}",
            f"retrieval.index={idx}",
            "retrieval.k=1",
            "generation.max_new_tokens=4",
        ],
    )
    out = io.StringIO()
    assert run(cfg, stdin=io.StringIO("王阮字什么？\n"), stdout=out) == 0
    assert "[1]" in out.getvalue() and "王阮，字南卿" in out.getvalue()
    with pytest.raises(FileNotFoundError):
        cfg2 = load_config(
            ChatConfig,
            overrides=[f"model.path={tiny_model_path}", f"retrieval.index={tmp_path / 'none'}"],
        )
        run(cfg2, stdin=io.StringIO(""), stdout=io.StringIO())
