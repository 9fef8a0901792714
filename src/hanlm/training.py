"""What every Trainer-based stage shares: arguments from `TrainConfig`, LoRA set-up, metrics into
`metrics.jsonl`, complete-checkpoint tracking for resume, and the final save.

transformers writes a checkpoint's files one after another, so a crash can leave a partial
`checkpoint-N`. A checkpoint counts as complete only once `on_save` has run for it (we then drop
a marker file in it); resume takes the newest complete one and deletes partial ones.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from hanlm.config import LoraConfig, TrainConfig
from hanlm.modeling import count_parameters, pick_precision
from hanlm.runs import Run

CHECKPOINTS = "checkpoints"
COMPLETE = "hanlm-complete"


def training_args(
    cfg: TrainConfig, run_dir: Path, has_eval: bool, args_cls: Any = None, **extra: Any
) -> Any:
    """TrainingArguments (or a trl config class) for `cfg`, on CPU when there is no GPU."""
    import torch

    if args_cls is None:
        from transformers import TrainingArguments as args_cls
    precision = pick_precision(cfg.precision)
    on_cpu = not torch.cuda.is_available()
    if on_cpu and precision != "fp32":
        raise ValueError(f"train.precision={cfg.precision}: bf16/fp16 training needs a GPU here")
    eval_every = cfg.eval_steps if cfg.eval_steps > 0 else max(cfg.max_steps, 1)
    save_every = cfg.save_steps if cfg.save_steps > 0 else None
    return args_cls(
        output_dir=str(run_dir / CHECKPOINTS),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=cfg.scheduler,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_every if has_eval else None,
        save_strategy="steps" if save_every else "no",
        save_steps=save_every or 500,
        save_total_limit=cfg.save_total_limit,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=on_cpu,
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
        **extra,
    )


def apply_lora(
    model: Any, lora: LoraConfig, trainable_tokens: list[int] | None = None, task: str = "CAUSAL_LM"
) -> Any:
    """Wrap `model` with peft LoRA adapters; optionally train only some embedding rows."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora.targets if t not in names]
    if missing:
        raise ValueError(
            f"lora.targets {missing} match no module of this model; some names it has: "
            f"{sorted(n for n in names if n.endswith('proj'))[:12]}"
        )
    kwargs: dict[str, Any] = {}
    modules_to_save = list(lora.modules_to_save)
    if getattr(model.config, "tie_word_embeddings", False):
        # Tied input/output embeddings must stay one tensor through training and merging, or
        # the saved model gains a separate lm_head that no longer matches its config.
        kwargs["ensure_weight_tying"] = True
        if "embed_tokens" in modules_to_save and "lm_head" in modules_to_save:
            modules_to_save.remove("lm_head")
    if trainable_tokens:
        kwargs["trainable_token_indices"] = {"embed_tokens": sorted(trainable_tokens)}
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        modules_to_save=modules_to_save or None,
        task_type=task,
        **kwargs,
    )
    return get_peft_model(model, peft_cfg)


def finish_lora(model: Any, lora: LoraConfig, run_dir: Path) -> Any:
    """Keep the adapter beside the run if asked (or if not merging); return the model to save."""
    if not lora.enabled:
        return model
    if lora.keep_adapter or not lora.merge:
        model.save_pretrained(str(run_dir / "adapter"))
    return model.merge_and_unload() if lora.merge else model


def describe_trainable(model: Any) -> dict[str, Any]:
    trainable, total = count_parameters(model)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / max(total, 1),
    }


def metrics_callback(run: Run, tokens_per_char: float | None = None) -> Any:
    """A TrainerCallback writing every log line to metrics.jsonl, with ppl and bpc on eval."""
    from transformers import TrainerCallback

    class _Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row = dict(logs)
            for prefix in ("eval_", ""):
                loss = row.get(f"{prefix}loss")
                if loss is not None and prefix == "eval_":
                    row["eval_ppl"] = math.exp(min(loss, 50))
                    if tokens_per_char:
                        row["eval_bpc"] = loss * tokens_per_char / math.log(2)
            run.log(state.global_step, **row)

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    (ckpt / COMPLETE).write_text(str(state.global_step))

    return _Metrics()


def last_checkpoint(run_dir: Path) -> str | None:
    """Newest complete checkpoint; partial ones (a crash mid-save) are removed."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    found = []
    for d in root.glob("checkpoint-*"):
        if not d.is_dir():
            continue
        if (d / COMPLETE).is_file():
            found.append((int(d.name.split("-")[-1]), d))
        else:
            print(f"[hanlm] removing incomplete checkpoint {d}")
            shutil.rmtree(d, ignore_errors=True)
    return str(max(found)[1]) if found else None


def resume_point(run_dir: Path, resume: bool) -> str | None:
    if not resume:
        return None
    ckpt = last_checkpoint(run_dir)
    print(f"[hanlm] resuming from {ckpt}" if ckpt else "[hanlm] no checkpoint to resume: starting")
    return ckpt
