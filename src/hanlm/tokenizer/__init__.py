"""Tokenizer algorithms: train a tokenizer on a corpus, or merge new pieces into a base one.

The layer under `hanlm vocab` (the stage reads the corpus, calls these and writes the report):
- base.py: load a base tokenizer and tell its kind; the `Merged` result; CJK byte helpers.
- bytelevel.py: expand a byte-level BPE base (GPT-2, SmolLM2, Qwen, LLaMA-3) with new merges.
- spm.py: expand a SentencePiece base (LLaMA-1/2, Baichuan) with new pieces.
- scratch.py: train a new SentencePiece or byte-level BPE tokenizer.
- measure.py: tokens per character and byte fallback; check a merge and a saved directory.
Every base id is kept; text without CJK tokenizes exactly as with the base.
"""

from hanlm.stage import Command
from hanlm.tokenizer.base import (
    PROBE_TEXTS,
    Merged,
    VocabError,
    has_cjk_bytes,
    load_base_tokenizer,
)
from hanlm.tokenizer.bytelevel import expand_bytelevel
from hanlm.tokenizer.measure import (
    check_merge,
    check_reload,
    fragment_ids,
    measure,
    top_new_pieces,
)
from hanlm.tokenizer.scratch import train_scratch
from hanlm.tokenizer.spm import expand_sentencepiece

__all__ = [
    "PROBE_TEXTS",
    "Merged",
    "VocabError",
    "check_merge",
    "check_reload",
    "expand_bytelevel",
    "expand_sentencepiece",
    "fragment_ids",
    "has_cjk_bytes",
    "load_base_tokenizer",
    "measure",
    "top_new_pieces",
    "train_scratch",
]

COMMANDS = (
    Command(
        "vocab",
        "hanlm.tokenizer.vocab",
        "VocabConfig",
        "train a Chinese tokenizer, or merge one into a base model's vocabulary and resize it",
        headline="hanlm.tokenizer.headlines:vocab",
        summary=(
            "chinese_held_out_tokens_per_char",
            "chinese_held_out_ratio",
            "chinese_train_tokens_per_char",
            "chinese_train_ratio",
            "english_tokens_per_char",
            "english_ratio",
        ),
        reports=("vocab_report.json",),
    ),
)
