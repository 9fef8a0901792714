"""`hanlm pretrain`: causal-LM pretraining from scratch, or continued on an existing model.

Reads top to bottom: tokenizer -> text data -> tokenize and pack into blocks -> model (preset
from scratch, or loaded; optional LoRA with trainable embeddings or only the new token rows)
-> transformers Trainer -> merged HF model directory + metrics.

Validation reports loss, perplexity and bits per character; bpc = loss x (predicted tokens /
characters) / ln 2 over the validation text, so models with different tokenizers compare.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hanlm import IGNORE_INDEX
from hanlm.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    opt,
)
from hanlm.data import load, stream
from hanlm.data.glm import (
    GLMCollator,
    GLMConfig,
    add_glm_tokens,
    causal_example,
    check_attention,
    glm_example,
    glm_ids,
)
from hanlm.modeling import build_model, load_model, load_tokenizer
from hanlm.runs import Run
from hanlm.trainer import (
    apply_lora,
    check_launch,
    describe_trainable,
    metrics_callback,
    run_trainer,
    training_args,
    use_progress_line,
)


@dataclass
class PretrainConfig(OutputConfig):
    model: ModelConfig = opt(ModelConfig, "model to continue from; empty = build from preset")
    preset: str = opt("tiny", "size preset when building from scratch (test, tiny, mini, small...)")
    tokenizer: str = opt("", "tokenizer dir (required from scratch; default: the model's)")
    data: DataConfig = opt(DataConfig, "text corpora")
    block_size: int = opt(256, "tokens per packed training block")
    num_proc: int = opt(1, "processes for tokenization (datasets.map)")
    streaming: bool = opt(False, "stream the corpus instead of loading it (needs max_steps)")
    cache_dir: str = opt("", "tokenized-data cache (default ~/.cache/hanlm/tokenized)")
    train: TrainConfig = opt(TrainConfig, "optimisation")
    lora: LoraConfig = opt(LoraConfig, "LoRA adapters (continued pretraining)")
    train_embeddings: Literal["none", "full", "new_tokens"] = opt(
        "full",
        "with LoRA: embeddings/LM head trained in full, not at all, or only the new token rows",
    )
    new_tokens_from: int = opt(
        -1, "first new token id for train_embeddings=new_tokens (-1: from vocab_report.json)"
    )
    max_positions: int = opt(2048, "context length of a model built from scratch")
    objective: Literal["causal", "glm"] = opt(
        "causal",
        "causal LM, or GLM blank infilling (spans blanked, Part A bidirectional, loss on the"
        " spans only; validation stays causal so bits/char compare)",
    )
    glm: GLMConfig = opt(GLMConfig, "GLM blank infilling settings (objective=glm)")

    def validate(self) -> None:
        if not self.model.path and not self.tokenizer:
            raise ConfigError(
                "pretraining from scratch needs tokenizer=DIR (e.g. the output of `hanlm vocab`)"
            )
        if self.streaming and self.train.max_steps <= 0:
            raise ConfigError(
                "streaming=true needs train.max_steps > 0 (the corpus length is unknown)"
            )
        if self.block_size < 2:
            raise ConfigError("block_size must be at least 2 tokens")


# --------------------------------------------------------------------------- data


def _token_stream(texts: list[str], tok: Any, eos: int, num_proc: int) -> Any:
    """Every document's token ids followed by EOS, as one int64 array. One process: the fast
    tokenizer in batches (a Dataset.map would convert every list to Arrow and back); more:
    Dataset.map's worker processes, flattened on the Arrow column."""
    import datasets
    import numpy as np
    import pyarrow.compute as pc
    from tqdm.auto import tqdm

    if num_proc <= 1:
        # the `tokenizers` backend directly: transformers' wrapper would build attention masks
        # and BatchEncodings we drop (the same ids; the cache key covers the backend)
        backend = getattr(tok, "backend_tokenizer", None)
        parts: list[list[int]] = []
        bar = tqdm(total=len(texts), desc="tokenizing", unit=" docs")
        for i in range(0, len(texts), 1000):
            batch = texts[i : i + 1000]
            bar.update(len(batch))
            if backend is not None:
                encoded = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
            else:
                encoded = tok(batch, add_special_tokens=False)["input_ids"]
            for ids in encoded:
                parts += (ids, [eos])
        bar.close()
        total = sum(len(x) for x in parts)
        return np.fromiter(itertools.chain.from_iterable(parts), np.int64, count=total)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [[*x, eos] for x in ids]}

    ds = datasets.Dataset.from_dict({"text": texts}).map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=["text"], desc="tokenizing"
    )
    return pc.list_flatten(ds.data.column("ids")).to_numpy().astype(np.int64)


