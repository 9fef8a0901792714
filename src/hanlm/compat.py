"""The only place hanlm touches library internals: each shim names the versions it was checked
against and fails loudly, with what to do, on a version where the internal is gone.

- `reset_accelerator_state`: accelerate keeps one `AcceleratorState` per process. A second
  `Accelerator(...)` in the same process (tests, a notebook, PPO after a Trainer stage) inherits
  the first one's mixed-precision and device settings, and refuses different ones. The Trainer
  resets it the same way before building its own; accelerate offers no public call for it.
"""

from __future__ import annotations

from importlib import metadata

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


def accelerate_checked() -> bool:
    """Whether the installed accelerate is within the versions this shim was checked on."""
    v = _major_minor(metadata.version("accelerate"))
    return _major_minor(ACCELERATE_CHECKED[0]) <= v <= _major_minor(ACCELERATE_CHECKED[1])
