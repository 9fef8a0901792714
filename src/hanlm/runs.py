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
one and removes partial ones. The marker holds a manifest (each file's size and sha256), checked
before a resume loads anything: a checkpoint damaged after it was completed (truncated, a file
deleted) stops the run with an error naming the file and the previous complete checkpoint.
A full disk stops a run with an error naming the directory; the partial write is removed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
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

from hanlm import console
from hanlm.config import InputError, LoraConfig, end_tracker_runs, to_dict
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


class CheckpointError(OutputDirError):
    """A checkpoint marked complete no longer matches what was written (truncated, missing)."""


class DiskFullError(OutputDirError):
    """The filesystem holding the output directory ran out of space."""


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
    """Yield a temporary directory that replaces `path` only if the block completes (checkpoints
    and saved models: a crash mid-save leaves the previous complete directory, or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        remove_partial(tmp)
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
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a directory of the path belongs, no permission...
        raise OutputDirError(f"output_dir {path} cannot be created ({e.strerror})") from None
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
        # how many checkpoints to keep (the Trainer callback prunes after marking one complete)
        self.keep = int(getattr(getattr(cfg, "train", None), "save_total_limit", 0) or 0)
        # Under torchrun only rank 0 touches the directory; the others just know its path.
        self.main = is_main_process()
        if not self.main:
            self.dir = Path(output_dir)
            self.metrics_path = self.dir / METRICS_FILE
            before = (read_run(self.dir) or {}).get("summary", {}) if resume else {}
            # the same `initial` as rank 0, so that all skip (or all run) the measurement
            self.info = {"summary": {k: v for k, v in before.items() if k.startswith("initial_")}}
            # every process checks the checkpoint alike, so that all stop together if it is bad
            self._resume_ckpt = resume_checkpoint(self.dir, remove=False) if resume else None
            return
        held = Path(output_dir).is_dir() and any(Path(output_dir).iterdir())
        self._fresh = not held or (overwrite and not resume)  # (see __exit__)
        self.dir = prepare_output_dir(output_dir, overwrite=overwrite, resume=resume)
        self.metrics_path = self.dir / METRICS_FILE
        console.attach(self.dir)  # the libraries' warnings from here on: hanlm.log
        # Checked before anything is written or loaded: a damaged checkpoint stops the run here.
        self._resume_ckpt = resume_checkpoint(self.dir) if resume else None
        if resume:
            _drop_torn_line(self.metrics_path)
            _drop_stale_temporaries(self.dir)
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
            # the figures measured before training (see `record_initial`) outlive the restart
            before = previous.get("summary", {})
            self.info["summary"] = {k: v for k, v in before.items() if k.startswith("initial_")}
        atomic_write_text(
            self.dir / CONFIG_FILE,
            yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False),
        )
        self.save()
        self._own = {p.name for p in self.dir.iterdir()} | {METRICS_FILE}  # the run's records

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

    def logged(self, step: int, last: int) -> dict[str, Any]:
        """For a loop resumed at `step`: if that is its `last` step, nothing is left to run, so
        it reports the metrics row logged for it then (without step and time); else {}."""
        if step < last or not self.main:
            return {}
        rows = [r for r in read_metrics(self.dir) if r.get("step") == step]
        return {k: v for k, v in rows[-1].items() if k not in ("step", "time")} if rows else {}

    @property
    def initial(self) -> dict[str, Any]:
        """The `initial_*` figures recorded by this run or, resumed, by the interrupted one."""
        return {k: v for k, v in self.info["summary"].items() if k.startswith("initial_")}

    def record_initial(self, figures: dict[str, Any]) -> None:
        """Keep the figures measured before training (`initial_*`) in hanlm.json now, so that a
        resumed run reports the same starting point without measuring it again."""
        if not self.main:
            return
        self.info["summary"].update({k: v for k, v in figures.items() if k.startswith("initial_")})
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
        """The newest complete checkpoint when resuming (None: start afresh), said aloud; it was
        checked against its manifest when the run opened (`resume_checkpoint`)."""
        if not self.resume:
            return None
        ckpt = self._resume_ckpt
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
            mark_complete(tmp, step)
        prune_checkpoints(self.dir, keep)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.main:
            return
        end_tracker_runs(f"{exc_type.__name__}: {exc}" if exc_type else None)  # the stage's runs
        # a rejected input leaves nothing behind: no directory that held only this run's records
        if isinstance(exc, InputError) and self._fresh and set(os.listdir(self.dir)) <= self._own:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        full = exc is not None and disk_full(exc, self.dir)
        if full:
            # the half-written checkpoint takes space and can never be resumed from
            _checkpoints(self.dir)
        if exc_type is not None:
            self.info["error"] = f"{exc_type.__name__}: {exc}"
            # a full disk may refuse even this small file; the error below still says it all
            with contextlib.suppress(OSError):
                self.finish(status="interrupted" if exc_type is KeyboardInterrupt else "failed")
        elif self.info["status"] == "running":
            self.finish()
        if full:
            raise DiskFullError(self._disk_full_message(exc)) from exc

    def _disk_full_message(self, exc: BaseException) -> str:
        where = next(
            (
                e.filename
                for e in _chain(exc)
                if isinstance(e, OSError) and getattr(e, "filename", None)
            ),
            None,
        )
        last = last_checkpoint(self.dir)
        kept = (
            f"the last complete checkpoint ({last.relative_to(self.dir)}) and earlier outputs are"
            " intact"
            if last
            else "earlier outputs are intact (no checkpoint was complete yet)"
        )
        writing = f" while writing {where}" if where else ""
        return (
            f"no space left on the filesystem holding {self.dir}{writing}"
            f" ({_free_bytes(self.dir) / 2**20:.1f} MiB free; {exc.__class__.__name__}: {exc});"
            f" {kept} and the half-written files were removed. Free space (or add it) and run the"
            " same command with resume=true to continue"
        )


def _checkpoints(run_dir: Path, remove: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first; partial ones (a crash mid-save) are removed (when
    `remove`: the writing process only)."""
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
        elif remove:
            print(f"[hanlm] removing incomplete checkpoint {d}", file=sys.stderr)
            remove_partial(d)
    return sorted(found)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = _checkpoints(Path(run_dir))
    return found[-1][1] if found else None


def remove_partial(path: Path) -> None:
    """Remove a half-written directory, emptying its files first: a writer that failed (torch's
    on a full disk) can hold its file open until its exception is gone, and an unlinked open
    file keeps its space; truncated, it gives the space back now."""
    for f in path.rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError):
                os.truncate(f, 0)
    shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints (keep 0: none). The marker goes
    first, so a crash mid-removal leaves an incomplete directory, never a complete-looking one
    with files missing."""
    if keep <= 0:
        return
    for _, old in _checkpoints(Path(run_dir))[:-keep]:
        (old / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _hashes(files: list[Path]) -> list[str]:
    """sha256 of each file, several at once (hashlib releases the GIL on large blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(files), 1))) as pool:
        return list(pool.map(_sha256, files))


