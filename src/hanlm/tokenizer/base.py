"""The base tokenizer, the result of a merge, and what every algorithm shares.

The shared parts: the error the algorithms raise, the mixed probe texts merges are checked on,
and the UTF-8 byte view of tokens (which bytes mark CJK, GPT-2's byte-level alphabet).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hanlm.config import ConfigError
from hanlm.modeling import ModelError, load_tokenizer, resolve_source

# Mixed text every merge is checked on: Chinese, English, full-width punctuation, emoji, a rare
# CJK extension-B character, kana, Cyrillic and leading/double spaces.
PROBE_TEXTS = [
    "床前明月光，疑是地上霜。Hello, world! 😀👍🏽 𠀀𪚥 ひらがな Привет  two  spaces",
    " 我爱北京天安门 and I ❤ Beijing（北京）「引号」……",
    "2024年3月15日，GPT-4o 的 tokenizer 有 200K 个词。\n\t第二行：《红楼梦》",
]


class VocabError(ModelError, ConfigError):
    """A vocabulary that cannot be built as asked (a ConfigError, so the CLI prints it cleanly)."""


def log(msg: str) -> None:
    """A progress line, prefixed like every line of `hanlm vocab`."""
    print(f"[vocab] {msg}", flush=True)


# --------------------------------------------------------------------------- CJK bytes


def has_cjk_bytes(b: bytes) -> bool:
    """True if `b` holds the lead byte of a CJK character (whole or cut).

    E3-E9 lead U+3000-U+9FFF (CJK punctuation, kana, ideographs); EF BC/BD lead the full-width
    forms; F0 A0-B3 the ideograph extensions B-G. Lead bytes never occur inside other
    characters, so a token holding one can only be produced from text holding CJK.
    """
    n = len(b)
    for i, x in enumerate(b):
        if 0xE3 <= x <= 0xE9:
            return True
        if i + 1 < n and (
            (x == 0xEF and b[i + 1] in (0xBC, 0xBD)) or (x == 0xF0 and 0xA0 <= b[i + 1] <= 0xB3)
        ):
            return True
    return False


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable bytes map to themselves, the other 68
    bytes to U+0100 onwards."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


# --------------------------------------------------------------------------- base tokenizer


@dataclass
class Merged:
    """The merged tokenizer and what the report and the embedding init need to know."""

    tokenizer: Any  # HF tokenizer
    kind: str  # bytelevel | sentencepiece
    base_size: int  # len(base tokenizer)
    new_ids: list[int]
    spelling: dict[int, list[int]]  # new id -> the base ids that spell the same text
    stats: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # extra files to save (tokenizer.model)


def _sp_model_file(base: Any, path: str) -> Path | None:
    """The SentencePiece `tokenizer.model` behind a base tokenizer, if it has one."""
    vocab_file = getattr(base, "vocab_file", None)
    if vocab_file and str(vocab_file).endswith(".model") and Path(vocab_file).is_file():
        return Path(vocab_file)
    p = Path(path) / "tokenizer.model"
    return p if p.is_file() else None


def load_base_tokenizer(path: str) -> tuple[Any, str, Path | None]:
    """(HF tokenizer, kind, tokenizer.model path): kind is bytelevel or sentencepiece."""
    try:
        src = resolve_source(path)
    except ModelError as e:
        raise VocabError(str(e)) from None
    if src.gguf_file is None and Path(src.path).is_dir():
        names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
        if not any((Path(src.path) / n).is_file() for n in names):
            raise VocabError(
                f"{path}: the base has no tokenizer (no tokenizer.json or tokenizer.model);"
                " copy the base model's tokenizer files into it"
            )
    try:
        base = load_tokenizer(path)
    except (ModelError, OSError, ValueError, TypeError) as e:
        raise VocabError(f"{path}: cannot load the base tokenizer: {e}") from None
    sp_file = _sp_model_file(base, src.path)
    if sp_file is not None:
        return base, "sentencepiece", sp_file
    backend = getattr(base, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") == "BPE" and "ByteLevel" in json.dumps(
        [spec.get("pre_tokenizer"), spec.get("decoder")]
    ):
        return base, "bytelevel", None
    raise VocabError(
        f"{path}: the base tokenizer is neither byte-level BPE (tokenizer.json) nor"
        f" SentencePiece (tokenizer.model): {spec.get('model', {}).get('type')} with"
        f" decoder {json.dumps(spec.get('decoder'))[:80]}; hanlm vocab cannot extend it"
    )
