"""The only place hanlm touches library internals: each shim names the versions it was checked
against and fails loudly, with what to do, on a version where the internal is gone.

- `reset_accelerator_state`: accelerate keeps one `AcceleratorState` per process. A second
  `Accelerator(...)` in the same process (tests, a notebook, PPO after a Trainer stage) inherits
  the first one's mixed-precision and device settings, and refuses different ones. The Trainer
  resets it the same way before building its own; accelerate offers no public call for it.
- `load_trainer_checkpoint`: resuming from the checkpoint of the last step, transformers 5 takes
  one step more than `max_steps` (it checks the limit only after a step, unless the last step
  ends an epoch); `trainer.run_trainer` loads such a checkpoint itself, with the Trainer's loader,
  and takes no step. transformers has no public call that loads a checkpoint into a Trainer.
- `trl_token_count` / `set_trl_token_count`: trl's trainers count training tokens in
  `_total_train_tokens` (logged as `num_tokens`) and do not checkpoint it, so a resumed run would
  count from 0; hanlm stores it in its checkpoints and sets it back.
- `batching_logits_processors`: transformers' continuous-batching manager builds its logits
  processors from the generation config and, when sampling, draws with `torch.multinomial`,
  which on a CPU makes one random number per vocabulary entry per row (5 ms a step for 32 rows
  of an 8k vocabulary, more than the demo model's forward pass). `hanlm serve` gives the manager
  its own processors, the last of which draws the token itself (one random number per row), and
  runs the manager's arg-max path. The manager offers no public way to pass processors.
- `open_swanlab_run`: transformers' SwanLab callback (read on 5.25) asks `swanlab.get_run()`
  whether a run is open, and swanlab 0.10 raises when none is instead of returning None, so
  `train.report_to=swanlab` failed as training began. hanlm opens the run the callback would
  open (named after the run, in `SWANLAB_PROJECT`) just before, and the callback uses it.
- `keep_process_group` / `leave_process`: not an internal but a torch defect (seen on 2.13, no
  released fix). Under torchrun with gloo, destroying the process group (when DDP's reducer is
  freed as a stage returns) joins gloo's worker threads while the GIL is held, and a worker
  still freeing a finished collective's tensor that was made in Python waits for the GIL: the
  process hangs after its work is done (on busy cores, after PPO's last barrier). A command of
  a multi-process run keeps the group alive, and its process leaves with `os._exit` once every
  output is written and closed, so the group is never destroyed in a live interpreter.

pyproject.toml caps transformers, trl and accelerate below the next minor version after the last
one checked here (a fresh install must not pick a release nobody has read these internals on);
tests/test_layers.py holds the caps and these ranges together. To move a cap: read the internal
in the new release, widen the range here, raise the cap, run the tests.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import metadata
from typing import Any

# accelerate versions whose AcceleratorState._reset_state() was read and tested.
ACCELERATE_CHECKED = ("1.10", "1.16")


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def reset_accelerator_state() -> None:
    """Forget the process's accelerate settings (the process group, if any, stays)."""
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is None:
        version = metadata.version("accelerate")
        raise RuntimeError(
            f"accelerate {version} has no AcceleratorState._reset_state (checked on"
            f" {ACCELERATE_CHECKED[0]}-{ACCELERATE_CHECKED[1]}): update hanlm.compat, or install"
            f" accelerate<={ACCELERATE_CHECKED[1]}"
        )
    reset()


def installed_within(package: str, checked: tuple[str, str]) -> bool:
    """Whether the installed `package` is within `checked` (major.minor, both ends included):
    the versions a shim here was read on."""
    v = _major_minor(metadata.version(package))
    return _major_minor(checked[0]) <= v <= _major_minor(checked[1])


# transformers versions whose Trainer._load_from_checkpoint(path) was read and tested.
TRANSFORMERS_CHECKED = ("5.0", "5.25")


def load_trainer_checkpoint(trainer: Any, checkpoint: str) -> None:
    """Load a Trainer checkpoint's weights into `trainer.model` as `Trainer.train` does when it
    resumes (full weights or adapters): for a resume that has no step left to take."""
    load = getattr(trainer, "_load_from_checkpoint", None)
    if load is None:
        version = metadata.version("transformers")
        raise RuntimeError(
            f"transformers {version} has no Trainer._load_from_checkpoint (checked on"
            f" {TRANSFORMERS_CHECKED[0]}-{TRANSFORMERS_CHECKED[1]}): update hanlm.compat, or"
            f" install transformers<={TRANSFORMERS_CHECKED[1]}"
        )
    load(checkpoint)


# trl versions whose trainers' `_total_train_tokens` (the logged `num_tokens`) was read.
TRL_CHECKED = ("1.0", "1.16")


def trl_token_count(trainer: Any) -> int | None:
    """The tokens a trl trainer has counted (logged as `num_tokens`); None for other trainers.
    trl starts the count at 0 on a resume, so hanlm keeps it in its checkpoints."""
    n = getattr(trainer, "_total_train_tokens", None)
    return int(n) if isinstance(n, (int, float)) else None


def set_trl_token_count(trainer: Any, count: int) -> None:
    if hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = count


# transformers versions whose ContinuousBatchingManager.logit_processor (built in __init__, handed
# to the batch processor at the first start()) was read and tested.
CB_CHECKED = ("5.24", "5.25")


def batching_logits_processors(manager: Any, processors: list[Any]) -> None:
    """Make a continuous-batching manager (not yet started) apply `processors`, per request where
    transformers has a per-request version (temperature, top-k, top-p); the manager must have
    been made with `do_sample=False`, so the last processor's choice is the token."""
    if manager.generation_config.do_sample:
        raise ValueError("make the manager with do_sample=False: the processors draw the token")
    from transformers import LogitsProcessorList
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )

    version = metadata.version("transformers")
    old = getattr(manager, "logit_processor", None)
    started = getattr(manager, "batch_processor", None) is not None
    if not isinstance(old, ContinuousBatchingLogitsProcessorList) or started:
        raise RuntimeError(
            f"transformers {version}: the continuous-batching manager has no `logit_processor`"
            f" list, or it has started already (checked on {CB_CHECKED[0]}-{CB_CHECKED[1]}): update"
            f" hanlm.compat, or install transformers=={CB_CHECKED[1]}.*"
        )
    manager.logit_processor = ContinuousBatchingLogitsProcessorList(
        LogitsProcessorList(processors), per_request_processors=True
    )


def open_swanlab_run(args: Any) -> None:
    """Open the SwanLab run transformers' callback would open, where `args.report_to` names
    swanlab (main process; see the module's docstring)."""
    if "swanlab" not in (args.report_to or []) or args.process_index != 0:
        return
    import swanlab

    if hasattr(swanlab, "has_run") and not swanlab.has_run():
        swanlab.init(experiment_name=args.run_name, project=os.getenv("SWANLAB_PROJECT"))


_KEPT_GROUPS: list[Any] = []


def keep_process_group() -> None:
    """Hold the default process group of a run of several processes for the life of this
    process (see the module's docstring); nothing for a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.group.WORLD
        if group is not None and all(g is not group for g in _KEPT_GROUPS):
            _KEPT_GROUPS.append(group)


def leave_process(code: int) -> int:
    """For the command line's entry points: a process that kept its process group flushes its
    output and leaves at once with `code`; any other returns `code` to exit normally."""
    if not _KEPT_GROUPS:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
