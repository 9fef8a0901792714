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


def expand_bytelevel(
    base: Any, texts: list[str], *, vocab_size: int, min_frequency: int, char_min_count: int
) -> Merged:
    """New BPE merges over base tokens, appended after every base merge (see module doc)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    spec = json.loads(base.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    inv = {i: s for s, i in vocab.items()}
    dec = byte_decoder()

    def to_bytes(token: str) -> bytes:
        return bytes(dec.get(c, 0x20) for c in token)

    cjk_id: dict[int, bool] = {}

    def word_has_cjk(word: tuple[int, ...]) -> bool:
        for t in word:
            if t not in cjk_id:
                cjk_id[t] = t in inv and has_cjk_bytes(to_bytes(inv[t]))
            if cjk_id[t]:
                return True
        return False

    next_id = _next_id(spec)
    new_vocab: dict[str, int] = {}
    new_merges: list[list[str]] = []
    spelling: dict[int, list[int]] = {}
    backend = base.backend_tokenizer

    def add_token(token: str, parts: list[int]) -> None:
        nonlocal next_id
        if token not in new_vocab:
            new_vocab[token] = next_id
            spelling[next_id] = parts
            next_id += 1

    # `tokenizers` ignores the ids stored for added tokens that the model vocabulary lacks and
    # numbers them after the model vocabulary, i.e. onto the new pieces' ids. Listing them in
    # the model vocabulary at their ids keeps them (the added-token matcher still finds them
    # first, so BPE never has to produce them).
    pinned = {t["content"]: t["id"] for t in spec["added_tokens"] if t["content"] not in vocab}

    def build() -> Any:
        out = json.loads(json.dumps(spec))
        out["model"]["vocab"].update({**pinned, **new_vocab})
        out["model"]["merges"] = _bpe_merges(spec) + new_merges
        return Tokenizer.from_str(json.dumps(out, ensure_ascii=False))

    chains = 0
    if char_min_count > 0:
        t0 = time.time()
        for a, b in _char_chains(texts, backend, vocab, char_min_count):
            ids = [new_vocab.get(t, vocab.get(t)) for t in (a, b)]
            add_token(a + b, [q for i in ids for q in spelling.get(i, [i])])
            new_merges.append([a, b])
            chains += 1
        backend = build()
        log(f"{chains} merges make frequent characters single tokens ({time.time() - t0:.1f}s)")

    t0 = time.time()
    words = _segment(backend, texts, word_has_cjk)
    if not words:
        raise VocabError(
            "the corpus holds no Chinese (CJK) text: nothing to learn for the base vocabulary"
        )
    whole = {**vocab, **new_vocab}
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

    t0 = time.time()
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=sys.stderr.isatty(),
    )
    sym_words = [("".join(sym[t] for t in w), c) for w, c in words.items()]

    def batches() -> Any:
        for k in range(0, len(sym_words), 1000):
            yield " ".join(" ".join([w] * c) for w, c in sym_words[k : k + 1000])

    trainer_tok.train_from_iterator(batches(), trainer, length=len(sym_words) // 1000 + 1)
    learned = _bpe_merges(json.loads(trainer_tok.to_str()))
    log(f"learned {len(learned):,} merges over base tokens ({time.time() - t0:.1f}s)")

    # Translate to base-token strings; keep CJK merges whose result is new and whose parts exist.
    ok = set(sym_token)
    seen_pairs = {tuple(m) for m in new_merges}
    rejected_non_cjk = rejected_existing = dropped = 0
    for a, b in learned:
        if a not in ok or b not in ok:
            dropped += 1  # built on a rejected merge: its parts never exist
            continue
        ta = "".join(sym_token[c] for c in a)
        tb = "".join(sym_token[c] for c in b)
        if not has_cjk_bytes(to_bytes(ta + tb)):
            rejected_non_cjk += 1
            continue
        if ta + tb in vocab:
            rejected_existing += 1
            continue
        ok.add(a + b)
        add_token(ta + tb, [sym_id[c] for c in a + b])
        if (ta, tb) not in seen_pairs:
            seen_pairs.add((ta, tb))
            new_merges.append([ta, tb])
    # Spell chain-made tokens inside learned spellings back down to base ids.
    for nid, parts in spelling.items():
        spelling[nid] = [q for p in parts for q in spelling.get(p, [p])]
    if not new_vocab:
        raise VocabError(
            f"no new pieces: all {len(learned)} learned merges were rejected (not CJK, or already"
            " base tokens); use more Chinese text or a larger vocab_size"
        )
    # Drop pieces that never form on the corpus they were learned from (a merge dropped above can
    # take away the context a later one was learned in). A piece forms if it is in the output or
    # is a part of a merge that builds one that forms; merges of pieces that never form never
    # fire, so removing them leaves the segmentation of the corpus, and every other piece, as is.
    t0 = time.time()
    inv_new = {i: t for t, i in new_vocab.items()}
    live = {
        inv_new[i]
        for e in build().encode_batch(texts, add_special_tokens=False)
        for i in e.ids
        if i in inv_new
    }
    makers: dict[str, list[list[str]]] = {}
    for m in new_merges:
        makers.setdefault(m[0] + m[1], []).append(m)
    todo = list(live)
    while todo:
        for m in makers.get(todo.pop(), []):
            for part in m:
                if part in new_vocab and part not in live:
                    live.add(part)
                    todo.append(part)
    unused = set(new_vocab) - live
    if unused:
        new_merges = [m for m in new_merges if not {m[0], m[1], m[0] + m[1]} & unused]
        kept = [t for t in new_vocab if t not in unused]  # insertion order is id order
        remap = {new_vocab[t]: _next_id(spec) + k for k, t in enumerate(kept)}
        new_vocab = {t: remap[new_vocab[t]] for t in kept}
        spelling = {remap[i]: parts for i, parts in spelling.items() if i in remap}
    log(f"dropped {len(unused)} pieces that never form on the corpus ({time.time() - t0:.1f}s)")
    merged = _wrap(build(), base)
    stats = {
        "char_chain_merges": chains,
        "merges_learned": len(learned),
        "merges_added": len(new_merges),
        "rejected_not_cjk": rejected_non_cjk,
        "rejected_already_base": rejected_existing,
        "dropped_built_on_rejected": dropped,
        "dropped_never_formed": len(unused),
    }
    return Merged(merged, "bytelevel", len(base), sorted(new_vocab.values()), spelling, stats)
