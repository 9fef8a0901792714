"""What every training stage shares: Trainer arguments from `TrainConfig`, LoRA set-up, metrics
into `metrics.jsonl`, with complete-checkpoint marking for resume.

transformers writes a checkpoint's files one after another, so a crash can leave a partial
`checkpoint-N`. A checkpoint counts as complete only once `on_save` has run for it (we then drop
the marker `runs.mark_complete` writes, with each file's size and sha256); `Run.resume_from`
takes the newest complete one. Old checkpoints are pruned by the callback after the new one is
marked, not by the Trainer (which prunes before `on_save`: a crash in between could leave no
complete checkpoint, or a half-removed one still marked complete).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from hanlm import console
from hanlm.compat import (
    keep_process_group,
    load_trainer_checkpoint,
    open_swanlab_run,
    set_trl_token_count,
    trl_token_count,
)
from hanlm.config import ConfigError, LoraConfig, TrainConfig, trackers
from hanlm.modeling import count_parameters, pick_precision
from hanlm.runs import CHECKPOINTS, Run, atomic_write_json, mark_complete, prune_checkpoints

# what hanlm adds to a Trainer checkpoint: counters the libraries do not keep (see `run_trainer`)
EXTRA_STATE = "hanlm_state.json"
# where `train.report_to=tensorboard` writes its event files, inside the run directory
TENSORBOARD_DIR = "tensorboard"


def training_args(
    cfg: TrainConfig, run_dir: Path, has_eval: bool, args_cls: Any = None, **extra: Any
) -> Any:
    """TrainingArguments (or a trl config class) for `cfg`, on CPU when there is no GPU."""
    import torch

    if args_cls is None:
        from transformers import TrainingArguments as args_cls
    check_launch(cfg, "hanlm STAGE")  # the stages call it first, by name
    precision = pick_precision(cfg.precision)
    on_cpu = not torch.cuda.is_available()
    if on_cpu and precision != "fp32":
        raise ValueError(f"train.precision={cfg.precision}: bf16/fp16 training needs a GPU here")
    # eval_steps=0: no evaluation on the way, only the one the Trainer adds at the last step
    # (DefaultFlowCallback), in epoch mode too.
    eval_every = cfg.eval_steps if cfg.eval_steps > 0 else 10**9
    save_every = cfg.save_steps if cfg.save_steps > 0 else None
    report_to = trackers(cfg)
    if "tensorboard" in report_to:  # transformers' TensorBoardCallback reads its directory here
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(run_dir) / TENSORBOARD_DIR)
    args = args_cls(
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
        save_total_limit=None,  # the metrics callback prunes, once the new one is complete
        # explicit: trl's configs default it to True, the Trainer's to False
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=on_cpu,
        report_to=report_to,
        run_name=Path(run_dir).name,  # the run's name in wandb, swanlab and mlflow
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # verbose: the Trainer's progress bar and raw log dicts; otherwise `run_trainer` puts
        # hanlm's progress line in place of the Trainer's printer
        disable_tqdm=not console.verbose(),
        deepspeed=cfg.deepspeed or None,  # a JSON path; the Trainer fills its "auto" values
        use_liger_kernel=cfg.liger,  # the stages that cannot take it refuse in `check_launch`
        **extra,
    )
    check_world(args.world_size, "hanlm STAGE")  # the Trainer's process group is set up by now
    return args


def batching_args(
    cfg: TrainConfig,
    stage: str,
    grouped: bool = True,
    padding_free: bool = False,
    attention: str = "auto",
) -> dict[str, Any]:
    """Trainer arguments for `train.batching`, checked before anything loads. grouped: the
    Trainer's length-grouped sampler (batches of similar lengths, shuffled), on the `length`
    column a stage gives its rows (the longest sequence the row becomes); padding_free: trl's
    padding-free collator, for stages whose trl trainer has one. `auto` is padding-free where
    the model runs flash-attention's variable-length kernel (`attention`, the stage's
    `model.attn_implementation`, is flash_attention_2), else grouped (on the demo model on a
    CPU, grouped SFT ran at 2.39x trl's default and padding-free, one sequence with a
    block-diagonal mask, at 2.02x: benchmarks/results/bench.md), else random."""
    mode = cfg.batching
    if mode == "auto":
        flash = attention == "flash_attention_2"
        mode = "padding_free" if padding_free and flash else "grouped" if grouped else "random"
    if (mode == "padding_free" and not padding_free) or (mode == "grouped" and not grouped):
        have = [
            "random",
            *(["grouped"] if grouped else []),
            *(["padding_free"] if padding_free else []),
        ]
        raise ConfigError(f"train.batching={mode}: hanlm {stage} offers {', '.join(have)}")
    if mode == "grouped":
        return {"train_sampling_strategy": "group_by_length", "length_column_name": LENGTH}
    return {"padding_free": True} if mode == "padding_free" else {}


LENGTH = "length"  # the column of a stage's rows that grouped batches sort on


def batching_mode(args: Any) -> str:
    """The batching a Trainer's arguments give: packed, padding_free, grouped or random."""
    if getattr(args, "packing", False):
        return "packed"
    if getattr(args, "padding_free", False):
        return "padding_free"
    return "grouped" if args.train_sampling_strategy == "group_by_length" else "random"


