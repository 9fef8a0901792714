"""The command line: `hanlm <command> [CONFIG.yaml] [key.sub=value ...]`.

The commands are the table in `hanlm.pipeline.commands` (the recipe runner reads the same table).
Their modules are imported only when the command runs (or its --help is asked for), so `hanlm
--help` stays fast: torch, transformers and trl take seconds to import.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from hanlm import __version__, console
from hanlm.compat import leave_process
from hanlm.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    describe,
    load_config,
    parse_value,
)
from hanlm.data.sources import DataError
from hanlm.modeling import ModelError
from hanlm.pipeline.commands import COMMANDS, config_class
from hanlm.pipeline.headline_rows import load_reports, stage_headline
from hanlm.runs import OutputDirError, is_main_process, read_metrics, read_run

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")
_VERBOSE = ("-v", "--verbose")


class UsageError(ValueError):
    pass


def _print_main_help() -> None:
    width = max(len(n) for n in COMMANDS) + 2
    lines = [
        f"hanlm {__version__}: build Chinese and bilingual chat language models end to end",
        "",
        "usage: hanlm <command> [CONFIG.yaml] [key.sub=value ...]",
        "       hanlm <command> --help     (lists the command's config keys)",
        "       hanlm -v <command> ...     (verbose: library warnings and raw training logs)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}{cmd.help}" for name, cmd in COMMANDS.items()]
    lines += [
        "",
        "Config values come from the YAML file, then from key=value overrides (YAML syntax:",
        "train.lr=3e-4, data.paths=[a.jsonl,b.jsonl]); --key value and --flag also work.",
    ]
    print("\n".join(lines))


def command_help(name: str) -> str:
    cmd = COMMANDS[name]
    cls = config_class(name)
    rows = describe(cls)
    bare = f" [{cmd.usage}]" if cmd.usage else ""
    out = [f"usage: hanlm {name} [CONFIG.yaml]{bare} [key=value ...]", "", cmd.help, ""]
    if cmd.positional:
        out += [f"bare arguments set '{cmd.positional}'.", ""]
    out.append("config keys (key  type  default):")
    for key, tp, default, help_ in rows:
        out.append(f"  {key}  {tp}  = {default}")
        if help_:
            out += textwrap.wrap(help_, 96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


def _match_command(argv: list[str]) -> tuple[str | None, list[str]]:
    best = None
    for name in COMMANDS:
        words = name.split()
        if argv[: len(words)] == words and (best is None or len(words) > len(best.split())):
            best = name
    if best is None:
        return None, argv
    return best, argv[len(best.split()) :]


def parse_args(name: str, args: list[str]) -> tuple[str | None, list[Any]]:
    """Split a command's arguments into an optional YAML path and a list of overrides."""
    cmd = COMMANDS[name]
    config_path = None
    overrides: list[Any] = []
    bare: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            key = arg[2:].replace("-", "_")
            key = dict(cmd.aliases).get(key, key)
            if "=" in key:
                k = key.split("=", 1)[0]
                overrides.append(f"{k}={arg.split('=', 1)[1]}")
            elif i + 1 < len(args) and not _is_option_like(args[i + 1]):
                overrides.append((key, parse_value(args[i + 1])))
                i += 1
            else:
                overrides.append((key, True))
        elif _OVERRIDE.match(arg):
            overrides.append(arg)
        elif (
            config_path is None
            and arg.endswith((".yaml", ".yml"))
            and not cmd.usage.endswith((".yaml", ".yml"))  # `hanlm run RECIPE.yaml`
        ):
            config_path = arg
        else:
            bare.append(arg)
        i += 1
    if bare:
        if not cmd.positional:
            raise UsageError(
                f"hanlm {name}: unexpected argument(s) {bare};"
                f" use key=value (see hanlm {name} --help)"
            )
        overrides.insert(0, (cmd.positional, bare if cmd.usage.endswith("...]") else bare[0]))
        if not cmd.usage.endswith("...]") and len(bare) > 1:
            raise UsageError(f"hanlm {name}: takes one {cmd.usage}, got {bare}")
    return config_path, overrides


def _is_option_like(arg: str) -> bool:
    """`--flag NEXT`: NEXT is the flag's value unless it is itself an option or override."""
    return arg.startswith("--") or bool(_OVERRIDE.match(arg)) or arg.endswith((".yaml", ".yml"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in _VERBOSE for a in argv):  # anywhere; the stages of `hanlm run` inherit it
        argv = [a for a in argv if a not in _VERBOSE]
        os.environ[console.VERBOSE_ENV] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_main_help()
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"hanlm {__version__}")
        return 0
    name, rest = _match_command(argv)
    if name is None:
        words = " ".join(argv[:2])
        close = difflib.get_close_matches(words, list(COMMANDS), n=1, cutoff=0.4)
        close = close or difflib.get_close_matches(argv[0], list(COMMANDS), n=1, cutoff=0.4)
        hint = f"; did you mean 'hanlm {close[0]}'?" if close else ""
        print(f"hanlm: unknown command '{words}'{hint} (see hanlm --help)", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(command_help(name))
        return 0

    try:
        config_path, overrides = parse_args(name, rest)
        cfg = load_config(config_class(name), config_path, overrides)
    except (UsageError, ConfigError) as e:
        print(f"hanlm {name}: {e}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name].module)
    parts = [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]
    loads_model = any(isinstance(p, (ModelConfig, TrainConfig)) for p in parts)
    loads_model = loads_model or bool(getattr(cfg, "loads_model", lambda: False)())
    try:
        with console.quiet_libraries(loads_model):
            result = getattr(module, COMMANDS[name].func)(cfg)
    except (ConfigError, DataError, ModelError, OutputDirError, FileNotFoundError) as e:
        print(f"hanlm {name}: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # stages raise it for settings that cannot work together
        if os.environ.get("HANLM_DEBUG") == "1":
            raise
        print(f"hanlm {name}: error: {e} (HANLM_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hanlm {name}: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, int):
        return result
    if isinstance(result, (str, Path)) and is_main_process():  # once per job, not per process
        print(f"hanlm {name}: done -> {result}")
        for line in headline_lines(name, Path(result)):
            print(f"  {line}")
    return 0


def headline_lines(command: str, run_dir: Path) -> list[str]:
    """The stage's headline (the report's row: figures before -> after, verdict, warnings) as
    console lines; none for a command without one."""
    info = read_run(run_dir) if run_dir.is_dir() else None
    if not info or not COMMANDS[command].headline:
        return []
    reports = load_reports(run_dir, command)
    h = stage_headline(run_dir.name, command, info, reports, read_metrics(run_dir))
    lines = ["headline: " + "; ".join(f.text() for f in h.figures)] if h.figures else []
    lines += [f"verdict: {h.verdict}"] if h.verdict else []
    return lines + [f"warning: {w}" for w in h.warnings]


def fields_of(name: str) -> list[str]:
    """Top-level config fields of a command (for tests and completion)."""
    return [f.name for f in dataclasses.fields(config_class(name))]


def entry() -> int:
    """The `hanlm` script and `python -m hanlm`: `main` on the process's arguments; a process of
    a torchrun job leaves through `compat.leave_process`."""
    return leave_process(main())


if __name__ == "__main__":
    raise SystemExit(entry())
