"""Text cleaning and deduplication, each step counted so nothing disappears unexplained."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Literal

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200e\u200f\ufeff]")
_SPACES = re.compile(r"[ \t\u3000\xa0]+")  # includes the ideographic space
_BLANK_LINES = re.compile(r"\n{3,}")
# Dedup key: letters, digits and CJK only, case-folded, so "你好，世界!" == "你好 世界".
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str, form: Literal["none", "nfc", "nfkc"] = "nfc") -> str:
    if form == "none":
        return text
    return unicodedata.normalize(form.upper(), text)


def clean_text(text: str) -> str:
    """Drop control characters and tidy whitespace, keeping line structure (poems need it)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def dedup_key(text: str, mode: Literal["exact", "normalized"]) -> bytes:
    if mode == "normalized":
        text = _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())
    # 8 bytes a record keeps dedup of corpora larger than memory affordable.
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