class PaddingCount:
    """A Trainer's collator, wrapped to count the tokens of the training batches it forms and
    how many of them are padding: each tensor of token ids against its attention mask (`masks`:
    ids key -> mask key; by default every `*input_ids` with its `*attention_mask`, and a
    padding-free batch, which has no mask, holds no padding). Evaluation batches are not
    counted: the Trainer forms them with the same collator, between `on_step_end` (with an
    evaluation due) and `on_evaluate`. Only the batches training has used count (the data
    loader forms one ahead), so a checkpoint's count (`EXTRA_STATE`, restored by `run_trainer`)
    is exact and a resumed run reports what an uninterrupted one does. `count_padding`
    installs it."""

    def __init__(self, collate: Any, masks: dict[str, str] | None = None) -> None:
        self.collate, self.masks = collate, masks
        self.formed: list[tuple[int, int]] = []  # (computed, real) per training batch formed
        self.used = 0  # how many of them training has stepped on
        self.restored = (0, 0)  # the count of a checkpoint this run resumed from
        self.counting = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        if self.counting:
            masks = self.masks or {
                k: k[: -len("input_ids")] + "attention_mask"
                for k in batch
                if k.endswith("input_ids")
            }
            computed = real = 0
            for key, mask_key in masks.items():
                ids, mask = batch[key], batch.get(mask_key)
                computed += ids.numel()
                real += int(mask.sum()) if mask is not None else ids.numel()
            self.formed.append((computed, real))
        return batch

    @property
    def counts(self) -> tuple[int, int]:
        """(tokens computed, real tokens) of the batches training used, across resumes."""
        used = self.formed[: self.used]
        return (
            self.restored[0] + sum(c for c, _ in used),
            self.restored[1] + sum(r for _, r in used),
        )

    @property
    def fraction(self) -> float:
        computed, real = self.counts
        return 1 - real / computed if computed else 0.0

    def summary(self, stage: str, args: Any) -> dict[str, Any]:
        """The run's batching and padding fraction, for its summary (and said on the console)."""
        mode = batching_mode(args)
        print(f"[hanlm] {stage}: {mode} batches; {self.fraction:.1%} of the tokens were padding")
        return {"batching": mode, "padding_fraction": round(self.fraction, 4)}


def count_padding(trainer: Any, masks: dict[str, str] | None = None) -> PaddingCount:
    """Wrap `trainer`'s collator in a `PaddingCount` that counts its training batches."""
    from transformers import TrainerCallback

    counter = PaddingCount(trainer.data_collator, masks)
    trainer.data_collator = counter

    class Phases(TrainerCallback):
        def on_substep_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            counter.used += 1

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            counter.used += 1
            if control.should_evaluate:
                counter.counting = False

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            counter.counting = True

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            counter.counting = False

    trainer.add_callback(Phases())
    return counter


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
        trainer: Any = None  # set by `run_trainer`, for what the checkpoint must add
        command = run.command  # names the progress line

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
                    extra = {}
                    tokens = trl_token_count(self.trainer)
                    if tokens is not None:
                        extra["trl_total_train_tokens"] = tokens
                    padding = getattr(self.trainer, "data_collator", None)
                    if isinstance(padding, PaddingCount):
                        extra["padding_counts"] = list(padding.counts)
                    if extra:
                        atomic_write_json(ckpt / EXTRA_STATE, extra)
                    mark_complete(ckpt, state.global_step)
                    prune_checkpoints(run.dir, run.keep)

    return _Metrics()