def _tokenize_and_pack(
    texts: list[str], tok: Any, block_size: int, num_proc: int, cache_dir: str
) -> tuple[Any, dict[str, float]]:
    """Blocks of `block_size` tokens: documents joined with EOS, the tail block padded."""
    import datasets
    import numpy as np

    eos = tok.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    h = hashlib.sha256()
    h.update(json.dumps([block_size, tok.name_or_path, len(tok)]).encode())
    h.update(tok.backend_tokenizer.to_str().encode() if hasattr(tok, "backend_tokenizer") else b"")
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    root = Path(cache_dir or os.path.expanduser("~/.cache/hanlm/tokenized"))
    cached = root / h.hexdigest()[:24]
    if (cached / "stats.json").is_file():
        print(f"[hanlm] using cached tokenized data {cached}")
        return datasets.load_from_disk(str(cached / "blocks")), json.loads(
            (cached / "stats.json").read_text()
        )

    stream = _token_stream(texts, tok, eos, num_proc)
    n_tokens = len(stream)
    # blocks as one array: the stream cut every block_size tokens, the tail padded (labels
    # ignored there); a tail of one token predicts nothing and is dropped
    count = -(-n_tokens // block_size)
    if count and n_tokens - (count - 1) * block_size < 2:
        count -= 1
    if not count:
        raise ValueError("the corpus gives fewer than 2 tokens; nothing to train on")
    used = min(n_tokens, count * block_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    shape = (count, block_size)
    blocks, labels = np.full(shape, pad, np.int64), np.full(shape, IGNORE_INDEX, np.int64)
    masks = np.zeros(shape, np.int64)
    blocks.flat[:used] = labels.flat[:used] = stream[:used]
    masks.flat[:used] = 1
    out = datasets.Dataset.from_dict(
        {"input_ids": blocks, "labels": labels, "attention_mask": masks}
    )
    stats = {
        "documents": len(texts),
        "tokens": n_tokens,
        "characters": sum(len(t) for t in texts),
        "blocks": count,
        "real_token_fraction": n_tokens / (count * block_size),
        # Each block predicts all its real tokens but the first.
        "predicted_tokens": used - count,
    }
    tmp = root / f".{cached.name}.tmp{os.getpid()}"
    out.save_to_disk(str(tmp / "blocks"))
    (tmp / "stats.json").write_text(json.dumps(stats))
    with contextlib.suppress(OSError):  # another process cached it first
        os.replace(tmp, cached)
    return out, stats


def _stream_blocks(cfg: PretrainConfig, tok: Any) -> Any:
    """An IterableDataset of packed blocks for corpora larger than memory."""
    import datasets

    eos, block = tok.eos_token_id, cfg.block_size

    def gen() -> Any:
        buf: list[int] = []
        for rec in stream(cfg.data, kind="text"):
            buf += tok(rec["text"], add_special_tokens=False)["input_ids"] + [eos]
            while len(buf) >= block:
                chunk, buf = buf[:block], buf[block:]
                yield {"input_ids": chunk, "labels": chunk, "attention_mask": [1] * block}

    return datasets.IterableDataset.from_generator(gen)


# --------------------------------------------------------------------------- model


def _new_token_ids(cfg: PretrainConfig, tok: Any) -> list[int]:
    start = cfg.new_tokens_from
    if start < 0:
        report = Path(cfg.model.path) / "vocab_report.json"
        if not report.is_file():
            raise ValueError(
                "train_embeddings=new_tokens needs new_tokens_from=ID or a model directory made"
                " by `hanlm vocab` (with vocab_report.json)"
            )
        info = json.loads(report.read_text(encoding="utf-8"))
        start = int(info.get("new_token_start", info.get("base_vocab_size", -1)))
        if start < 0:
            raise ValueError(f"{report}: has no base_vocab_size/new_token_start")
    ids = list(range(start, len(tok)))
    if not ids:
        raise ValueError(f"new_tokens_from={start}: the tokenizer has no ids at or after it")
    return ids


def _as_glm(ds: Any, cfg: PretrainConfig, tok: Any, causal: bool) -> Any:
    """Packed blocks -> GLM examples (or, for validation, causal ones in the same layout), one
    fixed draw per block so a resumed run sees the same examples."""
    import datasets

    ids = glm_ids(tok)

    def convert(row: dict[str, Any], i: int) -> dict[str, Any]:
        n = sum(row["attention_mask"])
        block = row["input_ids"][:n]
        if causal:
            return causal_example(block)
        return glm_example(block, cfg.glm, ids, seed=cfg.train.seed * 1_000_003 + i)

    drop = ["attention_mask", "labels", "input_ids"]
    if isinstance(ds, datasets.IterableDataset):
        return ds.map(convert, with_indices=True, remove_columns=drop)
    return ds.map(convert, with_indices=True, remove_columns=drop, keep_in_memory=True)


def _build_or_load(cfg: PretrainConfig, tok: Any) -> Any:
    if cfg.model.path:
        model = load_model(cfg.model)
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
        return model
    vocab = math.ceil(len(tok) / 64) * 64  # multiples of 64 keep matmuls efficient
    model = build_model(cfg.preset, vocab, max_positions=max(cfg.max_positions, cfg.block_size))
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    return model


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- run


def run(cfg: PretrainConfig) -> Path:
    import torch
    from transformers import Trainer, default_data_collator, set_seed

    # before anything loads
    check_launch(cfg.train, "hanlm pretrain", "its blocks are full, no batch holds padding")
    with Run("pretrain", cfg) as run:
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.tokenizer or cfg.model.path)
        glm_added = add_glm_tokens(tok) if cfg.objective == "glm" else []

        # Data: texts -> packed blocks (cached), or a stream of blocks.
        valid_ds, valid_stats = None, None
        if cfg.streaming:
            train_ds, data_info = _stream_blocks(cfg, tok), {"streaming": True}
            if cfg.data.valid_paths:
                vcfg = DataConfig(
                    **{**cfg.data.__dict__, "paths": cfg.data.valid_paths, "valid_paths": []}
                )
                vtexts = [r["text"] for r in load(vcfg, kind="text").train]
                valid_ds, valid_stats = _tokenize_and_pack(
                    vtexts, tok, cfg.block_size, 1, cfg.cache_dir
                )
        else:
            data = load(cfg.data, kind="text")
            print(data.stats.summary())
            train_ds, train_stats = _tokenize_and_pack(
                [r["text"] for r in data.train], tok, cfg.block_size, cfg.num_proc, cfg.cache_dir
            )
            data_info = {**data.stats.as_dict(), "train_blocks": train_stats}
            if data.valid:
                valid_ds, valid_stats = _tokenize_and_pack(
                    [r["text"] for r in data.valid], tok, cfg.block_size, 1, cfg.cache_dir
                )
            print(
                f"[hanlm] {train_stats['tokens']:,} tokens in {train_stats['blocks']:,} blocks of"
                f" {cfg.block_size}; real-token fraction {train_stats['real_token_fraction']:.4f}"
            )
        if valid_stats:
            data_info["valid_blocks"] = valid_stats
        run.set("data", data_info)
        tokens_per_char = (
            valid_stats["predicted_tokens"] / valid_stats["characters"] if valid_stats else None
        )

        collator: Any = default_data_collator
        if cfg.objective == "glm":
            # Blank infilling for training; validation stays causal (comparable bits/char).
            train_ds = _as_glm(train_ds, cfg, tok, causal=False)
            if valid_ds is not None:
                valid_ds = _as_glm(valid_ds, cfg, tok, causal=True)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            collator = GLMCollator(pad)
            data_info["glm_tokens_added"] = glm_added
            run.set("data", data_info)

        # Model.
        model = _build_or_load(cfg, tok)
        if cfg.objective == "glm":
            check_attention(model)
        if cfg.lora.enabled:
            lora = cfg.lora
            tokens = None
            if cfg.train_embeddings == "full":
                lora = LoraConfig(
                    **{
                        **lora.__dict__,
                        "modules_to_save": sorted(
                            set(lora.modules_to_save) | {"embed_tokens", "lm_head"}
                        ),
                    }
                )
            elif cfg.train_embeddings == "new_tokens":
                tokens = _new_token_ids(cfg, tok)
            model = apply_lora(model, lora, trainable_tokens=tokens)
        params = describe_trainable(model)
        print(
            f"[hanlm] parameters: {params['total_params']:,} total,"
            f" {params['trainable_params']:,} trainable ({params['trainable_pct']:.2f}%)"
        )

        args = training_args(cfg.train, run.dir, has_eval=valid_ds is not None)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=valid_ds,
            data_collator=collator,
            processing_class=tok,
            callbacks=[metrics_callback(run, tokens_per_char)],
        )
        checkpoint = run.resume_from()
        summary: dict[str, Any] = {**params, **run.initial}  # initial: kept across a resume
        if valid_ds is not None and not run.initial:
            use_progress_line(trainer)  # its evaluation as a line, not the Trainer's raw dict
            first = trainer.evaluate()  # the starting point the report compares against
            summary["initial_eval_loss"] = first["eval_loss"]
            if tokens_per_char:
                summary["initial_eval_bpc"] = first["eval_loss"] * tokens_per_char / math.log(2)
            run.record_initial(summary)
        result = run_trainer(trainer, checkpoint)
        summary["train_loss"] = result.training_loss
        summary["steps"] = result.global_step
        if valid_ds is not None:
            final = trainer.evaluate()
            summary["eval_loss"] = final["eval_loss"]
            summary["eval_ppl"] = math.exp(min(final["eval_loss"], 50))
            if tokens_per_char:
                summary["eval_bpc"] = final["eval_loss"] * tokens_per_char / math.log(2)
                summary["tokens_per_char"] = tokens_per_char

        # Save an ordinary HF directory (LoRA merged unless asked otherwise).
        run.save_model(trainer.model, tok, cfg.lora, [tok.eos_token_id])
        if run.main:
            summary["peak_memory_mb"] = _peak_memory_mb()
            if torch.cuda.is_available():
                summary["device"] = torch.cuda.get_device_name()
            run.finish(summary)
            _print_summary(run.info["summary"])
    return run.dir


def _print_summary(s: dict[str, Any]) -> None:
    parts = [f"steps {s.get('steps')}", f"train loss {s.get('train_loss', float('nan')):.4f}"]
    if "eval_loss" in s:
        first = s.get("initial_eval_loss", float("nan"))
        parts.append(f"eval loss {first:.4f} -> {s['eval_loss']:.4f}")
    if "eval_bpc" in s:
        parts.append(f"bpc {s.get('initial_eval_bpc', float('nan')):.3f} -> {s['eval_bpc']:.3f}")
    parts.append(f"{s['seconds']:.0f}s")
    print("[hanlm] pretrain: " + ", ".join(parts))
