"""`hanlm vocab`: train a Chinese tokenizer, merge it into a base vocabulary, grow the model.

Reads top to bottom: corpus -> (no base) train a tokenizer from scratch, or (base) learn new
pieces and merge them into the base tokenizer keeping every existing id -> check round trip and
English identity -> resize the model's embeddings and LM head and initialise the new rows ->
save an ordinary HF directory -> report tokens per character before and after.

Two bases are supported, each merged in its own terms:
- byte-level BPE (`tokenizer.json`: GPT-2, SmolLM2, Qwen, LLaMA-3). The corpus is segmented by
  the full base tokenizer; BPE merges are learned over *base tokens as symbols* (each base token
  mapped to one private-use character so `tokenizers`' BpeTrainer can do it); the merges are
  appended after every base merge, in learned order. At encode time the base merges therefore
  all fire first and reproduce the base segmentation, and the new merges then rebuild what the
  trainer saw. Only merges whose bytes hold a CJK lead byte are kept, so text without CJK is
  tokenized exactly as before.
- SentencePiece (`tokenizer.model`: LLaMA-1/2, Baichuan). A SentencePiece model trained on the
  corpus with the base's own normaliser; its pieces that the base lacks and that hold CJK are
  appended to the base proto, with scores below every base score in learned order (a BPE base
  merges by score, so the new pieces fire only after all base merges, as above).
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hanlm.config import ConfigError, DataConfig, ModelConfig, OutputConfig, opt
from hanlm.modeling import ModelError
from hanlm.runs import Run, atomic_write_json, atomic_write_text

_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
_PUA = 0xF0000  # supplementary private-use plane: one character per base token, 65K of them
_SCRATCH_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
_ENGLISH_FALLBACK = [
    "The quick brown fox jumps over the lazy dog, then runs back home at 5:30 p.m.",
    "In the beginning God created the heavens and the earth.",
    "def main(argv: list[str]) -> int:\n    return 0  # “quotes” — dashes… and emoji 😀",
]
# Mixed text every merge is checked on: Chinese, English, full-width punctuation, emoji, a rare
# CJK extension-B character, kana, Cyrillic and leading/double spaces.
PROBE_TEXTS = [
    "床前明月光，疑是地上霜。Hello, world! 😀👍🏽 𠀀𪚥 ひらがな Привет  two  spaces",
    " 我爱北京天安门 and I ❤ Beijing（北京）「引号」……",
    "2024年3月15日，GPT-4o 的 tokenizer 有 200K 个词。\n\t第二行：《红楼梦》",
]


@dataclass
class VocabConfig(OutputConfig):
    model: ModelConfig = opt(
        ModelConfig, "base model to expand (HF dir, .gguf, pkg:DIST/FILE); empty = new tokenizer"
    )
    data: DataConfig = opt(
        DataConfig,
        "Chinese corpus (no paths: the embedded zh_corpus; held-out text from data.valid_paths"
        " or data.valid_fraction)",
    )
    english: list[str] = opt(
        [], "English text for the report and the identity check (default: embedded en_corpus)"
    )
    method: Literal["auto", "sentencepiece", "bytelevel"] = opt(
        "auto",
        "tokenizer to train: auto = the base's kind (byte-level BPE or SentencePiece);"
        " sentencepiece without a base",
    )
    vocab_size: int = opt(
        20000,
        "size of the tokenizer trained on the corpus; with a base, its pieces the base lacks are"
        " added (Chinese-LLaMA: 20000); byte-level: base tokens seen + merges learned",
    )
    sp_model_type: Literal["bpe", "unigram"] = opt("bpe", "SentencePiece model type")
    character_coverage: float = opt(
        0.9995, "SentencePiece: share of characters covered by pieces (rest: byte fallback)"
    )
    byte_fallback: bool = opt(True, "SentencePiece from scratch: unknown characters as bytes")
    min_frequency: int = opt(2, "byte-level BPE: a merge needs at least this many occurrences")
    char_min_count: int = opt(
        0,
        "byte-level expansion: first make each CJK character seen at least this often one token"
        " (0 = leave characters to the learned merges)",
    )
    template: str = opt(
        "auto",
        "chat template saved with the tokenizer: auto = the base's own (chatml for a new"
        " tokenizer), or chatml, llama3, llama2, alpaca",
    )
    init: Literal["mean", "subword_mean"] = opt(
        "subword_mean",
        "new embedding rows: mean of all old rows, or mean of the rows of the base tokens that"
        " spelled the same text",
    )
    init_noise: float = opt(
        0.0, "Gaussian noise added to new rows, as a fraction of the old rows' per-dim std"
    )
    pad_to_multiple_of: int = opt(64, "pad the embedding rows to a multiple of this")
    resize_model: bool = opt(
        True, "with a base: also load, resize and save the model (false: tokenizer only)"
    )
    top_pieces: int = opt(30, "how many of the most frequent new pieces the report lists")
    seed: int = opt(0, "seed for the noise of init_noise")

    def validate(self) -> None:
        from hanlm.data.templates import TEMPLATE_NAMES

        if self.vocab_size < 1:
            raise ConfigError(f"vocab_size={self.vocab_size} must be positive")
        if not 0 < self.character_coverage <= 1:
            raise ConfigError(f"character_coverage={self.character_coverage} must be in (0, 1]")
        if self.pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of} must be >= 1")
        if self.init_noise < 0:
            raise ConfigError(f"init_noise={self.init_noise} must be >= 0")
        if self.template not in TEMPLATE_NAMES:
            raise ConfigError(f"template={self.template!r}: choose one of {TEMPLATE_NAMES}")


class VocabError(ModelError, ConfigError):
    """A vocabulary that cannot be built as asked (a ConfigError, so the CLI prints it cleanly)."""


def _log(msg: str) -> None:
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


def _byte_decoder() -> dict[str, int]:
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


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# --------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    train: list[str]
    held_out: list[str]
    held_out_is_separate: bool
    english: list[str]
    stats: dict[str, Any]


def read_corpus(cfg: VocabConfig) -> Corpus:
    """Chinese training and held-out text, and English text, all through the data layer."""
    from dataclasses import replace

    from hanlm.data import DataError, load

    data = cfg.data
    if not data.paths:
        data = replace(data, paths=[str(_ASSETS / "zh_corpus.train.jsonl.gz")])
        if not data.valid_paths and not data.valid_fraction:
            data = replace(data, valid_paths=[str(_ASSETS / "zh_corpus.valid.jsonl.gz")])
    loaded = load(data, kind="text")
    train = [r["text"] for r in loaded.train if r["text"].strip()]
    if not train:
        raise DataError(f"{data.paths}: the corpus holds no text to train a tokenizer on")
    held = [r["text"] for r in loaded.valid]
    separate = bool(held)
    if not separate:
        _log("no held-out text (set data.valid_paths or data.valid_fraction): the report's")
        _log("Chinese rows are measured on (up to 2000 records of) the training text")
        held = train[:2000]
    if cfg.english:
        en = load(DataConfig(paths=cfg.english, dedup="none", clean=False), kind="text")
        english = [r["text"] for r in en.train + en.valid]
    elif (_ASSETS / "en_corpus.valid.jsonl.gz").is_file():
        en_cfg = DataConfig(paths=[str(_ASSETS / "en_corpus.valid.jsonl.gz")], dedup="none")
        english = [r["text"] for r in load(en_cfg, kind="text").train]
    else:
        english = list(_ENGLISH_FALLBACK)
    return Corpus(train, held, separate, english, loaded.stats.as_dict())


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
    from hanlm.modeling import load_tokenizer, resolve_source

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


# --------------------------------------------------------------------------- byte-level merge


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


def expand_bytelevel(base: Any, texts: list[str], cfg: VocabConfig) -> Merged:
    """New BPE merges over base tokens, appended after every base merge (see module doc)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    spec = json.loads(base.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    inv = {i: s for s, i in vocab.items()}
    dec = _byte_decoder()

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
    if cfg.char_min_count > 0:
        t0 = time.time()
        for a, b in _char_chains(texts, backend, vocab, cfg.char_min_count):
            ids = [new_vocab.get(t, vocab.get(t)) for t in (a, b)]
            add_token(a + b, [q for i in ids for q in spelling.get(i, [i])])
            new_merges.append([a, b])
            chains += 1
        backend = build()
        _log(f"{chains} merges make frequent characters single tokens ({time.time() - t0:.1f}s)")

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
    _log(
        f"segmented {sum(map(len, texts)):,} chars: {sum(words.values()):,} CJK pre-tokens"
        f" of 2+ base tokens ({len(words):,} distinct, {len(symbols):,} distinct tokens)"
        f" ({time.time() - t0:.1f}s)"
    )
    if cfg.vocab_size <= len(symbols):
        raise VocabError(
            f"vocab_size={cfg.vocab_size} is too small to add anything: the corpus already uses"
            f" {len(symbols)} distinct base tokens, which the trained tokenizer starts from;"
            f" set vocab_size above that (e.g. {len(symbols) + 10000})"
        )

    t0 = time.time()
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        show_progress=sys.stderr.isatty(),
    )
    sym_words = [("".join(sym[t] for t in w), c) for w, c in words.items()]

    def batches() -> Any:
        for k in range(0, len(sym_words), 1000):
            yield " ".join(" ".join([w] * c) for w, c in sym_words[k : k + 1000])

    trainer_tok.train_from_iterator(batches(), trainer, length=len(sym_words) // 1000 + 1)
    learned = _bpe_merges(json.loads(trainer_tok.to_str()))
    _log(f"learned {len(learned):,} merges over base tokens ({time.time() - t0:.1f}s)")

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
    _log(f"dropped {len(unused)} pieces that never form on the corpus ({time.time() - t0:.1f}s)")
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


# --------------------------------------------------------------------------- SentencePiece


def _train_sentencepiece(
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


def _sp_hf_tokenizer(model_bytes: bytes, config: dict[str, Any]) -> Any:
    """An HF tokenizer for a SentencePiece model (transformers converts the proto on load)."""
    import tempfile

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


def expand_sentencepiece(base: Any, sp_file: Path, texts: list[str], cfg: VocabConfig) -> Merged:
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
    if unigram_base and cfg.sp_model_type != "unigram":
        raise VocabError(
            f"{sp_file} is a unigram model: pass sp_model_type=unigram so the new pieces come"
            " with unigram scores"
        )
    t0 = time.time()
    zh_bytes = _train_sentencepiece(
        texts,
        cfg.vocab_size,
        cfg.sp_model_type,
        cfg.character_coverage,
        False,
        proto.normalizer_spec,
        specials=False,
    )
    zh = pb.ModelProto()
    zh.ParseFromString(zh_bytes)
    _log(f"trained a {len(zh.pieces):,}-piece SentencePiece model ({time.time() - t0:.1f}s)")

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
            f"vocab_size={cfg.vocab_size} is too small to add anything: every CJK piece of the"
            " trained model is already in the base; raise vocab_size"
        )
    model_bytes = proto.SerializeToString()
    tok = _sp_hf_tokenizer(model_bytes, _sp_config(base))
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


# --------------------------------------------------------------------------- from scratch


def train_scratch(texts: list[str], cfg: VocabConfig, method: str) -> tuple[Any, dict[str, bytes]]:
    """A new tokenizer (SentencePiece, or byte-level BPE) as an HF tokenizer."""
    files: dict[str, bytes] = {}
    if method == "bytelevel":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        if cfg.vocab_size <= 256 + len(_SCRATCH_SPECIALS):
            raise VocabError(
                f"vocab_size={cfg.vocab_size} is too small to add anything: a byte-level BPE"
                f" needs 256 bytes and {len(_SCRATCH_SPECIALS)} special tokens first"
            )
        bt = Tokenizer(models.BPE())
        bt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bt.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
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
        model = _train_sentencepiece(
            texts,
            cfg.vocab_size,
            cfg.sp_model_type,
            cfg.character_coverage,
            cfg.byte_fallback,
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
        tok = _sp_hf_tokenizer(model, conf)
        files["tokenizer.model"] = model
    return tok, files


# --------------------------------------------------------------------------- measuring


def _fragment_ids(tok: Any) -> set[int]:
    """Ids of byte pieces: `<0xNN>` byte fallback, or byte-level tokens that are not whole
    UTF-8 characters."""
    vocab = tok.get_vocab()
    out = {i for s, i in vocab.items() if _BYTE_PIECE.fullmatch(s)}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in json.dumps(json.loads(backend.to_str())["decoder"]):
        dec = _byte_decoder()
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
    fragments = _fragment_ids(tok) if fragments is None else fragments
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


# --------------------------------------------------------------------------- report


def format_report(r: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    lines = [f"hanlm vocab: {r['mode']}"]
    sizes = [
        ("base vocabulary", r.get("base_vocab_size")),
        ("pieces added", r.get("pieces_added")),
        ("merged vocabulary", r["vocab_size"]),
        ("model embedding rows", r.get("model_rows")),
    ]
    lines += [f"  {k:<22}{v:>10,}" for k, v in sizes if v is not None]
    head = f"  {'text':<20}{'chars':>9}  {'tok/char':>17}  {'ratio':>6}  {'byte fallback':>15}"
    lines += ["", head, "  " + "-" * (len(head) - 2)]
    for name, row in r["eval"].items():
        b, m = row.get("base"), row["merged"]
        tpc = f"{b['tokens_per_char']:.3f} -> " if b else ""
        tpc += f"{m['tokens_per_char']:.3f}"
        fb = f"{b['byte_fallback_rate']:.1%} -> " if b else ""
        fb += f"{m['byte_fallback_rate']:.1%}"
        ratio = f"{row['ratio']:.3f}" if row.get("ratio") is not None else "-"
        lines.append(f"  {name:<20}{m['chars']:>9,}  {tpc:>17}  {ratio:>6}  {fb:>15}")
    if r.get("top_new_pieces"):
        pieces = "  ".join(f"{p['piece']!r}:{p['count']}" for p in r["top_new_pieces"][:15])
        lines += ["", f"  most frequent new pieces: {pieces}"]
    return "\n".join(lines)


def _eval_rows(
    base: Any | None, tok: Any, chinese: list[str], english: list[str], held_out: bool
) -> dict[str, Any]:
    frag_m = _fragment_ids(tok)
    frag_b = _fragment_ids(base) if base is not None else None
    out: dict[str, Any] = {}
    for name, texts in (
        ("chinese_held_out" if held_out else "chinese_train", chinese),
        ("english", english),
    ):
        m = measure(tok, texts, frag_m)
        b = measure(base, texts, frag_b) if base is not None else None
        ratio = round(m["tokens_per_char"] / b["tokens_per_char"], 4) if b else None
        out[name] = {"base": b, "merged": m, "ratio": ratio}
    return out


# --------------------------------------------------------------------------- the stage


def run(cfg: VocabConfig) -> Path:
    started = time.time()
    with Run("vocab", cfg, cfg.output_dir, cfg.overwrite, seed=cfg.seed) as run_:
        corpus = read_corpus(cfg)
        run_.set("data", corpus.stats)
        chars = sum(map(len, corpus.train))
        _log(f"corpus: {len(corpus.train):,} texts, {chars:,} chars")
        files: dict[str, bytes] = {}
        base = merged = None
        report: dict[str, Any] = {}
        if cfg.model.path:
            from hanlm.modeling import model_config

            if cfg.resize_model:
                try:  # fail now, not after training, on a model that is not a causal LM
                    model_config(cfg.model)
                except ModelError as e:
                    raise VocabError(str(e)) from None
            base, kind, sp_file = load_base_tokenizer(cfg.model.path)
            method = kind if cfg.method == "auto" else cfg.method
            if method != kind:
                raise VocabError(
                    f"method={cfg.method} cannot extend a {kind} base: a SentencePiece model"
                    " cannot be merged into a byte-level tokenizer (nor the reverse); use"
                    " method=auto"
                )
            _log(f"base: {cfg.model.path} ({kind}, {len(base):,} tokens)")
            if kind == "bytelevel":
                merged = expand_bytelevel(base, corpus.train, cfg)
            else:
                assert sp_file is not None
                merged = expand_sentencepiece(base, sp_file, corpus.train, cfg)
            tok, files = merged.tokenizer, merged.files
            report.update(check_merge(base, tok, corpus.english, corpus.held_out))
            report["mode"] = f"expand {kind} base"
        else:
            method = "sentencepiece" if cfg.method == "auto" else cfg.method
            t0 = time.time()
            tok, files = train_scratch(corpus.train, cfg, method)
            _log(f"trained a {len(tok):,}-token {method} tokenizer ({time.time() - t0:.1f}s)")
            report["mode"] = f"new {method} tokenizer"

        from hanlm.data.templates import apply_template

        template = cfg.template
        if template == "auto" and (base is None or not tok.chat_template):
            template = "chatml"
        if template != "auto":
            apply_template(tok, template)  # special tokens it adds go after the new pieces

        if merged is not None and cfg.resize_model:
            _resize_and_save(cfg, merged, tok, run_.dir, report)
        else:
            tok.save_pretrained(str(run_.dir))
        for name, data in files.items():
            (run_.dir / name).write_bytes(data)
        check_reload(tok, run_.dir, [*PROBE_TEXTS, *corpus.held_out[:200], *corpus.english[:50]])

        report["base"] = cfg.model.path or None
        report["base_vocab_size"] = merged.base_size if merged else None
        report["new_token_start"] = min(merged.new_ids) if merged else None
        report["pieces_added"] = len(merged.new_ids) if merged else None
        report["vocab_size"] = len(tok)
        report.setdefault("model_rows", None)
        if merged:
            report.update(merged.stats)
            t0 = time.time()
            top, unreachable = top_new_pieces(tok, merged.new_ids, corpus.train, cfg.top_pieces)
            report["new_pieces_not_in_output"] = unreachable
            report["top_new_pieces"] = top
            _log(f"counted new pieces on the corpus ({time.time() - t0:.1f}s)")
        report["eval"] = _eval_rows(
            base, tok, corpus.held_out, corpus.english, corpus.held_out_is_separate
        )
        report["init"] = cfg.init if merged and cfg.resize_model else None
        report["seconds"] = round(time.time() - started, 1)
        atomic_write_json(run_.dir / "vocab_report.json", report)
        table = format_report(report)
        atomic_write_text(run_.dir / "vocab_report.txt", table + "\n")
        print(table)
        summary = {k: report[k] for k in ("vocab_size", "pieces_added", "seconds")}
        for name, row in report["eval"].items():
            summary[f"{name}_tokens_per_char"] = row["merged"]["tokens_per_char"]
            if row["ratio"] is not None:
                summary[f"{name}_ratio"] = row["ratio"]
        run_.finish(summary)
    return run_.dir


def _resize_and_save(
    cfg: VocabConfig, merged: Merged, tok: Any, out: Path, report: dict[str, Any]
) -> None:
    """Load the base model, grow embeddings and LM head, initialise the new rows, save."""
    from hanlm.modeling import init_rows, load_model, resize_embeddings, save_model

    t0 = time.time()
    model = load_model(cfg.model)
    _log(f"loaded the base model ({time.time() - t0:.1f}s)")
    old, new = resize_embeddings(model, len(tok), cfg.pad_to_multiple_of)
    # Every id from the first new one up is ours: new pieces, then template tokens, then
    # padding. A base padded beyond its tokenizer (Qwen) has rows for some of them already;
    # no token used those rows, so they are set too. Old token rows are never written.
    first = min(merged.new_ids)
    sources = merged.spelling if cfg.init == "subword_mean" else None
    init_rows(model, list(range(first, new)), min(first, old), sources, cfg.init_noise, cfg.seed)
    # Fill in special ids the base lacks (a pad a template added); never replace the base's own,
    # which may list several stop ids.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tok, key)
        for conf in (model.config, model.generation_config):
            if tid is not None and conf is not None and getattr(conf, key, None) is None:
                setattr(conf, key, tid)
    t0 = time.time()
    save_model(model, tok, out)
    _log(f"resized embeddings {old:,} -> {new:,} rows, saved the model ({time.time() - t0:.1f}s)")
    report["model_rows"] = new
    report["tied_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
