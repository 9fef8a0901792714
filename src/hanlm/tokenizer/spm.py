"""Expanding a SentencePiece base (`tokenizer.model`: LLaMA-1/2, Baichuan), and training one.

A SentencePiece model trained on the corpus with the base's own normaliser; its pieces that the
base lacks and that hold CJK are appended to the base proto, with scores below every base score
in learned order (a BPE base merges by score, so the new pieces fire only after all base merges,
as for a byte-level base).
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from hanlm.tokenizer.base import PROBE_TEXTS, Merged, VocabError, has_cjk_bytes, log


def train_sentencepiece(
    texts: list[str],
    vocab_size: int,
    model_type: str,
    coverage: float,
    byte_fallback: bool,
    normalizer: Any | None,
    specials: bool,
) -> bytes:
    """A SentencePiece model trained on `texts` (by line), as serialized proto bytes."""
    import sentencepiece as spm

    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    if not lines:
        raise VocabError("the corpus holds no non-empty line to train SentencePiece on")
    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "character_coverage": coverage,
        "byte_fallback": byte_fallback,
        "hard_vocab_limit": False,  # a small corpus gives a smaller model, not an error
        "num_threads": 2,
        "max_sentence_length": 1 << 16,
        "input_sentence_size": 2_000_000,
        "shuffle_input_sentence": True,
        "split_digits": True,
        "allow_whitespace_only_pieces": True,
        "minloglevel": 2,
    }
    if normalizer is not None:
        # Pieces must be what the base sees: its NFKC would turn "，" into "," and a piece
        # holding "，" could never be produced.
        kw.update(
            normalization_rule_name=normalizer.name or "identity",
            add_dummy_prefix=normalizer.add_dummy_prefix,
            remove_extra_whitespaces=normalizer.remove_extra_whitespaces,
        )
    else:
        # No dummy prefix and no whitespace folding: decode(encode(x)) == x exactly.
        kw.update(
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
        )
    if specials:
        kw.update(
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
        )
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **kw)
    except RuntimeError as e:
        msg = str(e).split("]", 1)[-1].strip()
        raise VocabError(f"vocab_size={vocab_size} cannot be trained: {msg}") from None
    return buf.getvalue()


def sp_hf_tokenizer(model_bytes: bytes, config: dict[str, Any]) -> Any:
    """An HF tokenizer for a SentencePiece model (transformers converts the proto on load)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model_bytes)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)


def _sp_config(tok: Any) -> dict[str, Any]:
    keys = ("bos_token", "eos_token", "unk_token", "pad_token")
    out: dict[str, Any] = {k: str(getattr(tok, k)) for k in keys if getattr(tok, k, None)}
    # The base's own class rebuilds the tokenizer from the proto the way the base does;
    # LLaMA's when the base came as a generic fast tokenizer.
    name = type(tok).__name__
    generic = name in ("TokenizersBackend", "PreTrainedTokenizerFast")
    out["tokenizer_class"] = "LlamaTokenizer" if generic else name
    for k in ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "model_max_length"):
        if k in getattr(tok, "init_kwargs", {}):
            out[k] = tok.init_kwargs[k]
    return out


def expand_sentencepiece(
    base: Any,
    sp_file: Path,
    texts: list[str],
    *,
    vocab_size: int,
    sp_model_type: str,
    character_coverage: float,
) -> Merged:
    """Append new CJK pieces to the base SentencePiece proto (Chinese-LLaMA's merge)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    base_bytes = sp_file.read_bytes()
    proto = pb.ModelProto()
    proto.ParseFromString(base_bytes)
    n_base = len(proto.pieces)
    above = [t for t, i in base.get_vocab().items() if i >= n_base]
    if above:
        raise VocabError(
            f"{sp_file}: the base has tokens after its SentencePiece vocabulary ({above[:5]});"
            " appending pieces would move them"
        )
    unigram_base = proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
    if unigram_base and sp_model_type != "unigram":
        raise VocabError(
            f"{sp_file} is a unigram model: pass sp_model_type=unigram so the new pieces come"
            " with unigram scores"
        )
    t0 = time.time()
    zh_bytes = train_sentencepiece(
        texts,
        vocab_size,
        sp_model_type,
        character_coverage,
        False,
        proto.normalizer_spec,
        specials=False,
    )
    zh = pb.ModelProto()
    zh.ParseFromString(zh_bytes)
    log(f"trained a {len(zh.pieces):,}-piece SentencePiece model ({time.time() - t0:.1f}s)")

    have = {p.piece for p in proto.pieces}
    normal = pb.ModelProto.SentencePiece.NORMAL
    floor = min((p.score for p in proto.pieces if p.type == normal), default=0.0)
    base_sp = spm.SentencePieceProcessor(model_proto=base_bytes)
    space = "▁"
    added: list[str] = []
    rejected_non_cjk = 0
    spelling: dict[int, list[int]] = {}
    for p in zh.pieces:  # in the trained model's order: by score, i.e. merge order for BPE
        if p.type != normal or p.piece in have:
            continue
        if not has_cjk_bytes(p.piece.encode("utf-8")):
            rejected_non_cjk += 1
            continue
        new = proto.pieces.add()
        new.piece = p.piece
        new.type = normal
        new.score = p.score if unigram_base else floor - 1.0 - len(added)
        have.add(p.piece)
        core = p.piece.lstrip(space).replace(space, " ")
        ids = base_sp.encode(core)
        if not p.piece.startswith(space) and ids and base_sp.id_to_piece(ids[0]) == space:
            ids = ids[1:]  # the dummy prefix the base adds: not part of a mid-word piece
        spelling[n_base + len(added)] = ids
        added.append(p.piece)
    if not added:
        raise VocabError(
            f"vocab_size={vocab_size} is too small to add anything: every CJK piece of the"
            " trained model is already in the base; raise vocab_size"
        )
    model_bytes = proto.SerializeToString()
    tok = sp_hf_tokenizer(model_bytes, _sp_config(base))
    tok.chat_template = base.chat_template
    new_ids = list(range(n_base, n_base + len(added)))
    # The HF tokenizer is converted from the proto; it must agree with SentencePiece itself
    # wherever it did for the base (HF's Metaspace and SentencePiece already differ on a
    # leading space: that is not ours to fix).
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    for text in [*PROBE_TEXTS, *texts[:200]]:
        if base.encode(text, add_special_tokens=False) != base_sp.encode(text):
            continue
        if tok.encode(text, add_special_tokens=False) != sp.encode(text):
            raise VocabError(f"the HF tokenizer disagrees with SentencePiece on {text[:40]!r}")
    stats = {"pieces_trained": len(zh.pieces), "rejected_not_cjk": rejected_non_cjk}
    return Merged(
        tok, "sentencepiece", len(base), new_ids, spelling, stats, {"tokenizer.model": model_bytes}
    )
