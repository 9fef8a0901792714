"""The state of a hand-written training loop (`hanlm ppo`): its accelerator, complete checkpoints
of the trainable tensors, optimisers and every process's random state, and the check that
processes hold equal weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hanlm.compat import keep_process_group, reset_accelerator_state
from hanlm.modeling import pick_precision
from hanlm.runs import Run
from hanlm.trainer import check_world, env_true, tracker_list


def trainable_state(model: Any) -> dict[str, Any]:
    """The trainable tensors of `model` (on the CPU): what a loop's checkpoint must keep."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, path: Path) -> None:
    """Load a `trainable_state` file; a saved tensor this model lacks is an error."""
    import torch

    bad = model.load_state_dict(torch.load(path, map_location="cpu"), strict=False)
    if bad.unexpected_keys:
        raise ValueError(
            f"{path} does not fit this model (e.g. {bad.unexpected_keys[0]}); was it written"
            " with other lora settings?"
        )


def rng_state() -> dict[str, Any]:
    """This process's Python, torch and CUDA random states."""
    import random

    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"py": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import torch

    random.setstate(state["py"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_equal_across_processes(models: list[Any]) -> bool:
    """DDP keeps the processes' weights equal; check it (a fingerprint per process)."""
    from accelerate.utils import gather_object

    fingerprint = [
        float(p.detach().double().sum())
        for model in models
        for p in model.parameters()
        if p.requires_grad
    ]
    return all(f == fingerprint for f in gather_object([fingerprint]))


def loop_accelerator(
    precision: str, command: str, report_to: list[str] | None = None, run_dir: Path | None = None
) -> Any:
    """The accelerate `Accelerator` of a hand-written loop: one process, or one of W under
    torchrun / `accelerate launch` (DDP); the CPU when there is no GPU, as the Trainer stages;
    autocast for bf16/fp16; accelerate's experiment trackers for `report_to` (started by
    `start_trackers` once the run directory exists). accelerate's state is per process: what
    an earlier run in this process set is dropped first, as the Trainer does."""
    import torch
    from accelerate import Accelerator

    chosen = pick_precision(precision)
    if not torch.cuda.is_available() and chosen != "fp32":
        raise ValueError(f"train.precision={precision}: bf16/fp16 needs a GPU here")
    reset_accelerator_state()
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=chosen if chosen in ("bf16", "fp16") else "no",
        log_with=tracker_list(report_to or [], run_dir) or None,
        project_dir=str(run_dir) if run_dir is not None else None,
    )
    sharded = acc.distributed_type.name
    # accelerate's CPU processes may say MULTI_CPU under an FSDP/DeepSpeed launch: its env says
    sharded = "FSDP" if env_true("ACCELERATE_USE_FSDP") else sharded
    sharded = "DEEPSPEED" if env_true("ACCELERATE_USE_DEEPSPEED") else sharded
    if sharded in ("DEEPSPEED", "FSDP"):
        raise ValueError(  # the loop builds its own DeepSpeed engines (hanlm.align.distributed)
            f"{command} does not run under accelerate's {sharded}: launch it with torchrun"
            " (DDP), and for DeepSpeed ZeRO add train.deepspeed=configs/deepspeed/zero2.json"
        )
    check_world(acc.num_processes, command)
    keep_process_group()  # never destroyed in this process: see hanlm.compat
    return acc


def save_loop(
    run: Run,
    step: int,
    keep: int,
    acc: Any,
    modules: dict[str, Any],
    stateful: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    """A complete checkpoint of a hand-written loop (`checkpoints/checkpoint-<step>`): the
    trainable tensors of each of `modules` (`<name>.pt`), the `state_dict()` of each of
    `stateful` (optimisers, schedulers, data orders), `extra`, and every process's random
    state (each samples its own data). Rank 0 writes; all processes must call it."""
    import torch
    from accelerate.utils import gather_object

    rng = gather_object([rng_state()])
    acc.wait_for_everyone()
    if run.main:
        with run.checkpoint(step, keep=keep) as tmp:
            for name, module in modules.items():
                torch.save(trainable_state(module), tmp / f"{name}.pt")
            states = {k: v.state_dict() for k, v in stateful.items() if v is not None}
            torch.save({"step": step, **extra, "states": states, "rng": rng}, tmp / "state.pt")
    acc.wait_for_everyone()


def load_loop(
    ckpt: Path, acc: Any, modules: dict[str, Any], stateful: dict[str, Any]
) -> dict[str, Any]:
    """Restore what `save_loop` wrote (into unprepared modules); returns the saved dict."""
    import torch

    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    for name, module in modules.items():
        load_trainable(module, ckpt / f"{name}.pt")
    for name, obj in stateful.items():
        if obj is not None and name in state["states"]:
            obj.load_state_dict(state["states"][name])
    rngs, rank = state["rng"], acc.process_index
    if rank < len(rngs):
        set_rng_state(rngs[rank])
    if acc.is_main_process:
        print(f"[hanlm] resuming from {ckpt} (step {state['step']})")
        if len(rngs) != acc.num_processes:
            print(
                f"[hanlm] note: the checkpoint is from {len(rngs)} processes, this run has"
                f" {acc.num_processes}: the sampling does not repeat the interrupted run's",
                file=sys.stderr,
            )
    return state
