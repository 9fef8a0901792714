"""`hanlm embed train`: SGPT-BE contrastive fine-tuning of a decoder's embeddings.

Reads top to bottom: (query, positive[, negative]) pairs -> a held-out split -> model and which
parameters train (`bias` = BitFit, SGPT-BE's choice; `lora`; `full`) -> held-out InfoNCE loss
and recall@1 before -> in-batch-negative InfoNCE over cosine similarities / temperature (each
query against every positive and hard negative in the batch) -> the same measures after -> an
ordinary HF directory (LoRA merged) that `hanlm embed`, `hanlm rag` and `hanlm serve` load.

LLaMA-style models have no bias terms (attention_bias = mlp_bias = false), so `trainable=bias`
has nothing to train there. We then give the attention (q, k, v, o) and MLP (gate, up, down)
projections zero biases and set both config flags: the model computes exactly what it did
before training, BitFit gets SGPT's parameter set, and the saved directory loads with plain
transformers (the flags make `from_pretrained` build the biases). Architectures without such
flags are refused, with `trainable=lora` suggested.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from hanlm import console
from hanlm.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    opt,
    to_dict,
    trackers,
)
from hanlm.data.sources import DataError, read_json_line, read_lines
from hanlm.embed.pooling import Embedder, EmbedOptions
from hanlm.modeling import load_model, load_tokenizer, model_config
from hanlm.runs import Run
from hanlm.trainer import (
    apply_lora,
    describe_trainable,
    optimizer,
    start_trackers,
    tracker_list,
)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class EmbedTrainConfig(OutputConfig):
    UNUSED: ClassVar[dict[str, str]] = {
        "train.batching": "its batches are pairs drawn at random (the in-batch negatives)",
        "train.grad_accum": "the in-batch negatives are the batch: raise train.batch_size",
        "train.precision": "its loop has no autocast: the weights train in model.dtype",
        "train.gradient_checkpointing": "its loop keeps activations",
        "train.deepspeed": "its loop runs in one process",
        "train.liger": "its loop pools hidden states, it has no LM loss to fuse",
    }
    model: ModelConfig = opt(ModelConfig, "the decoder to tune (HF dir, .gguf, hub id)")
    data: list[str] = opt(
        [], "JSONL files of {query, positive} records (optional 'negative': a hard negative)"
    )
    valid_fraction: float = opt(0.1, "pairs held out to measure loss and recall@1")
    embed: EmbedOptions = opt(EmbedOptions, "pooling and markers (use the same when indexing)")
    trainable: Literal["bias", "lora", "full"] = opt(
        "bias", "bias = BitFit (SGPT-BE), lora = adapters (merged on save), full = all weights"
    )
    temperature: float = opt(0.05, "InfoNCE temperature on cosine similarities")
    lora: LoraConfig = opt(LoraConfig, "LoRA settings for trainable=lora")
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=5e-4, batch_size=32, max_steps=200),
        metadata={"help": "optimisation (batch_size = pairs per step = in-batch negatives + 1)"},
    )

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("data is required: JSONL files of {query, positive} pairs")
        if not 0 <= self.valid_fraction < 1:
            raise ConfigError("valid_fraction must be in [0, 1)")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0")
        if self.train.batch_size < 2:
            raise ConfigError("train.batch_size must be at least 2 (in-batch negatives)")


# --------------------------------------------------------------------------- data


def read_pairs(paths: list[str]) -> list[dict[str, str]]:
    """Records with string `query` and `positive` (and optional `negative`); anything else is an
    error naming the file and line."""
    out = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"pairs file {p} does not exist")
        for n, line in read_lines(p):
            if not line.strip():
                continue
            rec = read_json_line(line, f"{p}:{n}")
            if not isinstance(rec, dict) or not all(
                isinstance(rec.get(k), str) and rec[k] for k in ("query", "positive")
            ):
                raise ConfigError(f"{p}:{n}: needs non-empty string fields 'query' and 'positive'")
            if "negative" in rec and not isinstance(rec["negative"], str):
                raise ConfigError(f"{p}:{n}: 'negative' must be a string")
            out.append({k: rec[k] for k in ("query", "positive", "negative") if rec.get(k)})
    return out


def batches(pairs: list[dict[str, str]], size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches in which no positive repeats (a repeated one would be a false
    negative for its twin)."""
    order = list(range(len(pairs)))
    rng.shuffle(order)
    out: list[list[int]] = []
    current: list[int] = []
    seen: set[str] = set()
    for i in order:
        if pairs[i]["positive"] in seen:
            continue  # goes into a later epoch's batch instead (this epoch is shuffled anew)
        current.append(i)
        seen.add(pairs[i]["positive"])
        if len(current) == size:
            out.append(current)
            current, seen = [], set()
    if len(current) >= 2:
        out.append(current)
    return out