def progress_callback(name: str) -> Any:
    """A TrainerCallback drawing `console.Progress` (step/total, loss, learning rate, ETA), a
    line per evaluation, and the stage's training time at its end (main process only)."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        progress: console.Progress | None = None
        progress_line = True  # `use_progress_line` adds one only
        trained = False

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.progress = console.Progress(name, state.max_steps, state.global_step)

        def on_step_end(self, args, state, control, **kw):
            if self.progress:
                self.progress.tick(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.progress and logs and "loss" in logs:
                lr = logs.get("learning_rate")
                self.progress.update(state.global_step, loss=logs["loss"], lr=lr)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not metrics or not state.is_world_process_zero:
                return
            if self.progress:
                when = f"at step {state.global_step}/{state.max_steps}"
                self.progress.note(console.evaluation_line(when, metrics))
            elif not self.trained:  # a measurement before training
                print(f"[{name}] {console.evaluation_line('before training', metrics)}", flush=True)

        def on_train_end(self, args, state, control, **kw):
            self.trained = True
            if self.progress:
                p, self.progress = self.progress, None
                took = console.duration(time.time() - p.started)
                p.close(f"trained {state.global_step - p.first} steps in {took}")

    return _Progress()


def use_progress_line(trainer: Any) -> None:
    """hanlm's progress line in place of the Trainer's progress bar and raw log dicts (not when
    verbose). Idempotent; `run_trainer` calls it, and a stage that evaluates before training
    calls it first."""
    from transformers import PrinterCallback, ProgressCallback

    console.route_libraries()  # what the Trainer's set-up loaded (accelerate, deepspeed ...)
    callbacks = trainer.callback_handler.callbacks
    if console.verbose() or any(getattr(cb, "progress_line", False) for cb in callbacks):
        return
    name = next((cb.command for cb in callbacks if hasattr(cb, "command")), "train")
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress_callback(name))


def run_trainer(trainer: Any, checkpoint: str | None) -> Any:
    """`trainer.train(resume_from_checkpoint=checkpoint)`, but a checkpoint of the last step
    (a run killed while saving its final model) takes no further step: transformers would take
    one more than `max_steps` there (see `compat.load_trainer_checkpoint`). Its weights and
    state are loaded instead; `training_loss` is then the mean of the logged losses. trl's
    token count, which trl does not checkpoint, and the padding count (`PaddingCount`) are set
    back from hanlm's `EXTRA_STATE`."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    for cb in trainer.callback_handler.callbacks:
        if hasattr(cb, "trainer"):
            cb.trainer = trainer
    use_progress_line(trainer)
    keep_process_group()  # under torchrun, never destroyed in this process: see hanlm.compat
    open_swanlab_run(trainer.args)
    extra = Path(checkpoint) / EXTRA_STATE if checkpoint else None
    if extra is not None and extra.is_file():
        saved = json.loads(extra.read_text(encoding="utf-8"))
        if "trl_total_train_tokens" in saved:
            set_trl_token_count(trainer, saved["trl_total_train_tokens"])
        if "padding_counts" in saved and isinstance(trainer.data_collator, PaddingCount):
            trainer.data_collator.restored = tuple(saved["padding_counts"])
    limit = trainer.args.max_steps
    sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(
        trainer, "is_fsdp_enabled", False
    )
    if checkpoint is not None and limit > 0 and not sharded:
        state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        if state.global_step >= limit:
            load_trainer_checkpoint(trainer, checkpoint)
            trainer.state = state
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            print(f"[hanlm] {checkpoint} is the last step's: no step left to train")
            mean = sum(losses) / len(losses) if losses else math.nan
            return TrainOutput(state.global_step, mean, {})
    return trainer.train(resume_from_checkpoint=checkpoint)


