"""Chinese-aware chunking: sentence marks, length cap, overlap, ids back to file and offset."""

import gzip
import json

import pytest

from hanlm.config import ConfigError
from hanlm.rag.chunking import chunk_document, chunk_spans, read_documents, sentences

POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡！白日依山尽？黄河入海流；\n欲穷千里目"


def test_sentences_end_after_chinese_marks_and_newlines():
    spans = sentences(POEM)
    pieces = [POEM[s:e] for s, e in spans]
    assert pieces == [
        "床前明月光，疑是地上霜。",
        "举头望明月，低头思故乡！",
        "白日依山尽？",
        "黄河入海流；\n",
        "欲穷千里目",
    ]
    assert "".join(pieces) == POEM  # nothing dropped


def test_chunks_respect_max_length_whole_sentences_and_overlap():
    spans = chunk_spans(POEM, max_chars=14, overlap=8)
    texts = [POEM[s:e] for s, e in spans]
    assert texts == [
        "床前明月光，疑是地上霜。",  # + the next sentence would pass 14 characters
        "举头望明月，低头思故乡！",
        "白日依山尽？黄河入海流；\n",  # two short sentences packed
        "黄河入海流；\n欲穷千里目",  # starts with the last sentence (7 <= 8 overlap)
    ]
    assert all(len(t) <= 14 for t in texts)
    covered = set()
    for s, e in spans:
        covered |= set(range(s, e))
    assert covered == set(range(len(POEM)))  # every character is in some chunk
    # No overlap asked: chunks tile the text.
    assert [POEM[s:e] for s, e in chunk_spans(POEM, 14, 0)][-1] == "欲穷千里目"


def test_long_sentence_is_windowed_with_overlap():
    text = "甲" * 50 + "。"
    spans = chunk_spans(text, max_chars=20, overlap=5)
    assert all(e - s <= 20 for s, e in spans)
    assert spans[0] == (0, 20) and spans[1] == (15, 35)
    assert spans[-1][1] == len(text)
    with pytest.raises(ConfigError):
        chunk_spans(text, max_chars=10, overlap=10)


def test_ids_point_back_to_file_record_and_offset(tmp_path):
    (tmp_path / "a.txt").write_text("李白，字太白。\n" * 10, encoding="utf-8")
    recs = [
        {"id": "bio:1", "text": "王阮，字南卿，德安人。" * 5},
        {"text": "English. Text here! 😀"},
    ]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n")
    (tmp_path / "skip.csv").write_text("x", encoding="utf-8")  # not a document kind
    docs = list(read_documents([str(tmp_path)]))
    assert [(d.source.rsplit("/", 1)[-1], d.record) for d in docs] == [
        ("a.txt", 0),
        ("b.jsonl.gz", 1),
        ("b.jsonl.gz", 2),
    ]
    for doc in docs:
        for c in chunk_document(doc, max_chars=30, overlap=6):
            assert doc.text[c.start : c.end] == c.text
            assert c.id == f"{doc.source}:{doc.record}:{c.start}-{c.end}"
    assert chunk_document(docs[1], 30, 6)[0].doc_id == "bio:1"


def test_bad_records_and_paths_are_errors_naming_them(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "好"}\n{"body": "坏"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"d.jsonl:2: no string field 'text'"):
        list(read_documents([str(p)]))
    with pytest.raises(FileNotFoundError):
        list(read_documents([str(tmp_path / "missing.txt")]))
    (tmp_path / "x.pdf").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="unsupported file type"):
        list(read_documents([str(tmp_path / "x.pdf")]))
