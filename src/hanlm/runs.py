"""Run directories: the output-dir rules, `hanlm.json`, `metrics.jsonl`, checkpoints and saves.

Every command that writes results goes through `with Run(command, cfg) as run:`. It refuses a
non-empty output directory unless asked to overwrite or resume, records what produced the
results (resolved config, git commit, package versions, seed, times), saves the final model
(`run.save_model`: LoRA merged or kept, stop tokens in the generation config, rank 0 only), and
never leaves a half-written file where a complete one is expected (write to a temporary
sibling, then `os.replace`).

Checkpoints live in `checkpoints/checkpoint-N`, one scheme for every stage: a checkpoint counts
as complete only once the marker file `hanlm-complete` is in it (the Trainer stages drop it in
`on_save`, PPO writes the whole directory atomically with it); resume takes the newest complete
one and removes partial ones.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from hanlm.config import LoraConfig, to_dict
from hanlm.modeling import finish_lora
from hanlm.modeling import save_model as _save_model

RUN_FILE = "hanlm.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
COMPLETE = "hanlm-complete"
_VERSIONED = (
    "hanlm",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "tokenizers",
    "sentencepiece",
)


class OutputDirError(RuntimeError):
    """The output directory cannot be used as asked."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2, default=str)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, dumps(obj) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block completes.

    Used for checkpoints and saved models: a crash mid-save leaves the previous complete
    directory (or nothing), never a partial one under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def prepare_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create `path`, refusing to mix a new run into an existing one by accident."""
    if not str(path):
        raise OutputDirError(
            "output_dir is not set: pass output_dir=DIR (or output.output_dir=DIR)"
        )
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if resume:
            return path
        if not overwrite:
            raise OutputDirError(
                f"output_dir {path} is not empty; pass overwrite=true to replace it"
                " (or resume=true to continue a run there)"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_commit() -> str | None:
    """The commit of the hanlm checkout in use, if it is one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch, or a single process: the one that writes."""
    return int(os.environ.get("RANK", "0")) == 0


class Run:
    """One command's output directory and its records."""

    def __init__(
        self,
        command: str,
        cfg: Any,
        output_dir: str | Path | None = None,
        overwrite: bool | None = None,
        resume: bool | None = None,
        seed: int | None = None,
    ) -> None:
        """Output directory, overwrite, resume and seed come from `cfg` (an `OutputConfig` with a
        `train` section) unless given."""
        output_dir = cfg.output_dir if output_dir is None else output_dir
        overwrite = bool(getattr(cfg, "overwrite", False)) if overwrite is None else overwrite
        resume = bool(getattr(cfg, "resume", False)) if resume is None else resume
        if seed is None:
            seed = getattr(getattr(cfg, "train", None), "seed", None)
        self.command = command
        self.resume = resume
        self.started = time.time()
        # Under torchrun only rank 0 touches the directory; the others just know its path.
        self.main = is_main_process()
        if not self.main:
            self.dir = Path(output_dir)
            self.metrics_path = self.dir / METRICS_FILE
            self.info = {"summary": {}}
            return
        self.dir = prepare_output_dir(output_dir, overwrite=overwrite, resume=resume)
        self.metrics_path = self.dir / METRICS_FILE
        previous = read_run(self.dir) if resume else None
        self.info: dict[str, Any] = {
            "command": command,
            "status": "running",
            "config": to_dict(cfg),
            "seed": seed,
            "git_commit": git_commit(),
            "versions": package_versions(),
            "started": _now(),
            "ended": None,
            "resumed": bool(previous),
            "summary": {},
            "data": {},
        }
        if previous:
            self.info["first_started"] = previous.get("first_started", previous.get("started"))
        atomic_write_text(
            self.dir / CONFIG_FILE,
            yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False),
        )
        self.save()

    def save(self) -> None:
        if self.main:
            atomic_write_json(self.dir / RUN_FILE, self.info)

    def log(self, step: int, **metrics: Any) -> None:
        """Append one line of metrics; a line is flushed whole, so a crash loses at most it."""
        if not self.main:
            return
        row = {"step": step, "time": _now(), **metrics}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

    def set(self, section: str, value: Any) -> None:
        if not self.main:
            return
        self.info[section] = value
        self.save()

    def finish(self, summary: dict[str, Any] | None = None, status: str = "complete") -> None:
        if not self.main:
            return
        if summary:
            self.info["summary"].update(summary)
        self.info["summary"].setdefault("seconds", time.time() - self.started)
        self.info["status"] = status
        self.info["ended"] = _now()
        self.save()

    # ------------------------------------------------------------------ the model and checkpoints

    def save_model(
        self,
        model: Any,
        tokenizer: Any,
        lora: LoraConfig | None = None,
        stops: list[int] | None = None,
    ) -> Any:
        """Write the final model: LoRA adapters kept beside it and/or merged (as `lora` says), the
        stop tokens in its generation config so chat, the API and vLLM stop where the template
        ends a turn; rank 0 only, atomically. Returns the model to use from here on (merged)."""
        if lora is not None and lora.enabled and hasattr(model, "merge_and_unload"):
            model = finish_lora(model, lora, self.dir, write=self.main)
        gen = getattr(model, "generation_config", None)  # a reward model has none
        if gen is not None and stops:
            gen.eos_token_id = stops if len(stops) > 1 else stops[0]
        pad = getattr(tokenizer, "pad_token_id", None)
        if gen is not None and pad is not None:
            gen.pad_token_id = pad
        if self.main and (lora is None or not lora.enabled or lora.merge):
            _save_model(model, tokenizer, self.dir)
        return model

    def resume_from(self) -> str | None:
        """The newest complete checkpoint when resuming (None: start afresh), said aloud."""
        if not self.resume:
            return None
        ckpt = last_checkpoint(self.dir)
        if self.main:
            print(
                f"[hanlm] resuming from {ckpt}"
                if ckpt
                else "[hanlm] no checkpoint to resume: starting"
            )
        return str(ckpt) if ckpt else None

    @contextlib.contextmanager
    def checkpoint(self, step: int, keep: int = 0) -> Iterator[Path]:
        """A directory for `checkpoints/checkpoint-<step>`: it appears whole, with its complete
        marker, only if the block finishes; then all but the newest `keep` are removed."""
        with atomic_dir(self.dir / CHECKPOINTS / f"checkpoint-{step}") as tmp:
            yield tmp
            (tmp / COMPLETE).write_text(str(step))
        if keep > 0:
            for _, old in _checkpoints(self.dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.main:
            return
        if exc_type is not None:
            self.info["error"] = f"{exc_type.__name__}: {exc}"
            self.finish(status="interrupted" if exc_type is KeyboardInterrupt else "failed")
        elif self.info["status"] == "running":
            self.finish()


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first; partial ones (a crash mid-save) are removed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.glob("checkpoint-*"):
        step = d.name.split("-")[-1]
        if not d.is_dir() or not step.isdigit():
            continue
        if (d / COMPLETE).is_file():
            found.append((int(step), d))
        else:
            print(f"[hanlm] removing incomplete checkpoint {d}", file=sys.stderr)
            shutil.rmtree(d, ignore_errors=True)
    return sorted(found)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = _checkpoints(Path(run_dir))
    return found[-1][1] if found else None


def mark_complete(checkpoint: str | Path, step: int) -> None:
    """Declare a checkpoint directory written in full (the Trainer calls this after its save)."""
    (Path(checkpoint) / COMPLETE).write_text(str(step))


def read_run(path: str | Path) -> dict[str, Any] | None:
    p = Path(path) / RUN_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path) / METRICS_FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
