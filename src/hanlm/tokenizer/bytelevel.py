"""Expanding a byte-level BPE base (`tokenizer.json`: GPT-2, SmolLM2, Qwen, LLaMA-3).

The corpus is segmented by the full base tokenizer; BPE merges are learned over *base tokens as
symbols* (each base token mapped to one private-use character so `tokenizers`' BpeTrainer can do
it); the merges are appended after every base merge, in learned order. At encode time the base
merges therefore all fire first and reproduce the base segmentation, and the new merges then
rebuild what the trainer saw. Only merges whose bytes hold a CJK lead byte are kept, so text
without CJK is tokenized exactly as before.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hanlm.tokenizer.base import Merged, VocabError, byte_decoder, has_cjk_bytes, log

_PUA = 0xF0000  # supplementary private-use plane: one character per base token, 65K of them


def _wrap(backend: Any, like: Any) -> Any:
    """A generic HF fast tokenizer around `backend` with the special tokens of `like`.

    Generic on purpose: some tokenizer classes rebuild their own normaliser and regex on load
    (Qwen2Tokenizer), which could tokenize differently from the merged `tokenizer.json`.
    """
    from transformers import PreTrainedTokenizerFast

    special = {
        k: getattr(like, k)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(like, k, None) is not None
    }
    extra = list(getattr(like, "extra_special_tokens", None) or [])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=like.model_max_length,
        extra_special_tokens=extra,
        **special,
    )
    tok.chat_template = like.chat_template
    return tok


def _segment(backend: Any, texts: list[str], keep: Any) -> Counter:
    """Count each pre-token's base-token sequence; keep those of 2+ tokens where `keep(ids)`.

    Encoding whole texts applies the base's normaliser and pre-tokenizer, so a space glued to
    a character (" 爱" starts with the token "Ġç") is seen as the base will see it.
    """
    from tqdm.auto import tqdm

    counts: Counter = Counter()
    step = 2000
    for i in tqdm(range(0, len(texts), step), desc="segment", unit_scale=step, leave=False):
        for enc in backend.encode_batch(texts[i : i + step], add_special_tokens=False):
            word: list[int] = []
            last = None
            for tid, wid in zip(enc.ids, enc.word_ids):
                if wid != last and word:
                    counts[tuple(word)] += 1
                    word = []
                word.append(tid)
                last = wid
            if word:
                counts[tuple(word)] += 1
    return Counter({w: c for w, c in counts.items() if len(w) > 1 and keep(w)})


def _bpe_merges(spec: dict[str, Any]) -> list[list[str]]:
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in spec["model"]["merges"]]


def _next_id(spec: dict[str, Any]) -> int:
    # After the largest id anywhere: special tokens may sit above the model vocabulary (Qwen2),
    # and an id in the hole would be silently re-assigned to them.
    ids = list(spec["model"]["vocab"].values()) + [t["id"] for t in spec["added_tokens"]]
    return max(ids) + 1


def _char_chains(
    texts: list[str], backend: Any, vocab: dict[str, int], min_count: int
) -> list[list[str]]:
    """Merges that build each frequent CJK character into one token, left to right.

    A character is skipped if a partial result is already a base token: the base did not
    produce that token here, so a chain through it could never fire.
    """
    chars = Counter(ch for t in texts for ch in t if has_cjk_bytes(ch.encode("utf-8")))
    inv = {i: s for s, i in vocab.items()}
    merges: list[list[str]] = []
    pairs: set[tuple[str, str]] = set()
    for ch, n in chars.most_common():
        if n < min_count:
            break
        parts = [inv[i] for i in backend.encode(ch, add_special_tokens=False).ids]
        steps = [("".join(parts[:k]), parts[k]) for k in range(1, len(parts))]
        if any(a + b in vocab for a, b in steps):
            continue
        for pair in steps:
            if pair not in pairs:
                pairs.add(pair)
                merges.append(list(pair))
    return merges


class Expansion:
    """A base's `tokenizer.json` and what is added to it: the new pieces (token -> id, numbered
    after the largest id anywhere in the base), their merges in order, and each new id's
    spelling in base ids."""

    def __init__(self, base: Any) -> None:
        self.spec = json.loads(base.backend_tokenizer.to_str())
        self.vocab: dict[str, int] = self.spec["model"]["vocab"]
        self.inv = {i: s for s, i in self.vocab.items()}
        self.dec = byte_decoder()
        self.cjk_id: dict[int, bool] = {}
        self.next_id = _next_id(self.spec)
        self.new_vocab: dict[str, int] = {}
        self.new_merges: list[list[str]] = []
        self.spelling: dict[int, list[int]] = {}
        # `tokenizers` ignores the ids stored for added tokens that the model vocabulary lacks
        # and numbers them after the model vocabulary, i.e. onto the new pieces' ids. Listing
        # them in the model vocabulary at their ids keeps them (the added-token matcher still
        # finds them first, so BPE never has to produce them).
        added = self.spec["added_tokens"]
        self.pinned = {t["content"]: t["id"] for t in added if t["content"] not in self.vocab}

    def to_bytes(self, token: str) -> bytes:
        return bytes(self.dec.get(c, 0x20) for c in token)

    def word_has_cjk(self, word: tuple[int, ...]) -> bool:
        for t in word:
            if t not in self.cjk_id:
                self.cjk_id[t] = t in self.inv and has_cjk_bytes(self.to_bytes(self.inv[t]))
            if self.cjk_id[t]:
                return True
        return False

    def add_token(self, token: str, parts: list[int]) -> None:
        if token not in self.new_vocab:
            self.new_vocab[token] = self.next_id
            self.spelling[self.next_id] = parts
            self.next_id += 1

    def build(self) -> Any:
        """The base with the new pieces and merges, as a `tokenizers` Tokenizer."""
        from tokenizers import Tokenizer

        out = json.loads(json.dumps(self.spec))
        out["model"]["vocab"].update({**self.pinned, **self.new_vocab})
        out["model"]["merges"] = _bpe_merges(self.spec) + self.new_merges
        return Tokenizer.from_str(json.dumps(out, ensure_ascii=False))


def expand_bytelevel(
    base: Any, texts: list[str], *, vocab_size: int, min_frequency: int, char_min_count: int
) -> Merged:
    """New BPE merges over base tokens, appended after every base merge (see module doc)."""
    ex = Expansion(base)
    backend, chains = base.backend_tokenizer, 0
    if char_min_count > 0:
        chains = _add_char_chains(ex, texts, backend, char_min_count)
        backend = ex.build()
    words, symbols = _cjk_words(ex, backend, texts, vocab_size)
    learned = _learn_merges(words, symbols, vocab_size, min_frequency)
    rejected = _add_learned(ex, learned, symbols)
    # Spell chain-made tokens inside learned spellings back down to base ids.
    for nid, parts in ex.spelling.items():
        ex.spelling[nid] = [q for p in parts for q in ex.spelling.get(p, [p])]
    if not ex.new_vocab:
        raise VocabError(
            f"no new pieces: all {len(learned)} learned merges were rejected (not CJK, or already"
            " base tokens); use more Chinese text or a larger vocab_size"
        )
    unused = _drop_unformed(ex, texts)
    merged = _wrap(ex.build(), base)
    stats = {
        "char_chain_merges": chains,
        "merges_learned": len(learned),
        "merges_added": len(ex.new_merges),
        **rejected,
        "dropped_never_formed": len(unused),
    }
    return Merged(merged, "bytelevel", len(base), sorted(ex.new_vocab.values()), ex.spelling, stats)


def _add_char_chains(ex: Expansion, texts: list[str], backend: Any, min_count: int) -> int:
    """Add the merges that make each frequent CJK character one token; how many."""
    t0 = time.time()
    chains = 0
    for a, b in _char_chains(texts, backend, ex.vocab, min_count):
        ids = [ex.new_vocab.get(t, ex.vocab.get(t)) for t in (a, b)]
        ex.add_token(a + b, [q for i in ids for q in ex.spelling.get(i, [i])])
        ex.new_merges.append([a, b])
        chains += 1
    log(f"{chains} merges make frequent characters single tokens ({time.time() - t0:.1f}s)")
    return chains


@dataclass
class Symbols:
    """The base tokens of the corpus's CJK pre-tokens, one private-use character each for the
    trainer: the character of each token id (`of_id`), and each character's token string and
    id."""

    of_id: dict[int, str]
    token: dict[str, str]
    id: dict[str, int]


def _cjk_words(
    ex: Expansion, backend: Any, texts: list[str], vocab_size: int
) -> tuple[Counter, Symbols]:
    """The corpus's pre-tokens of 2+ base tokens holding CJK, counted, and their symbols."""
    t0 = time.time()
    words = _segment(backend, texts, ex.word_has_cjk)
    if not words:
        raise VocabError(
            "the corpus holds no Chinese (CJK) text: nothing to learn for the base vocabulary"
        )
    whole = {**ex.vocab, **ex.new_vocab}
    inv_all = {i: s for s, i in whole.items()}
    symbols = sorted({t for w in words for t in w})
    if len(symbols) > 0xFFFD:
        raise VocabError(f"{len(symbols)} distinct base tokens in the corpus: too many symbols")
    sym = {t: chr(_PUA + k) for k, t in enumerate(symbols)}
    sym_token = {chr(_PUA + k): inv_all[t] for k, t in enumerate(symbols)}
    sym_id = {chr(_PUA + k): t for k, t in enumerate(symbols)}
    log(
        f"segmented {sum(map(len, texts)):,} chars: {sum(words.values()):,} CJK pre-tokens"
        f" of 2+ base tokens ({len(words):,} distinct, {len(symbols):,} distinct tokens)"
        f" ({time.time() - t0:.1f}s)"
    )
    if vocab_size <= len(symbols):
        raise VocabError(
            f"vocab_size={vocab_size} is too small to add anything: the corpus already uses"
            f" {len(symbols)} distinct base tokens, which the trained tokenizer starts from;"
            f" set vocab_size above that (e.g. {len(symbols) + 10000})"
        )
    return words, Symbols(sym, sym_token, sym_id)


