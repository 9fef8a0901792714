"""The config dataclasses every stage composes (model, data, training, LoRA, output), the
errors bad input raises, and `opt`, which gives each field its help line."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MISSING = dataclasses.MISSING


# Chat template names, for every stage that takes one (the table lives in data/templates.py).
TemplateName = Literal["auto", "chatml", "llama2", "llama3", "alpaca"]
# Experiment trackers (`train.report_to`), with the module each needs and its pip package.
Tracker = Literal["none", "tensorboard", "wandb", "swanlab", "mlflow"]
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "swanlab": ("swanlab", "swanlab"),
    "mlflow": ("mlflow", "mlflow"),
}


class InputError(ValueError):
    """Bad input from the user (a config, a data file, a model directory): the message names the
    file, line, record or key and what to do. The command line prints it without a traceback,
    and a run that fails with it removes the output directory it had just created."""


class ConfigError(InputError):
    """A config that cannot be used; the message names the key and what is allowed."""


def opt(default: Any = MISSING, help: str = "", **kw: Any) -> Any:
    """A config field with a help line; mutable defaults are copied per instance."""
    meta = {"help": help}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta, **kw)
    if default is MISSING:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# --------------------------------------------------------------------------- shared parts


@dataclass
class RopeConfig:
    """Longer context than the model was trained at, by rescaling its rotary positions (applied
    at load, saved in the output's config.json so it loads the same way)."""

    type: Literal["none", "linear", "dynamic", "yarn", "llama3"] = opt(
        "none",
        "none; linear = position interpolation (Chen et al.); dynamic = NTK-aware, grows with the"
        " length; yarn (Peng et al.); llama3",
    )
    factor: float = opt(1.0, "how many times the trained context the model should handle")
    original_max_position_embeddings: int = opt(
        0, "the context the model was trained at (0 = its max_position_embeddings)"
    )
    low_freq_factor: float = opt(1.0, "llama3 only")
    high_freq_factor: float = opt(4.0, "llama3 only")

    def validate(self) -> None:
        if self.type != "none" and self.factor < 1:
            raise ConfigError(f"model.rope.factor={self.factor}: must be >= 1 (the context grows)")


@dataclass
class ModelConfig:
    path: str = opt("", "model: a Hugging Face directory, a .gguf file, or a hub id (online)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "weights dtype: auto = bf16 on a GPU that supports it, fp32 on CPU"
    )
    trust_remote_code: bool = opt(False, "allow custom modelling code from the model directory")
    rope: RopeConfig = opt(RopeConfig, "RoPE scaling for a longer context (none by default)")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = opt(
        "auto",
        "attention kernel: auto = transformers' choice for the model (sdpa where it has it);"
        " flash_attention_2 needs a CUDA GPU and the flash-attn package, and makes padding-free"
        " batches sft's default (train.batching=auto)",
    )

    def validate(self) -> None:
        if self.attn_implementation == "flash_attention_2":
            check_cuda_kernel(
                "model.attn_implementation=flash_attention_2",
                "flash_attn",
                "pip install flash-attn --no-build-isolation",
            )


@dataclass
class InferenceModelConfig(ModelConfig):
    """A model loaded to answer, not to train: it may be quantized."""

    quantize: Literal["none", "int8", "int4"] = opt(
        "none",
        "weight-only quantization of the linear layers (not lm_head): int8 (torchao), int4"
        " (optimum-quanto, groups of 128); inference only",
    )


@dataclass
class DataConfig:
    paths: list[str] = opt([], "data files, directories, globs, saved datasets dirs or hub ids")
    format: Literal[
        "auto", "text", "alpaca", "sharegpt", "messages", "preference", "ranked", "unpaired"
    ] = opt("auto", "record format; auto detects it from the first record's keys")
    weights: list[float] = opt([], "per-path mixing weight (fraction of records kept; >1 repeats)")
    valid_paths: list[str] = opt(
        [], "explicit validation data (otherwise split off the train data)"
    )
    valid_fraction: float = opt(0.0, "fraction of records held out for validation (0 = none)")
    seed: int = opt(0, "seed for mixing and the train/validation split")
    on_bad_record: Literal["error", "skip"] = opt(
        "error", "error: stop at the first bad record; skip: skip, count and report them"
    )
    text_field: str = opt("text", "field holding the text for the text format")
    txt_unit: Literal["line", "paragraph", "file"] = opt(
        "paragraph", "what one record of a .txt file is"
    )
    normalize: Literal["none", "nfc", "nfkc"] = opt(
        "nfc", "Unicode normalisation of text (nfkc also turns full-width '，' into ',')"
    )
    clean: bool = opt(True, "remove control characters and tidy whitespace in text records")
    min_chars: int = opt(1, "drop text records shorter than this (counted)")
    dedup: Literal["none", "exact", "normalized"] = opt(
        "normalized", "drop duplicate text records: exact, or after removing case/space/punct."
    )
    max_records: int = opt(0, "read at most this many records per path (0 = all)")


@dataclass
class TrainConfig:
    max_steps: int = opt(100, "optimiser steps (takes precedence over epochs when > 0)")
    epochs: float = opt(1.0, "epochs when max_steps is 0")
    batch_size: int = opt(8, "per-device batch size")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr: float = opt(1e-3, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_ratio: float = opt(0.05, "fraction of steps for linear warm-up")
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate schedule")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    seed: int = opt(42, "seed for initialisation, dropout and data order")
    logging_steps: int = opt(10, "write training metrics every N steps")
    eval_steps: int = opt(50, "validate every N steps (0 = only at the end)")
    save_steps: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    save_total_limit: int = opt(2, "keep at most this many checkpoints")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "auto = bf16 on a GPU that supports it, fp32 on CPU"
    )
    gradient_checkpointing: bool = opt(
        False,
        "recompute activations in the backward pass instead of keeping them: less memory, about"
        " a third more compute per step (trl's trainers turn it on by default; hanlm only when"
        " asked, in every stage alike)",
    )
    batching: Literal["auto", "random", "grouped", "padding_free"] = opt(
        "auto",
        "random (padded to the longest), grouped (similar lengths: sft, dpo, orpo, simpo, reward,"
        " distill), padding_free (sft: one sequence, positions restart per conversation); auto ="
        " padding_free where offered with model.attn_implementation=flash_attention_2, else"
        " grouped where offered, else random. Same per-example losses",
    )
    deepspeed: str = opt(
        "",
        "DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); launch with torchrun;"
        ' "auto" values are filled from these settings',
    )
    report_to: list[Tracker] = opt(
        [],
        "experiment trackers that receive the training metrics: tensorboard (event files in"
        " OUTPUT_DIR/tensorboard), wandb, swanlab, mlflow; one name or a list; none (or [])"
        " = only metrics.jsonl",
    )
    liger: bool = opt(
        False,
        "Liger's Triton kernels in place of the model's RMSNorm, RoPE and SwiGLU (pretrain also"
        " fuses the LM head with the cross-entropy; sft's trainer computes its loss in chunks"
        " already): less memory and faster on a CUDA GPU, for llama, qwen2 and qwen3; pretrain"
        " and sft; needs the liger-kernel package",
    )

    def validate(self) -> None:
        if self.deepspeed:
            deepspeed_config(self.deepspeed)
        check_trackers(self.report_to)
        if self.liger:
            check_cuda_kernel("train.liger=true", "liger_kernel", "pip install 'hanlm[liger]'")


def check_cuda_kernel(setting: str, module: str, install: str) -> None:
    """Refuse a setting that runs a package's CUDA kernels on a machine without a CUDA GPU, or
    without the package (named with its install command), before anything loads."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{setting} runs CUDA kernels, and this machine has no CUDA GPU")
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{setting} needs the {module} package, which is not installed: {install}"
        )


def trackers(train: TrainConfig) -> list[str]:
    """The trackers `train.report_to` names ("none" left out)."""
    return [t for t in dict.fromkeys(train.report_to) if t != "none"]


def check_trackers(names: list[str]) -> None:
    """Refuse "none" beside a tracker, and a tracker whose package is not installed (named with
    the pip command), before anything loads."""
    import importlib.util

    if "none" in names and len(set(names)) > 1:
        raise ConfigError(f"train.report_to={names}: 'none' cannot be combined with a tracker")
    for name in names:
        if name == "none":
            continue
        module, package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.report_to={name} needs the {package} package, which is not installed:"
                f" pip install {package}"
            )


def end_tracker_runs(error: str | None = None) -> None:
    """End the wandb, mlflow and swanlab runs this process still has open (transformers leaves
    wandb's and swanlab's open after training), marked failed with `error`: each stage of a
    recipe is then its own run in them, not logged into the first stage's run. A tracker whose
    package was never imported is left alone."""
    wandb, mlflow, swanlab = (sys.modules.get(m) for m in ("wandb", "mlflow", "swanlab"))
    try:
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=1 if error else 0)
        if mlflow is not None and hasattr(mlflow, "active_run") and mlflow.active_run():
            mlflow.end_run(status="FAILED" if error else "FINISHED")
        if swanlab is not None and hasattr(swanlab, "has_run") and swanlab.has_run():
            if error:
                swanlab.finish(state="crashed", error=error)
            else:
                swanlab.finish()
    except Exception as e:  # a tracker that cannot close (its server is gone) fails no stage
        print(f"[hanlm] warning: ending the experiment tracker's run failed: {e}", file=sys.stderr)


def zero_stage(train: TrainConfig) -> int | None:
    """The ZeRO stage of `train.deepspeed` (None without DeepSpeed)."""
    if not train.deepspeed:
        return None
    return deepspeed_config(train.deepspeed).get("zero_optimization", {}).get("stage", 0)


def deepspeed_config(path: str) -> dict[str, Any]:
    """Read and check a `train.deepspeed` JSON file (and that DeepSpeed is installed), before
    anything loads; errors name the file and the fix."""
    import importlib.util
    import json

    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"train.deepspeed={path}: no such file (configs/deepspeed/ has zero2.json,"
            " zero3.json and zero3_offload.json)"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"train.deepspeed={path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"train.deepspeed={path}: expected a JSON object, got {type(data).__name__}"
        )
    stage = data.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed={path}: zero_optimization.stage={stage!r}, not 0-3")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"train.deepspeed={path} needs DeepSpeed: pip install 'hanlm[deepspeed]' (on a machine"
            " without CUDA: DS_BUILD_OPS=0 pip install 'hanlm[deepspeed]')"
        )
    return data


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "train LoRA adapters instead of all weights")
    r: int = opt(8, "LoRA rank")
    alpha: int = opt(16, "LoRA alpha (scale = alpha / r)")
    dropout: float = opt(0.05, "dropout on the LoRA path")
    targets: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get adapters",
    )
    modules_to_save: list[str] = opt([], "modules trained in full beside the adapters")
    merge: bool = opt(True, "merge the adapters into the saved model")
    keep_adapter: bool = opt(False, "also save the adapter directory beside the merged model")


@dataclass
class OutputConfig:
    """Stage configs inherit this, so `output_dir=`, `overwrite=` and `resume=` are top-level."""

    output_dir: str = opt("", "where the run writes its model, hanlm.json and metrics.jsonl")
    overwrite: bool = opt(False, "replace a non-empty output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
