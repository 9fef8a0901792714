"""`hanlm vocab`: train a Chinese tokenizer, merge it into a base vocabulary, grow the model.

Reads top to bottom: corpus -> (no base) train a tokenizer from scratch, or (base) learn new
pieces and merge them into the base tokenizer keeping every existing id -> check round trip and
English identity -> resize the model's embeddings and LM head and initialise the new rows ->
save an ordinary HF directory -> report tokens per character before and after.

The algorithms live in `hanlm.tokenizer`, each base merged in its own terms: byte-level BPE
(tokenizer/bytelevel.py: GPT-2, SmolLM2, Qwen, LLaMA-3), SentencePiece (tokenizer/spm.py:
LLaMA-1/2, Baichuan), or a new tokenizer (tokenizer/scratch.py). This module reads the corpus,
passes the config's values to them, resizes and saves the model, and writes the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from hanlm import ASSETS
from hanlm.config import ConfigError, DataConfig, ModelConfig, OutputConfig, opt
from hanlm.data import DataError, load
from hanlm.data.templates import TEMPLATE_NAMES, apply_template
from hanlm.modeling import (
    ModelError,
    init_rows,
    load_model,
    model_config,
    resize_embeddings,
    save_model,
)
from hanlm.runs import Run, atomic_write_json, atomic_write_text
from hanlm.tokenizer import (
    PROBE_TEXTS,
    Merged,
    VocabError,
    check_merge,
    check_reload,
    expand_bytelevel,
    expand_sentencepiece,
    fragment_ids,
    load_base_tokenizer,
    measure,
    top_new_pieces,
    train_scratch,
)
from hanlm.tokenizer.base import log

_ENGLISH_FALLBACK = [
    "The quick brown fox jumps over the lazy dog, then runs back home at 5:30 p.m.",
    "In the beginning God created the heavens and the earth.",
    "def main(argv: list[str]) -> int:\n    return 0  # “quotes” — dashes… and emoji 😀",
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
    data = cfg.data
    if not data.paths:
        data = replace(data, paths=[str(ASSETS / "zh_corpus.train.jsonl.gz")])
        if not data.valid_paths and not data.valid_fraction:
            data = replace(data, valid_paths=[str(ASSETS / "zh_corpus.valid.jsonl.gz")])
    loaded = load(data, kind="text")
    train = [r["text"] for r in loaded.train if r["text"].strip()]
    if not train:
        raise DataError(f"{data.paths}: the corpus holds no text to train a tokenizer on")
    held = [r["text"] for r in loaded.valid]
    separate = bool(held)
    if not separate:
        log("no held-out text (set data.valid_paths or data.valid_fraction): the report's")
        log("Chinese rows are measured on (up to 2000 records of) the training text")
        held = train[:2000]
    if cfg.english:
        en = load(DataConfig(paths=cfg.english, dedup="none", clean=False), kind="text")
        english = [r["text"] for r in en.train + en.valid]
    elif (ASSETS / "en_corpus.valid.jsonl.gz").is_file():
        en_cfg = DataConfig(paths=[str(ASSETS / "en_corpus.valid.jsonl.gz")], dedup="none")
        english = [r["text"] for r in load(en_cfg, kind="text").train]
    else:
        english = list(_ENGLISH_FALLBACK)
    return Corpus(train, held, separate, english, loaded.stats.as_dict())


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
    frag_m = fragment_ids(tok)
    frag_b = fragment_ids(base) if base is not None else None
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
    with Run("vocab", cfg, seed=cfg.seed) as run_:
        corpus = read_corpus(cfg)
        run_.set("data", corpus.stats)
        chars = sum(map(len, corpus.train))
        log(f"corpus: {len(corpus.train):,} texts, {chars:,} chars")
        files: dict[str, bytes] = {}
        base = merged = None
        report: dict[str, Any] = {}
        if cfg.model.path:
            base, merged = _expand_base(cfg, corpus)
            tok, files = merged.tokenizer, merged.files
            report.update(check_merge(base, tok, corpus.english, corpus.held_out))
            report["mode"] = f"expand {merged.kind} base"
        else:
            method = "sentencepiece" if cfg.method == "auto" else cfg.method
            t0 = time.time()
            tok, files = train_scratch(
                corpus.train,
                method,
                vocab_size=cfg.vocab_size,
                min_frequency=cfg.min_frequency,
                sp_model_type=cfg.sp_model_type,
                character_coverage=cfg.character_coverage,
                byte_fallback=cfg.byte_fallback,
            )
            log(f"trained a {len(tok):,}-token {method} tokenizer ({time.time() - t0:.1f}s)")
            report["mode"] = f"new {method} tokenizer"

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
            log(f"counted new pieces on the corpus ({time.time() - t0:.1f}s)")
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


def _expand_base(cfg: VocabConfig, corpus: Corpus) -> tuple[Any, Merged]:
    """The base tokenizer, and the merge of pieces learned on the corpus into it."""
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
    log(f"base: {cfg.model.path} ({kind}, {len(base):,} tokens)")
    if kind == "bytelevel":
        merged = expand_bytelevel(
            base,
            corpus.train,
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            char_min_count=cfg.char_min_count,
        )
    else:
        assert sp_file is not None
        merged = expand_sentencepiece(
            base,
            sp_file,
            corpus.train,
            vocab_size=cfg.vocab_size,
            sp_model_type=cfg.sp_model_type,
            character_coverage=cfg.character_coverage,
        )
    return base, merged


def _resize_and_save(
    cfg: VocabConfig, merged: Merged, tok: Any, out: Path, report: dict[str, Any]
) -> None:
    """Load the base model, grow embeddings and LM head, initialise the new rows, save."""
    t0 = time.time()
    model = load_model(cfg.model)
    log(f"loaded the base model ({time.time() - t0:.1f}s)")
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
    log(f"resized embeddings {old:,} -> {new:,} rows, saved the model ({time.time() - t0:.1f}s)")
    report["model_rows"] = new
    report["tied_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
