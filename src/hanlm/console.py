"""What a command shows on the console, and where the libraries' chatter goes instead.

From the command line (`hanlm.pipeline.cli`), a command runs inside `quiet_libraries()`: its
console holds hanlm's own lines — for a training stage one progress line (`Progress`: step/total,
loss, learning rate, ETA; a line per evaluation) and its headline at the end. What the libraries
print that tells a user nothing goes to the run's log file `RUN/hanlm.log` instead:

- Python warnings raised outside hanlm's own code (torch's, transformers', trl's, peft's ...
  FutureWarning, DeprecationWarning, UserWarning), and deprecation warnings wherever raised;
  a warning from hanlm's code still reaches the console;
- the records of the libraries' `logging` loggers (transformers' warnings, torch's `_pytree`
  notices, accelerate, deepspeed, torchao ...): their console handlers are pointed at the log
  (`logging.StreamHandler.setStream`), and a root handler takes what would reach the console
  through `logging.lastResort`;
- the progress bars of transformers (loading and writing weights) and of datasets (`map`,
  `filter` while a trainer prepares its data).

Libraries print some of this while they are imported, so for a command that loads a model the
heavy ones are imported up front, with their output redirected to the log. Until the command
opens its run directory (`Run` calls `attach`) the log is held in memory; a command that never
opens one ends with a line saying how many lines were held back.

`HANLM_VERBOSE=1` (or `hanlm -v ...`) turns all of this off: the libraries print as they do
(the Trainer's raw log dicts and progress bars included), and the progress line is not drawn.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "HANLM_VERBOSE"
LOG_FILE = "hanlm.log"
# top-level logger names whose console output is moved into the log
LIBRARIES = (
    "torch",
    "torchao",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "tokenizers",
    "deepspeed",
    "DeepSpeed",
    "bitsandbytes",
    "optimum",
    "sentence_transformers",
    "tensorboard",
    "wandb",
    "swanlab",
    "mlflow",
    "jieba",
)
# imported up front by a command that loads a model (each prints while it is imported)
_PRELOAD = ("torch", "accelerate", "transformers", "peft", "datasets", "deepspeed")
_DEPRECATION = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_OWN = str(Path(__file__).resolve().parent)
PLAIN_INTERVAL = 10.0  # seconds between progress lines when the console is not a terminal


def verbose() -> bool:
    """Whether the libraries print as they do (HANLM_VERBOSE=1, set by `hanlm -v`)."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


class _LibraryLog:
    """A text stream: the run's log file once attached, held in memory before, the console
    again once the command is over."""

    def __init__(self) -> None:
        self.file: TextIO | None = None
        self.held: list[str] = []
        self.active = False
        self.lines = 0
        self.moved: list[tuple[logging.StreamHandler, Any]] = []  # (handler, its stream before)
        self.bars_turned_off: list[Any] = []  # how to turn each library's bars back on

    def write(self, text: str) -> int:
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
        elif self.active:
            self.held.append(text)
        else:
            sys.__stderr__.write(text)
        self.lines += text.count("\n")
        return len(text)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def isatty(self) -> bool:
        return False


_LOG = _LibraryLog()
_ROOT_HANDLER = logging.StreamHandler(_LOG)
_ROOT_HANDLER.setLevel(logging.WARNING)
_ROOT_HANDLER.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def _is_own(filename: str, category: type[Warning]) -> bool:
    path = str(Path(filename).resolve()) if filename else ""
    return path.startswith(_OWN) and not issubclass(category, _DEPRECATION)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    if _is_own(filename, category):
        _console_showwarning(message, category, filename, lineno, file, line)
    else:
        _LOG.write(warnings.formatwarning(message, category, filename, lineno, line))


_console_showwarning = warnings.showwarning


def route_libraries() -> None:
    """Point the console handlers of the libraries' loggers at the log, and turn off
    transformers' progress bars. Idempotent; called again once more libraries are loaded (a
    library may add its handler at its first use)."""
    if not _LOG.active:
        return
    consoles = {sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__}
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in LIBRARIES]
    for name in names:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and handler.stream in consoles:
                _LOG.moved.append((handler, handler.setStream(_LOG)))
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            _LOG.bars_turned_off.append(hf_logging.enable_progress_bar)
            hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:  # "Map: 100%|..." while a trainer prepares its data
        import datasets

        if datasets.is_progress_bar_enabled():
            _LOG.bars_turned_off.append(datasets.enable_progress_bars)
            datasets.disable_progress_bars()


@contextlib.contextmanager
def quiet_libraries(loads_model: bool = False) -> Iterator[None]:
    """Run a command with the libraries' warnings and logs in the log (see the module
    docstring); `loads_model`: import the heavy libraries up front. Nothing changes when
    verbose."""
    if verbose() or _LOG.active:
        yield
        return
    global _console_showwarning
    _console_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    logging.root.addHandler(_ROOT_HANDLER)
    _LOG.active, _LOG.held, _LOG.lines = True, [], 0
    try:
        if loads_model:
            with contextlib.redirect_stdout(_LOG), contextlib.redirect_stderr(_LOG):  # type: ignore[type-var]
                for name in _PRELOAD:
                    if importlib.util.find_spec(name) is not None:
                        importlib.import_module(name)
        route_libraries()
        yield
    finally:
        warnings.showwarning = _console_showwarning
        logging.root.removeHandler(_ROOT_HANDLER)
        for handler, stream in _LOG.moved:  # as they were (a process may run more commands)
            handler.setStream(stream)
        for turn_on in _LOG.bars_turned_off:
            turn_on()
        _LOG.moved, _LOG.bars_turned_off = [], []
        held = _LOG.lines if _LOG.file is None else 0
        if _LOG.file is not None:
            _LOG.file.close()
        _LOG.active, _LOG.file, _LOG.held = False, None, []
        if held and int(os.environ.get("RANK", "0")) == 0:
            lines = "1 line" if held == 1 else f"{held} lines"
            print(
                f"[hanlm] {lines} of library output were not shown ({VERBOSE_ENV}=1 shows them)",
                file=sys.stderr,
            )