def _learn_merges(
    words: Counter, symbols: Symbols, vocab_size: int, min_frequency: int
) -> list[list[str]]:
    """BPE merges learned by `tokenizers`' BpeTrainer over the words spelled in symbols."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t0 = time.time()
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=sys.stderr.isatty(),
    )
    sym_words = [("".join(symbols.of_id[t] for t in w), c) for w, c in words.items()]

    def batches() -> Any:
        for k in range(0, len(sym_words), 1000):
            yield " ".join(" ".join([w] * c) for w, c in sym_words[k : k + 1000])

    trainer_tok.train_from_iterator(batches(), trainer, length=len(sym_words) // 1000 + 1)
    learned = _bpe_merges(json.loads(trainer_tok.to_str()))
    log(f"learned {len(learned):,} merges over base tokens ({time.time() - t0:.1f}s)")
    return learned


def _add_learned(ex: Expansion, learned: list[list[str]], symbols: Symbols) -> dict[str, int]:
    """The learned merges translated to base-token strings: CJK merges whose result is new and
    whose parts exist are added; returns the counts of the others, by why they were left out."""
    ok = set(symbols.token)
    seen_pairs = {tuple(m) for m in ex.new_merges}
    rejected_non_cjk = rejected_existing = dropped = 0
    for a, b in learned:
        if a not in ok or b not in ok:
            dropped += 1  # built on a rejected merge: its parts never exist
            continue
        ta = "".join(symbols.token[c] for c in a)
        tb = "".join(symbols.token[c] for c in b)
        if not has_cjk_bytes(ex.to_bytes(ta + tb)):
            rejected_non_cjk += 1
            continue
        if ta + tb in ex.vocab:
            rejected_existing += 1
            continue
        ok.add(a + b)
        ex.add_token(ta + tb, [symbols.id[c] for c in a + b])
        if (ta, tb) not in seen_pairs:
            seen_pairs.add((ta, tb))
            ex.new_merges.append([ta, tb])
    return {
        "rejected_not_cjk": rejected_non_cjk,
        "rejected_already_base": rejected_existing,
        "dropped_built_on_rejected": dropped,
    }


def _drop_unformed(ex: Expansion, texts: list[str]) -> set[str]:
    """Drop the pieces that never form on the corpus they were learned from (a merge dropped
    above can take away the context a later one was learned in), renumbering the rest; returns
    them. A piece forms if it is in the output or is a part of a merge that builds one that
    forms; merges of pieces that never form never fire, so removing them leaves the
    segmentation of the corpus, and every other piece, as is."""
    t0 = time.time()
    inv_new = {i: t for t, i in ex.new_vocab.items()}
    live = {
        inv_new[i]
        for e in ex.build().encode_batch(texts, add_special_tokens=False)
        for i in e.ids
        if i in inv_new
    }
    makers: dict[str, list[list[str]]] = {}
    for m in ex.new_merges:
        makers.setdefault(m[0] + m[1], []).append(m)
    todo = list(live)
    while todo:
        for m in makers.get(todo.pop(), []):
            for part in m:
                if part in ex.new_vocab and part not in live:
                    live.add(part)
                    todo.append(part)
    unused = set(ex.new_vocab) - live
    if unused:
        ex.new_merges = [m for m in ex.new_merges if not {m[0], m[1], m[0] + m[1]} & unused]
        kept = [t for t in ex.new_vocab if t not in unused]  # insertion order is id order
        remap = {ex.new_vocab[t]: _next_id(ex.spec) + k for k, t in enumerate(kept)}
        ex.new_vocab = {t: remap[ex.new_vocab[t]] for t in kept}
        ex.spelling = {remap[i]: parts for i, parts in ex.spelling.items() if i in remap}
    log(f"dropped {len(unused)} pieces that never form on the corpus ({time.time() - t0:.1f}s)")
    return unused
