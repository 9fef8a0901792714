"""Tiny tokenizers and models for tests and CPU smoke runs (no network, seconds to build)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hanlm.data.templates import apply_template
from hanlm.modeling import build_model, save_model

SAMPLE_TEXT = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "In the beginning God created the heavens and the earth.",
    "Hello, world! How are you today? 😀 Fine, thanks.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def tiny_tokenizer(
    vocab_size: int = 600, template: str = "chatml", texts: list[str] | None = None
) -> Any:
    """A byte-level BPE tokenizer (any text round-trips) with a chat template installed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((texts or SAMPLE_TEXT) * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    apply_template(fast, template)
    return fast


def tiny_model_dir(path: str | Path, template: str = "chatml", seed: int = 0, **dims: Any) -> Path:
    """Save a randomly initialised `test`-preset LLaMA and its tokenizer to `path`."""
    import torch

    torch.manual_seed(seed)
    tok = tiny_tokenizer(template=template)
    model = build_model("test", vocab_size=len(tok), max_positions=512, **dims)
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    return save_model(model, tok, path)
