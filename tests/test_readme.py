"""The commands the README shows, run or checked against the command table.

Every `hanlm ...` and `make ...` line in the README's shell blocks is taken as written. Quick
commands run on the tiny test model, which stands in for the README's run directory
(`runs/demo/sft`); commands that take minutes (`make demo`, whole recipes) are checked without
running: their arguments are parsed against the command table and every stage's config is read
against its config class (`hanlm run --dry-run`). A command or key that does not exist fails.
The helpers here are shared with tests/test_docs.py, which checks the docs pages' commands.
"""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest

from hanlm.config import ConfigError, load_config
from hanlm.pipeline.cli import main, parse_args
from hanlm.pipeline.commands import COMMANDS, config_class

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_FENCES = ("bash", "sh", "shell", "console")

# What stands in for the README's run directories when a command runs here.
DEMO_MODELS = re.compile(r"^runs/demo/(sft|pretrain|ppo|dpo)$")
# The commands the README shows that run here, by name (others are checked, not run).
RUN_HERE = {"chat"}


# --------------------------------------------------------------------------- reading commands


def shell_lines(text: str) -> list[str]:
    """The lines of a Markdown text's shell code blocks, continuation lines joined."""
    lines, fence, buf = [], None, ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            continue
        if fence not in SHELL_FENCES:
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append((buf + raw).strip())
        buf = ""
    return lines


def command_words(line: str, program: str) -> list[str] | None:
    """The arguments of `program` on a shell line (`.venv/bin/` and `VAR=x` prefixes allowed,
    comments and a trailing `&` dropped), or None when the line does not run it."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words or words[0].rsplit("/", 1)[-1] != program:
        return None
    if words[-1] == "&":
        words = words[:-1]
    return words[1:]


def commands_in(text: str, program: str = "hanlm") -> list[list[str]]:
    return [w for line in shell_lines(text) if (w := command_words(line, program)) is not None]


def match_command(argv: list[str]) -> tuple[str, list[str]]:
    """(command, its arguments): the longest command name the words start with."""
    for name in sorted(COMMANDS, key=lambda n: -len(n.split())):
        words = name.split()
        if argv[: len(words)] == words:
            return name, argv[len(words) :]
    raise AssertionError(f"'hanlm {' '.join(argv[:2])}' names no command of `hanlm --help`")


def check_command(argv: list[str]) -> str:
    """Parse a command line and read its config against the command's config class, as
    `hanlm` does before anything loads; `...` (more arguments) is left out. Returns the name."""
    if argv in (["--help"], ["-h"]):
        return "--help"
    name, rest = match_command(argv)
    rest = [a for a in rest if a != "..."]
    if "--help" in rest:
        return name
    try:
        config_path, overrides = parse_args(name, rest)
        if config_path is not None and not (ROOT / config_path).is_file():
            config_path = None  # a placeholder such as cfg.yaml: the overrides are still checked
        load_config(config_class(name), config_path and ROOT / config_path, overrides)
    except (ConfigError, ValueError) as e:  # ValueError: the command line's UsageError
        raise AssertionError(f"hanlm {' '.join(argv)}: {e}") from None
    return name


def dry_run(recipe_args: list[str], tmp_path: Path) -> None:
    """`hanlm run RECIPE --dry-run`: every stage's command and config checked, nothing run."""
    rc = main(["run", *recipe_args, "--dry-run", f"run_dir={tmp_path / 'dry'}"])
    assert rc == 0, f"hanlm run {' '.join(recipe_args)} --dry-run failed"


def make_targets() -> dict[str, list[str]]:
    """Makefile targets and their recipe lines."""
    targets: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([\w.-]+):(?!=)", line)
        if m:
            current = targets.setdefault(m.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif line.strip() and not line.startswith("#"):
            current = None
    return targets


# --------------------------------------------------------------------------- the README


TEXT = README.read_text(encoding="utf-8")
HANLM = commands_in(TEXT)
MAKE = commands_in(TEXT, "make")


def _id(argv: list[str]) -> str:
    return " ".join(argv)[:60]


def test_readme_shows_commands_and_stays_short():
    assert HANLM, "the README shows no hanlm command"
    assert [w[:1] for w in MAKE][:2] == [["demo"], ["test"]], "the two quick-start commands"
    n = len(TEXT.splitlines())
    assert n <= 250, f"README.md has {n} lines: move detail to a page under docs/"


@pytest.mark.parametrize("argv", HANLM, ids=_id)
def test_readme_hanlm_command(argv, tmp_path, tiny_model_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    name = check_command(argv)
    if name == "--help" or "--help" in argv:
        assert main(argv) == 0
        assert "usage: hanlm" in capsys.readouterr().out
    elif name == "run":
        dry_run(argv[1:], tmp_path)
    elif name in RUN_HERE:
        args = [str(tiny_model_path) if DEMO_MODELS.match(a) else a for a in argv]
        assert args != argv, f"{_id(argv)}: no run directory to stand the tiny model in for"
        monkeypatch.setattr(
            "sys.stdin", io.StringIO("床前明月光\n/reset\n/system 你是诗人\n/exit\n")
        )
        assert main([*args, "generation.max_new_tokens=8"]) == 0
        assert capsys.readouterr().out.strip()
    # anything else was checked against the command table above, without running


@pytest.mark.parametrize("argv", MAKE, ids=_id)
def test_readme_make_command(argv, tmp_path, monkeypatch):
    """A `make` target the README names exists; one that runs a recipe has a recipe that reads."""
    monkeypatch.chdir(ROOT)
    targets = make_targets()
    assert argv and argv[0] in targets, f"make {argv[0] if argv else ''}: no such Makefile target"
    for line in targets[argv[0]]:
        words = command_words(line.replace("$(BIN)/", ""), "hanlm")
        if words is not None:
            assert check_command(words) == "run", line
            dry_run(words[1:], tmp_path)


def test_readme_lists_every_command():
    """The README's command table has one line per command of `hanlm --help`, and no other."""
    listed = re.findall(r"^\| `hanlm ([a-z -]+)` \|", TEXT, flags=re.M)
    assert len(listed) == len(set(listed)), "a command is listed twice"
    assert set(listed) == set(COMMANDS), (
        f"missing: {sorted(set(COMMANDS) - set(listed))}; unknown: {sorted(set(listed) - set(COMMANDS))}"
    )


def test_the_demo_table_is_rendered_from_a_recorded_run():
    """The README's demo figures are each stage's headline from a recorded demo run
    (docs/demo-figures.json, written with the table by scripts/demo_figures.py): a figure
    edited by hand, a record not rendered, or a stage of the recipe missing from the record
    fails."""
    import json
    import subprocess
    import sys

    from hanlm.pipeline.recipe import find_recipe, load_recipe

    script = ROOT / "scripts" / "demo_figures.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((ROOT / "docs" / "demo-figures.json").read_text(encoding="utf-8"))
    stages = [s.name for s in load_recipe(find_recipe("demo")).stages]
    assert [s["stage"] for s in record["stages"]] == stages
    assert all(s["figures"] and s["verdict"] for s in record["stages"])
