"""Measuring a tokenizer (tokens per character, byte fallback, round trip) and checking a merge."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from hanlm.tokenizer.base import PROBE_TEXTS, VocabError, byte_decoder, has_cjk_bytes

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def fragment_ids(tok: Any) -> set[int]:
    """Ids of byte pieces: `<0xNN>` byte fallback, or byte-level tokens that are not whole
    UTF-8 characters."""
    vocab = tok.get_vocab()
    out = {i for s, i in vocab.items() if _BYTE_PIECE.fullmatch(s)}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in json.dumps(json.loads(backend.to_str())["decoder"]):
        dec = byte_decoder()
        for s, i in vocab.items():
            if all(c in dec for c in s):
                try:
                    bytes(dec[c] for c in s).decode("utf-8")
                except UnicodeDecodeError:
                    out.add(i)
    return out


def _encode_all(tok: Any, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def measure(tok: Any, texts: list[str], fragments: set[int] | None = None) -> dict[str, Any]:
    """Tokens per character, byte-fallback rate and round-trip failures of `tok` on `texts`."""
    fragments = fragment_ids(tok) if fragments is None else fragments
    encoded = _encode_all(tok, texts)
    chars = sum(len(t) for t in texts)
    tokens = sum(len(e) for e in encoded)
    frag = sum(1 for e in encoded for i in e if i in fragments)
    unk = tok.unk_token_id
    unks = sum(e.count(unk) for e in encoded) if unk is not None else 0
    bad = sum(1 for t, e in zip(texts, encoded) if tok.decode(e, skip_special_tokens=False) != t)
    return {
        "texts": len(texts),
        "chars": chars,
        "tokens": tokens,
        "tokens_per_char": round(tokens / max(chars, 1), 4),
        "byte_fallback_rate": round(frag / max(tokens, 1), 4),
        "unk_rate": round(unks / max(tokens, 1), 4),
        "round_trip_failures": bad,
    }


def check_merge(base: Any, merged: Any, english: list[str], chinese: list[str]) -> dict[str, Any]:
    """Every base id unchanged, English ids identical, and the round trip on mixed text."""
    bv, mv = base.get_vocab(), merged.get_vocab()
    moved = [t for t, i in bv.items() if mv.get(t) != i]
    if moved:
        raise VocabError(f"merging moved {len(moved)} base tokens, e.g. {moved[:5]}")
    en_base, en_merged = _encode_all(base, english), _encode_all(merged, english)
    changed = [t for t, a, b in zip(english, en_base, en_merged) if a != b]
    if changed:
        raise VocabError(f"English ids changed by the merge, e.g. on {changed[0][:60]!r}")
    no_cjk = [t for t in [*PROBE_TEXTS, *chinese] if not has_cjk_bytes(t.encode("utf-8"))]
    if _encode_all(base, no_cjk) != _encode_all(merged, no_cjk):
        raise VocabError("text without CJK characters tokenizes differently after the merge")
    probes = [*PROBE_TEXTS, *chinese[:500]]
    for t, eb, em in zip(probes, _encode_all(base, probes), _encode_all(merged, probes)):
        if base.decode(eb) == t and merged.decode(em) != t:
            raise VocabError(f"decode(encode(x)) != x after the merge, e.g. for {t[:60]!r}")
    return {"base_ids_unchanged": True, "english_ids_identical": True, "round_trip": True}


def check_reload(tok: Any, out: Path, texts: list[str]) -> None:
    """The saved directory must tokenize exactly like the tokenizer we built."""
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(out))
    for t in texts:
        if again.encode(t, add_special_tokens=False) != tok.encode(t, add_special_tokens=False):
            raise VocabError(f"{out}: AutoTokenizer gives different ids on {t[:40]!r}")


def top_new_pieces(tok: Any, new_ids: list[int], texts: list[str], n: int) -> tuple[list, int]:
    """The `n` most frequent new pieces on `texts`, and how many new ids never occur there."""
    new = set(new_ids)
    counts = Counter(i for e in _encode_all(tok, texts) for i in e if i in new)
    top = [
        {"id": i, "piece": tok.decode([i]), "token": tok.convert_ids_to_tokens(i), "count": c}
        for i, c in counts.most_common(n)
    ]
    return top, len(new - set(counts))
