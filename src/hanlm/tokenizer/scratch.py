"""A new tokenizer trained from scratch on the corpus: SentencePiece or byte-level BPE."""

from __future__ import annotations

import sys
from typing import Any

from hanlm.tokenizer.base import VocabError
from hanlm.tokenizer.spm import sp_hf_tokenizer, train_sentencepiece

_SCRATCH_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def train_scratch(
    texts: list[str],
    method: str,
    *,
    vocab_size: int,
    min_frequency: int,
    sp_model_type: str,
    character_coverage: float,
    byte_fallback: bool,
) -> tuple[Any, dict[str, bytes]]:
    """A new tokenizer (SentencePiece, or byte-level BPE) as an HF tokenizer."""
    files: dict[str, bytes] = {}
    if method == "bytelevel":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        if vocab_size <= 256 + len(_SCRATCH_SPECIALS):
            raise VocabError(
                f"vocab_size={vocab_size} is too small to add anything: a byte-level BPE"
                f" needs 256 bytes and {len(_SCRATCH_SPECIALS)} special tokens first"
            )
        bt = Tokenizer(models.BPE())
        bt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bt.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(_SCRATCH_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=sys.stderr.isatty(),
        )
        bt.train_from_iterator(texts, trainer, length=len(texts))
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bt,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
        )
    else:
        model = train_sentencepiece(
            texts,
            vocab_size,
            sp_model_type,
            character_coverage,
            byte_fallback,
            None,
            specials=True,
        )
        conf = {
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "add_prefix_space": False,  # as trained: no dummy prefix
        }
        tok = sp_hf_tokenizer(model, conf)
        files["tokenizer.model"] = model
    return tok, files
