import json

import pytest

BIOS = [
    {"id": "bio:李白", "text": "李白，字太白，号青莲居士，绵州昌隆人。唐代诗人，有诗仙之称。"},
    {"id": "bio:王阮", "text": "王阮，字南卿，德安人。孝宗隆兴元年进士，调都昌主簿，移永州教授。"},
    {"id": "bio:杜甫", "text": "杜甫，字子美，自号少陵野老。唐代现实主义诗人，与李白合称李杜。"},
    {"id": "bio:苏轼", "text": "苏轼，字子瞻，号东坡居士，眉州眉山人。北宋文学家、书画家。"},
]


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    lines = [json.dumps(b, ensure_ascii=False) for b in BIOS[:3]]
    (d / "bios.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "poem.txt").write_text(
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。", encoding="utf-8"
    )
    return d


@pytest.fixture(scope="session")
def bios():
    return BIOS


@pytest.fixture(scope="module")
def bigram_index(docs_dir, tiny_model_path, tmp_path_factory):
    """An index of `docs_dir` built by `hanlm rag index` with the tiny model and BM25 bigrams
    (read-only for the tests that share it)."""
    from hanlm.pipeline.cli import main

    idx = tmp_path_factory.mktemp("rag-idx") / "idx"
    args = ["rag", "index", str(docs_dir), f"model.path={tiny_model_path}", f"output_dir={idx}"]
    assert main([*args, "bm25=bigram"]) == 0
    return idx
