"""Every `hanlm` command, gathered from the `COMMANDS` its feature package declares
(`hanlm.stage.Command`, in the package's `__init__.py`).

`hanlm.pipeline.cli` parses arguments against this table, `hanlm.pipeline.recipe` runs recipe
stages through it and `hanlm.pipeline.report` reads each stage's headline declaration here, so a
command is declared once, in its own package. Packages are found by walking `hanlm`'s
subpackages; only their light `__init__` modules are imported (a stage module pulls in torch).
"""

from __future__ import annotations

import importlib
import pkgutil

import hanlm
from hanlm.stage import Command

# The order of `hanlm --help`: the pipeline's order. A package not named here comes last.
HELP_ORDER = (
    "pipeline",
    "data",
    "datagen",
    "label",
    "tokenizer",
    "train",
    "align",
    "eval",
    "export",
    "serve",
    "embed",
    "rag",
)


def _gather() -> dict[str, Command]:
    packages = sorted(
        (m.name for m in pkgutil.iter_modules(hanlm.__path__) if m.ispkg),
        key=lambda p: (HELP_ORDER.index(p) if p in HELP_ORDER else len(HELP_ORDER), p),
    )
    out: dict[str, Command] = {}
    for pkg in packages:
        for cmd in getattr(importlib.import_module(f"hanlm.{pkg}"), "COMMANDS", ()):
            if cmd.name in out:
                raise RuntimeError(f"hanlm.{pkg} declares `{cmd.name}`, declared already")
            out[cmd.name] = cmd
    return out


COMMANDS: dict[str, Command] = _gather()


def config_class(name: str) -> type:
    cmd = COMMANDS[name]
    return getattr(importlib.import_module(cmd.module), cmd.config)