# --------------------------------------------------------------------------- model


# Architectures whose projections have no bias terms and no config flags to add them with
# (Qwen2 has q/k/v biases; LLaMA has the attention_bias / mlp_bias flags).
NO_BIASES = ("qwen3", "mistral", "gemma", "gemma2", "phi3")


def check_bias_trainable(config: Any, loaded: bool = True) -> None:
    """trainable=bias needs bias terms, or the config flags that add them (LLaMA's
    attention_bias and mlp_bias). Before loading (`loaded=False`) only the architectures known
    to have neither are refused; a loaded model without biases is refused by its config."""
    if not loaded and getattr(config, "model_type", "") not in NO_BIASES:
        return
    if not (hasattr(config, "attention_bias") and hasattr(config, "mlp_bias")):
        raise ConfigError(
            f"trainable=bias: this {config.model_type} model has no bias terms and no"
            " attention_bias/mlp_bias config flags to add them with; use trainable=lora"
        )


def add_zero_biases(model: Any) -> int:
    """Zero biases on a LLaMA-style model's projections, with the config flags that make
    `from_pretrained` rebuild them. Returns how many were added."""
    import torch

    cfg = model.config
    check_bias_trainable(cfg)
    added = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ATTN + MLP and isinstance(module, torch.nn.Linear) and module.bias is None:
            w = module.weight
            module.bias = torch.nn.Parameter(
                torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            )
            added += 1
    if added:
        cfg.attention_bias = True
        cfg.mlp_bias = True
    return added


def set_trainable(model: Any, cfg: EmbedTrainConfig) -> tuple[Any, dict[str, Any]]:
    info: dict[str, Any] = {"trainable": cfg.trainable}
    if cfg.trainable == "lora":
        model = apply_lora(model, cfg.lora)
    elif cfg.trainable == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if not any(n.endswith(".bias") for n, _ in model.named_parameters()):
            info["biases_added"] = add_zero_biases(model)
            print(
                f"[hanlm] embed train: the model had no bias terms; added"
                f" {info['biases_added']} zero-initialised ones (attention and MLP)",
                file=sys.stderr,
            )
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias"))
    info.update(describe_trainable(model))
    return model, info


# --------------------------------------------------------------------------- measures


def info_nce(emb: Embedder, rows: list[dict[str, str]], temperature: float) -> Any:
    """Mean InfoNCE of the queries against the batch's positives (+ hard negatives)."""
    import torch

    q = emb.train_forward([r["query"] for r in rows], "query")
    docs = [r["positive"] for r in rows] + [r["negative"] for r in rows if "negative" in r]
    d = emb.train_forward(docs, "document")
    logits = q @ d.T / temperature
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(rows), device=q.device))


def evaluate(emb: Embedder, rows: list[dict[str, str]], temperature: float) -> dict[str, float]:
    """Held-out InfoNCE (in batches of 32) and recall@1 of each query among all held-out
    positives."""
    import numpy as np
    import torch

    if not rows:
        return {}
    emb.model.eval()
    total, counted = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(rows), 32):
            chunk = rows[s : s + 32]
            if len(chunk) >= 2:
                total += float(info_nce(emb, chunk, temperature)) * len(chunk)
                counted += len(chunk)
    q = emb.encode([r["query"] for r in rows], "query")
    d = emb.encode([r["positive"] for r in rows], "document")
    top = np.argmax(q @ d.T, axis=1)
    recall = float(np.mean(top == np.arange(len(rows))))
    return {"valid_loss": total / max(counted, 1), "valid_recall@1": recall}