def attach(run_dir: Path) -> None:
    """Write the log to `run_dir/hanlm.log` from now on (appending on resume), starting with
    what was held back. Nothing happens outside `quiet_libraries`."""
    if not _LOG.active:
        return
    if _LOG.file is not None:
        _LOG.file.close()
    _LOG.file = open(Path(run_dir) / LOG_FILE, "a", encoding="utf-8")  # noqa: SIM115
    _LOG.file.write("".join(_LOG.held))
    _LOG.file.flush()
    _LOG.held = []
    route_libraries()


# --------------------------------------------------------------------------- progress


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.4g}"


def figures(values: dict[str, Any]) -> str:
    """`loss 4.213  lr 2.80e-03` from {"loss": 4.213, "lr": 0.0028} (None values left out)."""
    shown = {
        k: f"{v:.2e}" if k == "lr" and isinstance(v, float) else _value(v)
        for k, v in values.items()
        if v is not None
    }
    return "  ".join(f"{k} {v}" for k, v in shown.items())


class Progress:
    """A training stage's progress: step/total, its latest figures (loss, learning rate ...),
    seconds per step and the time left. On a terminal one line redrawn in place; elsewhere (a
    CI log, a file) a plain line at the first report, then at most every `interval` seconds,
    and at the last step. `note` prints a line of its own (an evaluation)."""

    def __init__(
        self,
        name: str,
        total: int,
        first: int = 0,
        stream: TextIO | None = None,
        interval: float = PLAIN_INTERVAL,
    ) -> None:
        self.name, self.total, self.first = name, total, first
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.step = first
        self.values: dict[str, Any] = {}
        self.started = time.time()
        self.printed = 0.0  # when the last plain line was printed (0: never)
        self.drawn = 0.0  # when the terminal line was last redrawn
        self.shown = False  # a terminal line is on screen

    def line(self) -> str:
        done = self.step - self.first
        elapsed = time.time() - self.started
        parts = [f"[{self.name}] step {self.step}/{self.total}"]
        if self.values:
            parts.append(figures(self.values))
        if done > 0:
            per = elapsed / done
            parts.append(f"{per:.2f}s/step" if per < 10 else f"{duration(per)}/step")
            parts.append(f"ETA {duration(per * max(self.total - self.step, 0))}")
        else:
            parts.append("ETA ?")
        return "  ".join(parts)

    def _draw(self) -> None:
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()
        self.drawn, self.shown = time.time(), True

    def _clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.shown = False

    def tick(self, step: int) -> None:
        """The step advanced (no new figures): a terminal line is redrawn, at most 5 times a
        second."""
        self.step = step
        if self.tty and time.time() - self.drawn >= 0.2:
            self._draw()

    def update(self, step: int, **values: Any) -> None:
        """New figures at `step` (None values are not shown)."""
        self.step = step
        self.values = {k: v for k, v in values.items() if v is not None}
        if self.tty:
            self._draw()
            return
        now = time.time()
        if not self.printed or now - self.printed >= self.interval or step >= self.total:
            print(self.line(), file=self.stream, flush=True)
            self.printed = now

    def note(self, text: str) -> None:
        """A line of its own above the progress line."""
        self._clear()
        print(f"[{self.name}] {text}", file=self.stream, flush=True)
        if self.tty:
            self._draw()

    def close(self, text: str = "") -> None:
        """End the progress line (on a terminal its last state stays on screen); `text`, if
        given, is printed as the stage's closing line."""
        if self.shown:
            self._draw()
            self.stream.write("\n")
            self.shown = False
        if text:
            print(f"[{self.name}] {text}", file=self.stream, flush=True)


# evaluation figures not worth a console line (all stay in metrics.jsonl)
_EVAL_HIDDEN = ("runtime", "samples_per_second", "steps_per_second", "epoch", "num_tokens")
_EVAL_HIDDEN += ("preparation_time",)


def evaluation_line(when: str, metrics: dict[str, Any], shown: int = 4) -> str:
    """`eval at step 100/400: loss 4.1  accuracy 0.62` (`when`: "at step 100/400") from the
    Trainer's `eval_*` metrics: the loss first, then accuracies, then the first few others."""
    plain = {k.removeprefix("eval_"): v for k, v in metrics.items()}
    keys = [k for k in plain if not k.endswith(_EVAL_HIDDEN) and isinstance(plain[k], (int, float))]
    keys.sort(key=lambda k: (k != "loss", "accuracies" not in k and "accuracy" not in k))
    return f"eval {when}: " + figures({k: plain[k] for k in keys[:shown]})
