"""Token ids to text as they arrive: never a half character, never a half stop string.

A byte-level BPE splits a Chinese character into up to three byte tokens, and decoding a prefix
that ends inside one gives U+FFFD. `Detokenizer` decodes a sliding window of recent tokens (so a
tokenizer's leading-space rules see the same context as a full decode) and holds text back while
it ends in U+FFFD, or while its tail could still grow into a stop string. An answer that ends
inside a character (`max_tokens` reached after its first byte, or an end-of-turn token right
after it) ends at the last whole one, as llama.cpp's server ends it.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Feed tokens with `push`; each call returns the text that is now final. `finish` returns
    the rest. After a stop string is seen, `stopped` is True and nothing more is returned."""

    def __init__(self, tok: Any, stop: list[str] | None = None) -> None:
        self.tok = tok
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for the decoder
        self.read_offset = 0  # tokens before this are already in `self.text`
        self.text = ""  # decoded, final text (may still hold a stop-string candidate)
        self.sent = 0  # characters of `self.text` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        now = self._decode(self.ids[self.prefix_offset :])
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            self.text += now[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The remaining text, without the bytes of a character left incomplete at the end
        (which a full decode would show as U+FFFD)."""
        if self.stopped:
            return ""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        now = self._decode(self.ids[self.prefix_offset :])
        tail = now[len(before) :]
        if tail.endswith(REPLACEMENT) and self._cut_inside_a_character():
            tail = tail[:-1]  # (a decoder shows a cut character as one U+FFFD)
        self.text += tail
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)

    def _cut_inside_a_character(self) -> bool:
        """The tokens not yet released end with the first bytes of a UTF-8 character. Bytes that
        can never start one (stray continuation bytes, say) are not a cut: a full decode shows
        them as U+FFFD, and so does the answer. Tokens whose bytes cannot be known: a cut.
        Special tokens (an end-of-turn id, say) are no text and are passed over."""
        special = set(self.tok.all_special_ids)
        data = bytearray()
        for t in self.ids[self.read_offset :]:
            if t in special:
                continue
            b = token_bytes(self.tok, t)
            if b is None:
                return True
            data += bytes(b)
        return incomplete_utf8(bytes(data))

    def _release(self, final: bool) -> str:
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.sent - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.text = self.text[:end]
                self.stopped = True
                out = self.text[self.sent :]
                self.sent = len(self.text)
                return out
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


def incomplete_utf8(data: bytes) -> bool:
    """`data` ends with the start of a multi-byte UTF-8 character that lacks its last bytes."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if 0x80 <= b <= 0xBF:  # a continuation byte: look further back for the lead
            continue
        need = 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 0
        return back < need
    return False


def token_text(tok: Any, token: int) -> str:
    """One token as text, for log-prob listings (a partial character shows as U+FFFD)."""
    return tok.decode([token], skip_special_tokens=False)


def token_bytes(tok: Any, token: int) -> list[int] | None:
    """The UTF-8 bytes a token stands for, where they can be known."""
    text = token_text(tok, token)
    if REPLACEMENT not in text:
        return list(text.encode("utf-8"))
    piece = tok.convert_ids_to_tokens(token)
    byte_map = _byte_level_map()
    if isinstance(piece, str) and all(c in byte_map for c in piece):
        return [byte_map[c] for c in piece]  # GPT-2 style byte-level vocabulary
    if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x"):
        return [int(piece[3:5], 16)]  # SentencePiece byte fallback
    return None


_BYTE_MAP: dict[str, int] = {}


def _byte_level_map() -> dict[str, int]:
    """GPT-2's printable-character alias of each byte (the table every byte-level BPE uses)."""
    if not _BYTE_MAP:
        printable = [
            *range(ord("!"), ord("~") + 1),
            *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1),
        ]
        extra = 0
        for b in range(256):
            if b in printable:
                _BYTE_MAP[chr(b)] = b
            else:
                _BYTE_MAP[chr(256 + extra)] = b
                extra += 1
    return _BYTE_MAP