# --------------------------------------------------------------------------- run


def run(cfg: EmbedTrainConfig) -> Path:
    from accelerate import Accelerator
    from transformers import set_seed

    if cfg.trainable == "bias":  # before anything is read or loaded
        check_bias_trainable(model_config(cfg.model), loaded=False)
    with Run("embed train", cfg) as run:
        # accelerate's trackers for train.report_to (the accelerator prepares nothing here)
        tracked = tracker_list(trackers(cfg.train), run.dir)
        acc = Accelerator(log_with=tracked, project_dir=str(run.dir)) if tracked else None
        if acc is not None:
            start_trackers(acc, run, to_dict(cfg))
        set_seed(cfg.train.seed)
        pairs = read_pairs(cfg.data)
        rng = random.Random(cfg.train.seed)
        order = list(range(len(pairs)))
        rng.shuffle(order)
        n_valid = int(len(pairs) * cfg.valid_fraction)
        valid = [pairs[i] for i in order[:n_valid]]
        train = [pairs[i] for i in order[n_valid:]]
        if len(train) < 2:
            raise DataError(
                f"{len(train)} training pairs in {', '.join(cfg.data) or 'data (none given)'}"
                f" after holding out valid_fraction={cfg.valid_fraction}: need at least 2"
            )
        run.set("data", {"pairs": len(pairs), "train": len(train), "valid": len(valid)})
        print(f"[hanlm] embed train: {len(train)} training pairs, {len(valid)} held out")

        tok = load_tokenizer(cfg.model.path)
        model = load_model(cfg.model)
        model, summary = set_trainable(model, cfg)
        emb = Embedder(model, tok, cfg.embed, path=cfg.model.path)
        if valid:
            before = evaluate(emb, valid, cfg.temperature)
            summary.update({f"initial_{k}": v for k, v in before.items()})

        steps_per_epoch = max(1, len(train) // cfg.train.batch_size)
        total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
        losses = _train(cfg, run, emb, train, rng, total, acc)
        summary.update(steps=total, first_loss=losses[0], last_loss=losses[-1])

        lora = replace(cfg.lora, enabled=True) if cfg.trainable == "lora" else None
        model = run.save_model(model, tok, lora)
        emb = Embedder(model, tok, cfg.embed, path=str(run.dir))
        if valid:
            summary.update(evaluate(emb, valid, cfg.temperature))
            print(
                f"[hanlm] embed train: held-out InfoNCE {summary['initial_valid_loss']:.4f} ->"
                f" {summary['valid_loss']:.4f}; recall@1 {summary['initial_valid_recall@1']:.3f}"
                f" -> {summary['valid_recall@1']:.3f}"
            )
        run.finish(summary)
        if acc is not None:
            acc.end_training()
    return run.dir


def _train(
    cfg: EmbedTrainConfig,
    run: Run,
    emb: Embedder,
    train: list[Any],
    rng: random.Random,
    total: int,
    acc: Any,
) -> list[float]:
    """`total` InfoNCE steps over `train`, logged to metrics.jsonl (and the trackers of `acc`),
    with a progress line; returns every step's loss."""
    import torch

    model = emb.model
    opt, sched = optimizer(model, cfg.train, total)
    params = [p for p in model.parameters() if p.requires_grad]
    queue: list[list[int]] = []
    losses: list[float] = []
    progress = console.Progress("embed train", total)
    model.train()
    for step in range(1, total + 1):
        if not queue:
            queue = batches(train, cfg.train.batch_size, rng)
        loss = info_nce(emb, [train[i] for i in queue.pop(0)], cfg.temperature)
        loss.backward()
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.tick(step)
        if step % cfg.train.logging_steps == 0 or step == total:
            recent = losses[-cfg.train.logging_steps :]
            row = {"loss": sum(recent) / len(recent), "lr": sched.get_last_lr()[0]}
            run.log(step, **row)
            if acc is not None:
                acc.log(row, step=step)
            progress.update(step, **row)
    progress.close(f"trained {total} steps in {console.duration(time.time() - progress.started)}")
    return losses