def optimizer(model: Any, cfg: TrainConfig, total_steps: int, lr: float = 0.0) -> tuple[Any, Any]:
    """AdamW over `model`'s trainable parameters and its `cfg.scheduler` over `total_steps`
    (`lr` 0 = `cfg.lr`)."""
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr or cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(
        cfg.scheduler,
        opt,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return opt, sched


def check_launch(
    train: TrainConfig, command: str, random_only: str = "", no_liger: str = ""
) -> None:
    """Refusals of a Trainer stage's launch that need no model: DeepSpeed or FSDP without a
    GPU, where accelerate would run undistributed processes that each train a copy; a
    `train.batching` other than random in a stage that batches at random only (`random_only`:
    why; the other stages check their choices in `batching_args`); `train.liger` in a stage
    that does not take Liger's kernels (`no_liger`: why)."""
    import torch

    if random_only and train.batching not in ("auto", "random"):
        raise ConfigError(
            f"train.batching={train.batching}: {command} offers random only (auto = random):"
            f" {random_only}"
        )
    if no_liger and train.liger:
        raise ConfigError(
            f"train.liger=true: {command} does not take Liger's kernels ({no_liger}); hanlm"
            " pretrain and hanlm sft do"
        )
    if torch.cuda.is_available():
        return
    via = "accelerate's FSDP" if env_true("ACCELERATE_USE_FSDP") else ""
    via = via or ("accelerate's DeepSpeed" if env_true("ACCELERATE_USE_DEEPSPEED") else "")
    via = via or (f"train.deepspeed={train.deepspeed}" if train.deepspeed else "")
    if via:
        raise ValueError(
            f"{command} with {via} needs GPUs: on CPU accelerate cannot shard (its processes would"
            " each train alone). Here launch DDP instead: torchrun --nproc_per_node N -m hanlm"
            f" {command.split()[-1]} ... without train.deepspeed / the accelerate config (hanlm"
            " ppo does run ZeRO on CPU)"
        )


def check_world(processes: int, command: str) -> None:
    """Refuse a process that the launcher counts as one of WORLD_SIZE > 1 but that runs
    alone (no distributed init: the accelerate CPU traps), rather than train N copies."""
    import os

    want = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if want > 1 and processes != want:
        raise ValueError(
            f"{command}: the launcher started {want} processes (WORLD_SIZE={want}) but this one"
            f" sees {processes} (no distributed process group), so each would train its own"
            " copy. Launch with torchrun --nproc_per_node N (on CPU: gloo), or on CPU"
            " ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N; DeepSpeed"
            " and FSDP through accelerate need GPUs"
        )


def env_true(name: str) -> bool:
    import os

    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def tracker_list(report_to: list[str], run_dir: Path | None) -> list[Any]:
    """accelerate's `log_with` for `train.report_to`, for the loops that are not a Trainer
    (`hanlm ppo`, `hanlm embed train`): TensorBoard as a tracker writing to RUN/tensorboard (the
    Trainer stages' directory), the others by name."""
    from accelerate.tracking import TensorBoardTracker

    out: list[Any] = []
    for name in report_to:
        if name == "tensorboard":
            out.append(TensorBoardTracker(TENSORBOARD_DIR, str(run_dir or ".")))
        elif name != "none":
            out.append(name)
    return out


def start_trackers(acc: Any, run: Run, config: dict[str, Any]) -> None:
    """Start the trackers of `acc` (project "hanlm", named after the run directory) with the
    run's config, flattened to the scalars trackers accept."""
    if not acc.log_with:
        return
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flat(config)}
    name = run.dir.name
    kwargs = {"wandb": {"name": name}, "mlflow": {"run_name": name}}
    kwargs["swanlab"] = {"experiment_name": name}
    acc.init_trackers("hanlm", config=flat, init_kwargs=kwargs)


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out
