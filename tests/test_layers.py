"""The package structure, checked on the source: a small kernel and feature packages on floors,
a feature imports only packages on lower floors (never a sibling feature, never an upper floor),
no import cycles, hanlm-internal imports at module top (only heavy libraries load lazily),
library internals only in compat.py, and no module or function too long to read."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "hanlm"

# Floors, bottom to top. Floors 0-1 are the kernel, whose modules may import each other (the
# cycle test still applies); from floor 2 up every entry is a feature package, which imports
# only the kernel and packages on floors below its own.
FLOORS = [
    {"hanlm", "hanlm.config", "hanlm.losses", "hanlm.compat", "hanlm.console"},
    {"hanlm.runs", "hanlm.modeling", "hanlm.trainer", "hanlm.generation", "hanlm.stage"}
    | {"hanlm.headline"}
    | {"hanlm.testing", "hanlm.data"},
    {"hanlm.tokenizer", "hanlm.embed", "hanlm.datagen"},
    {"hanlm.train", "hanlm.align", "hanlm.eval", "hanlm.export", "hanlm.rag", "hanlm.label"},
    {"hanlm.serve"},
    {"hanlm.pipeline"},
    {"hanlm.__main__"},
]
KERNEL = 1  # the top kernel floor
HEAVY = {"torch", "transformers", "trl", "datasets", "peft", "accelerate", "tokenizers"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module(p): p for p in sorted(PKG.rglob("*.py"))}
TREES = {name: ast.parse(p.read_text(encoding="utf-8")) for name, p in MODULES.items()}


def _unit(name: str) -> str:
    """The floor entry a module belongs to: its feature package, or itself in the kernel."""
    for names in FLOORS:
        for n in names:
            if name == n or (n != "hanlm" and name.startswith(n + ".")):
                return n
    raise AssertionError(f"{name} is on no floor: add it (or its package) to FLOORS")


def _floor(name: str) -> int:
    unit = _unit(name)
    return next(i for i, names in enumerate(FLOORS) if unit in names)


def _imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """Every hanlm module a module imports (anywhere in it), resolved to a module name."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "hanlm":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub if sub in MODULES else node.module, node))
        elif isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names if a.name.split(".")[0] == "hanlm"]
    return out


def test_every_module_is_on_a_floor():
    assert all(_unit(name) for name in MODULES)
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 12, f"the kernel is small: {loose}; a module one feature uses lives in it"


def test_features_import_only_lower_floors():
    """A feature never imports a sibling feature or anything above it; the kernel never imports
    a feature."""
    bad = []
    for name, tree in TREES.items():
        for target, _ in _imports(tree):
            if target == "hanlm" or _unit(target) == _unit(name):
                continue
            low, high = _floor(target), _floor(name)
            if low > high or (low == high and high > KERNEL):
                bad.append(f"{name} (floor {high}) imports {target} (floor {low})")
    assert not bad, bad


def test_no_import_cycles():
    graph = {
        name: {t for t, _ in _imports(tree) if t in MODULES and t != name}
        for name, tree in TREES.items()
    }
    for pkg in [n for n in graph if (MODULES[n].name == "__init__.py")]:
        graph[pkg] = {t for t in graph[pkg] if not t.startswith(pkg + ".")}  # re-exports
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_hanlm_imports_sit_at_module_top():
    """Only heavy libraries are imported inside functions (so `hanlm --help` stays fast)."""
    bad = []
    for name, tree in TREES.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                bad += [f"{name}:{node.lineno}" for target, node in _imports(fn)]
    assert not bad, bad


def test_help_imports_no_heavy_library():
    import subprocess

    code = (
        "import sys; from hanlm.pipeline import cli, commands;"
        "[commands.config_class(n) for n in commands.COMMANDS];"
        f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_library_internals_only_in_compat():
    """No `<third-party module or class>._private` outside compat.py."""
    bad = []
    for name, tree in TREES.items():
        if name == "hanlm.compat":
            continue
        third_party = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] != "hanlm":
                    third_party |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                third_party |= {(a.asname or a.name).split(".")[0] for a in node.names}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in third_party
            ):
                bad.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not bad, bad


def test_no_module_grows_past_a_few_screens():
    """A module is at most 600 lines: a longer one holds two ideas, and one of them (a stage's
    config, a class its loop drives, a family of helpers) moves to a sibling module."""
    lines = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in MODULES.items()}
    over = sorted(((n, name) for name, n in lines.items() if n > 600), reverse=True)
    assert not over, over


def test_no_function_is_longer_than_two_screens():
    """A function or method (nested ones too) is at most 120 lines, docstring included: a
    stage's `run()` reads top to bottom as a short sequence of named steps."""
    over = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 120:
                    over.append(f"{name}:{node.lineno} {node.name}() {n} lines")
    assert not over, over


def test_compat_shim_resets_accelerate_state():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from hanlm.compat import ACCELERATE_CHECKED, installed_within, reset_accelerator_state

    assert installed_within("accelerate", ACCELERATE_CHECKED), "re-read compat.py"
    Accelerator(cpu=True)
    assert AcceleratorState().initialized
    reset_accelerator_state()
    assert not AcceleratorState._shared_state  # the state the shim exists to clear
    Accelerator(cpu=True)  # and a new one can be built


def test_library_caps_match_the_versions_compat_was_read_on():
    """A fresh install must not pick a release whose internals nobody has read: each library
    hanlm.compat reaches into is capped in pyproject.toml just above its checked range, and the
    installed version lies inside that range (a raised cap without a re-read fails here)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    from hanlm import compat

    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = {r.name: r for r in map(Requirement, deps["dependencies"])}
    checked = {
        "transformers": [compat.TRANSFORMERS_CHECKED, compat.CB_CHECKED],
        "accelerate": [compat.ACCELERATE_CHECKED],
        "trl": [compat.TRL_CHECKED],
    }
    for name, ranges in checked.items():
        caps = [s.version for s in reqs[name].specifier if s.operator == "<"]
        newest = max(compat._major_minor(hi) for _, hi in ranges)
        assert caps == [f"{newest[0]}.{newest[1] + 1}"], (name, str(reqs[name].specifier), newest)
        for checked_range in ranges:
            assert compat.installed_within(name, checked_range), (name, checked_range)
        assert Version(metadata.version(name)) in reqs[name].specifier


def test_no_two_modules_share_a_name():
    """One name per idea. `headlines.py` is the one per-package convention: each feature's
    headline functions for the report, named by its command declarations."""
    from collections import Counter

    names = Counter(p.name for p in PKG.rglob("*.py"))
    shared = sorted(
        n for n, k in names.items() if k > 1 and n not in ("__init__.py", "headlines.py")
    )
    assert not shared, shared