def manifest(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `directory` except the marker, by relative path."""
    d = Path(directory)
    files = [f for f in sorted(d.rglob("*")) if f.is_file() and f.name != COMPLETE]
    return {
        f.relative_to(d).as_posix(): {"size": f.stat().st_size, "sha256": h}
        for f, h in zip(files, _hashes(files))
    }


def mark_complete(checkpoint: str | Path, step: int) -> None:
    """Declare a checkpoint directory written in full (the Trainer calls this after its save):
    the marker records each file's size and sha256, so that a resume can tell a checkpoint
    damaged later (truncated, a file lost) from a good one. Written atomically."""
    d = Path(checkpoint)
    atomic_write_json(d / COMPLETE, {"step": step, "files": manifest(d)})


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What is wrong with a checkpoint marked complete, checked against its manifest (None:
    nothing; a marker from before manifests holds only the step and is taken as it is)."""
    d = Path(checkpoint)
    try:
        marker = json.loads((d / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"its marker {COMPLETE} is unreadable: {e}"
    if not isinstance(marker, dict):
        return None
    files = marker.get("files", {})
    for name, want in files.items():  # the cheap checks first
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size < want["size"]:
            return f"{name} truncated: {size} of {want['size']} bytes"
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written"
    for (name, want), h in zip(files.items(), _hashes([d / n for n in files])):
        if h != want["sha256"]:
            return f"{name} is damaged: its sha256 differs from the one recorded when written"
    return None


def resume_checkpoint(run_dir: str | Path, remove: bool = True) -> Path | None:
    """The newest complete checkpoint, verified against its manifest before anything loads it
    (None: there is none). A damaged one is an error naming it, what is wrong and the previous
    good one: falling back silently would hide a failing disk and throw steps away unasked."""
    found = _checkpoints(Path(run_dir), remove=remove)
    if not found:
        return None
    newest = found[-1][1]
    problem = checkpoint_problem(newest)
    if problem is None:
        return newest
    previous = next((d for _, d in reversed(found[:-1]) if checkpoint_problem(d) is None), None)
    if previous is not None:
        then = (
            f"the previous complete one is {previous.name}: delete (or move aside) {newest} and"
            f" run again with resume=true to continue from {previous}"
        )
    else:
        then = (
            f"no earlier complete checkpoint is left: delete {newest} and run again with"
            " resume=true to start over in this directory"
        )
    raise CheckpointError(f"{newest} is corrupt ({problem}); {then}")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def disk_full(exc: BaseException, path: str | Path) -> bool:
    """Did `exc` come from a full disk under `path`? OSError ENOSPC, safetensors' "os error 28",
    or a failed write (torch.save says only "unexpected pos") with under 1 MiB left there."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "os error 28" in str(e):
            return True
    return isinstance(exc, (OSError, RuntimeError)) and 0 <= _free_bytes(Path(path)) < 1 << 20


def _drop_stale_temporaries(run_dir: Path) -> None:
    """Remove what a killed process left mid-write (a kill runs no cleanup): the temporary
    directories of `atomic_dir` and `modeling.save_model` and `atomic_write_text`'s files."""
    stale = [
        *(run_dir / CHECKPOINTS).glob(".checkpoint-*.tmp"),
        *(run_dir / CHECKPOINTS).glob(".checkpoint-*.old"),
        *run_dir.parent.glob(f".{run_dir.name}.save.*"),
        *run_dir.glob(".*.tmp"),
    ]
    for p in stale:
        print(f"[hanlm] removing {p}, left by an interrupted write", file=sys.stderr)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _drop_torn_line(path: Path) -> None:
    """A run stopped mid-write can leave a last metrics line without its newline: cut it off (it
    is re-logged when the step is repeated) so the appended lines stay readable."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(
            f"[hanlm] {path}: removing a half-written last line ({len(data) - keep} bytes)",
            file=sys.stderr,
        )
        with open(path, "r+b") as f:
            f.truncate(keep)


def read_run(path: str | Path) -> dict[str, Any] | None:
    p = Path(path) / RUN_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise OutputDirError(f"{p} is damaged ({e}); run again with overwrite=true") from None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path) / METRICS_FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
