"""`hanlm run RECIPE`: run a recipe's stages in order, skipping what is unchanged, resuming what
was interrupted, and writing a report.

A recipe is YAML:

    name: demo
    run_dir: runs/demo                 # stage outputs go to <run_dir>/<stage>
    report: {prompts_from: ..., num_prompts: 6, max_new_tokens: 64}
    stages:
      pretrain:
        command: pretrain              # any command of `hanlm --help` that writes output_dir
        config: {tokenizer: "${stages.tokenizer.output}", ...}

A recipe is named by path or, for the recipes that ship inside the package (`src/hanlm/recipes/`,
installed with it), by name: `hanlm run demo`.

`${stages.NAME.output}` is an earlier stage's output directory; `${assets}` the embedded demo data;
`${recipe_dir}` and `${run_dir}` what they say. A stage is skipped when its fingerprint — its
command, resolved config, the fingerprints of the stages it reads and the contents of the files
it names — equals the one recorded at its last complete run. Each stage runs as a child process
(`python -m hanlm`), so its peak memory is measured and a crash is contained.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hanlm import ASSETS, console
from hanlm.config import (
    ConfigError,
    Tracker,
    all_keys,
    check_trackers,
    load_config,
    opt,
    read_yaml,
    to_dict,
)
from hanlm.data.sources import install_hint
from hanlm.pipeline.commands import COMMANDS, config_class
from hanlm.pipeline.report import write_report
from hanlm.runs import atomic_write_json, atomic_write_text, read_run

# The recipes that ship with the package (`hanlm run NAME`): a clone and a wheel read the same files
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_RECIPE = "demo"
STATE_FILE = "recipe_state.json"
_REF = re.compile(r"\$\{([^}]+)\}")
# Config keys the runner sets itself; they do not change what a stage computes.
_RUNNER_KEYS = ("output_dir", "overwrite", "resume")
_WRITTEN = ("cache_dir", "output_dir")


class RecipeError(ConfigError):
    pass


@dataclass
class RunConfig:
    recipe: str = opt(
        "",
        "the name of a recipe that ships with hanlm"
        f" ({', '.join(sorted(p.stem for p in RECIPES.glob('*.yaml')))}) or the path to a recipe"
        f" YAML (default: {DEFAULT_RECIPE})",
    )
    run_dir: str = opt("", "override the recipe's run_dir")
    from_stage: str = opt("", "run this stage and every later one, even if unchanged (--from)")
    only: str = opt("", "run only this stage, even if unchanged (--only)")
    dry_run: bool = opt(False, "print the plan and exit (--dry-run)")
    report: bool = opt(True, "write report.html and report.md after the run")
    report_to: list[Tracker] = opt(
        [],
        "experiment trackers for every training stage (its train.report_to) that does not set"
        " its own: tensorboard, wandb, swanlab, mlflow",
    )

    def validate(self) -> None:
        check_trackers(self.report_to)

    def loads_model(self) -> bool:
        """The report answers prompts with each stage's model (for `console.quiet_libraries`)."""
        return self.report and not self.dry_run


@dataclass
class Stage:
    name: str
    command: str
    config: dict[str, Any]  # as written, with ${...} references unresolved
    needs: list[str]  # earlier stages this one reads
    if_installed: list[str] = field(default_factory=list)  # packages it runs only with


@dataclass
class Recipe:
    name: str
    path: Path
    run_dir: Path
    stages: list[Stage]
    report: dict[str, Any]
    report_to: list[str] = field(default_factory=list)  # `hanlm run report_to=...`


# --------------------------------------------------------------------------- parsing


def _refs(value: Any) -> list[str]:
    if isinstance(value, str):
        return _REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def recipe_names() -> list[str]:
    """The recipes that ship with the package, by name."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file from a path, or from the name of a recipe that ships with the package."""
    text = str(name_or_path) or DEFAULT_RECIPE
    path = Path(text)
    if path.is_file():
        return path
    named = RECIPES / f"{text}.yaml"
    if path.name == text and named.is_file():  # a bare name, not a path
        return named
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a directory; name a recipe YAML file in it")
    raise RecipeError(
        f"no recipe '{text}': not a file, and not one of the recipes that ship with hanlm"
        f" ({', '.join(recipe_names())}); give a name from that list or the path to a YAML file"
    )


def load_recipe(path: str | Path, run_dir: str = "") -> Recipe:
    """Parse and check a recipe: commands exist, references point to earlier stages."""

    path = find_recipe(path)
    try:
        raw = read_yaml(path, "recipe") or {}
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: a recipe is a mapping with name, run_dir, stages and report;"
            f" this file holds a {type(raw).__name__}"
        )
    for key, kind in (("name", str), ("run_dir", str), ("report", dict)):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            raise RecipeError(
                f"{path}: '{key}' must be a {'mapping' if kind is dict else 'string'},"
                f" not {type(raw[key]).__name__}"
            )
    unknown = set(raw) - {"name", "run_dir", "stages", "report"}
    if unknown:
        raise RecipeError(
            f"{path}: unknown recipe keys {sorted(map(str, unknown))}; use name, run_dir, stages,"
            " report"
        )
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise RecipeError(f"{path}: 'stages' must map stage names to {{command, config}}")
    stages: list[Stage] = []
    for name, spec in stages_raw.items():
        where = f"{path}: stage '{name}'"
        if not isinstance(name, str) or not re.fullmatch(r"[\w-]+", name):
            raise RecipeError(f"{where}: a stage name is a word (letters, digits, _ and -)")
        if not isinstance(spec, dict) or "command" not in spec:
            raise RecipeError(f"{where}: needs a 'command' (one of {', '.join(COMMANDS)})")
        extra = set(spec) - {"command", "config", "if_installed"}
        if extra:
            raise RecipeError(
                f"{where}: unknown keys {sorted(map(str, extra))}; use command, config and"
                " if_installed"
            )
        packages = spec.get("if_installed") or []
        packages = [packages] if isinstance(packages, str) else packages
        if not isinstance(packages, list) or not all(isinstance(x, str) for x in packages):
            raise RecipeError(f"{where}: 'if_installed' is a package name or a list of them")
        command = spec["command"]
        if not isinstance(command, str) or command not in COMMANDS:
            raise RecipeError(f"{where}: unknown command {command!r} (see hanlm --help)")
        config = spec.get("config") or {}
        if not isinstance(config, dict):
            raise RecipeError(f"{where}: 'config' must be a mapping")
        needs = []
        earlier = [s.name for s in stages]
        for ref in _refs(config):
            if ref in ("assets", "recipe_dir", "run_dir"):
                continue
            m = re.fullmatch(r"stages\.([\w-]+)\.output", ref)
            if not m:
                raise RecipeError(
                    f"{where}: unknown reference ${{{ref}}}; use ${{stages.NAME.output}},"
                    " ${assets}, ${recipe_dir} or ${run_dir}"
                )
            dep = m.group(1)
            if dep == name:
                raise RecipeError(f"{where}: refers to its own output (a cycle)")
            if dep not in stages_raw:
                raise RecipeError(f"{where}: refers to unknown stage '{dep}'")
            if dep not in earlier:
                raise RecipeError(
                    f"{where}: refers to stage '{dep}', which comes later; stages run in order,"
                    f" so this would be a cycle — move it after '{dep}'"
                )
            needs.append(dep)
        stages.append(Stage(name, command, config, sorted(set(needs)), packages))
    rd = Path(run_dir or raw.get("run_dir") or f"runs/{raw.get('name', path.stem)}")
    return Recipe(raw.get("name", path.stem), path, rd, stages, raw.get("report") or {})


def _substitute(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _REF.sub(lambda m: env[m.group(1)], value)
    if isinstance(value, dict):
        return {k: _substitute(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env) for v in value]
    return value


def stage_dir(recipe: Recipe, name: str) -> Path:
    return recipe.run_dir / name


def resolve_config(recipe: Recipe, stage: Stage) -> dict[str, Any]:
    """The stage's config with references replaced and checked against its config class."""

    env = {
        "assets": str(ASSETS),
        "recipe_dir": str(recipe.path.resolve().parent),
        "run_dir": str(recipe.run_dir),
        **{f"stages.{s.name}.output": str(stage_dir(recipe, s.name)) for s in recipe.stages},
    }
    config = _substitute(stage.config, env)
    config.setdefault("output_dir", str(stage_dir(recipe, stage.name)))
    cls = config_class(stage.command)
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    own = "report_to" in train or "train.report_to" in config
    if recipe.report_to and not own and "train.report_to" in all_keys(cls):
        config["train"] = {**train, "report_to": recipe.report_to}
    try:
        cfg = load_config(cls, None, [(k, v) for k, v in config.items()])
    except ConfigError as e:
        raise RecipeError(f"{recipe.path}: stage '{stage.name}': {e}") from None
    return to_dict(cfg)


# --------------------------------------------------------------------------- fingerprints


def _file_digest(path: Path, h: Any) -> None:
    if path.is_file():
        h.update(str(path.stat().st_size).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                _file_digest(p, h)


def _input_files(value: Any, skip: set[str]) -> list[Path]:
    if isinstance(value, str):
        if value in skip or any(value.startswith(s + os.sep) for s in skip):
            return []
        p = Path(value)
        return [p] if value and p.exists() and p.resolve() != Path.cwd().resolve() else []
    if isinstance(value, dict):
        # Caches and outputs are written by the run, not read by it.
        return [
            p for k, v in value.items() if not k.endswith(_WRITTEN) for p in _input_files(v, skip)
        ]
    if isinstance(value, list):
        return [p for v in value for p in _input_files(v, skip)]
    return []


def fingerprint(
    recipe: Recipe, stage: Stage, config: dict[str, Any], upstream: dict[str, str]
) -> str:
    """Hash of what determines a stage's output (not where it goes or how it is resumed)."""
    h = hashlib.sha256()
    pure = {k: v for k, v in config.items() if k not in _RUNNER_KEYS}
    if isinstance(pure.get("train"), dict):  # trackers watch a run; they do not change it
        pure["train"] = {k: v for k, v in pure["train"].items() if k != "report_to"}
    h.update(json.dumps([stage.command, pure], sort_keys=True, default=str).encode())
    for dep in stage.needs:
        h.update(f"{dep}={upstream[dep]}".encode())
    stage_outputs = {str(stage_dir(recipe, s.name)) for s in recipe.stages}
    for p in sorted(set(_input_files(pure, stage_outputs))):
        h.update(str(p).encode())
        _file_digest(p, h)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- planning


def _read_state(recipe: Recipe) -> dict[str, Any]:
    p = recipe.run_dir / STATE_FILE
    if not p.is_file():
        return {}
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise RecipeError(
            f"{p} is damaged ({e}); delete it, and every stage is planned afresh (complete stage"
            " outputs are rerun)"
        ) from None
    if not isinstance(state, dict):
        raise RecipeError(f"{p} is damaged (not a JSON object); delete it")
    return state


def _installed(package: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def plan(recipe: Recipe, cfg: RunConfig) -> list[dict[str, Any]]:
    """For each stage: its action (skip, run, resume, rerun) and why."""
    names = [s.name for s in recipe.stages]
    for flag, value in (("--from", cfg.from_stage), ("--only", cfg.only)):
        if value and value not in names:
            raise RecipeError(f"{flag} {value}: no such stage (stages: {', '.join(names)})")
    state = _read_state(recipe)
    upstream: dict[str, str] = {}
    steps = []
    forced_from = names.index(cfg.from_stage) if cfg.from_stage else None
    for i, stage in enumerate(recipe.stages):
        config = resolve_config(recipe, stage)
        absent = [p for p in stage.if_installed if not _installed(p)]
        if absent:  # its inputs may live in the package it lacks: no fingerprint
            hints = "; ".join(install_hint(p) for p in absent)
            why = f"needs {', '.join(absent)}, not installed ({hints})"
            step = {"stage": stage, "config": config, "fingerprint": "", "action": "skip"}
            steps.append({**step, "why": why, "absent": absent})
            upstream[stage.name] = ""
            continue
        fp = fingerprint(recipe, stage, config, upstream)
        upstream[stage.name] = fp
        prev = state.get(stage.name, {})
        out = stage_dir(recipe, stage.name)
        info = read_run(out)
        done = prev.get("fingerprint") == fp and info and info.get("status") == "complete"
        if cfg.only and stage.name != cfg.only:
            action, why = "skip", "not selected (--only)"
            if not done:
                action, why = "missing", "not selected (--only), and it has no complete output"
        elif cfg.only or (forced_from is not None and i >= forced_from):
            action, why = "rerun", "selected"
        elif done:
            action, why = "skip", "unchanged since its last complete run"
        elif (
            prev.get("fingerprint") == fp
            and info
            and COMMANDS[stage.command].resumable
            and info.get("status") in ("running", "interrupted", "failed")
        ):
            action, why = (
                "resume",
                f"interrupted ({info.get('status')}): resume from its last checkpoint",
            )
        elif prev:
            action, why = "rerun", "config or inputs changed"
        else:
            action, why = "run", "never run"
        steps.append(
            {
                "stage": stage,
                "config": config,
                "fingerprint": fp,
                "action": action,
                "why": why,
                "absent": absent,
            }
        )
    for step in steps:
        if step["action"] in ("run", "rerun", "resume"):
            for dep in step["stage"].needs:
                dep_step = next(s for s in steps if s["stage"].name == dep)
                if dep_step["absent"]:
                    raise RecipeError(
                        f"stage '{step['stage'].name}' needs the output of '{dep}', which runs"
                        f" only with {', '.join(dep_step['absent'])} installed; install it"
                    )
                if dep_step["action"] == "missing":
                    raise RecipeError(
                        f"stage '{step['stage'].name}' needs the output of '{dep}', which has"
                        f" no complete run; run it first (hanlm run {recipe.path} --only {dep})"
                    )
    return steps


# --------------------------------------------------------------------------- running


def _run_stage(recipe: Recipe, step: dict[str, Any], log: Any) -> dict[str, Any]:
    stage: Stage = step["stage"]
    config = dict(step["config"])
    if step["action"] == "resume":
        config["resume"], config["overwrite"] = True, False
    else:
        config["overwrite"], config["resume"] = True, False
    cfg_dir = recipe.run_dir / ".stages"
    cfg_path = cfg_dir / f"{stage.name}.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    cmd = [sys.executable, "-m", "hanlm.pipeline.cli", *stage.command.split(), str(cfg_path)]
    log(f"\n=== [{stage.name}] hanlm {stage.command} ({step['why']})")
    started = time.time()
    proc = subprocess.Popen(cmd)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "seconds": round(time.time() - started, 1),
        "peak_memory_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
    }


def run(cfg: RunConfig) -> int:
    recipe = load_recipe(cfg.recipe, cfg.run_dir)
    recipe.report_to = list(cfg.report_to)
    steps = plan(recipe, cfg)
    print(f"recipe {recipe.name} ({recipe.path}) -> {recipe.run_dir}")
    width = max(len(s["stage"].name) for s in steps)
    cwidth = max(len(s["stage"].command) for s in steps)
    for s in steps:
        stage, command = s["stage"].name, s["stage"].command
        print(f"  {stage:<{width}}  {command:<{cwidth}}  {s['action']:<7} {s['why']}")
    if cfg.dry_run:
        return 0
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    console.attach(recipe.run_dir)  # the libraries' warnings while the report is written
    state = _read_state(recipe)
    state_path = recipe.run_dir / STATE_FILE
    failed = None
    started = time.time()
    for step in steps:
        name = step["stage"].name
        if step["action"] in ("skip", "missing"):
            continue
        # Record the fingerprint before running, so an interrupted stage can be resumed.
        state[name] = {
            **state.get(name, {}),
            "fingerprint": step["fingerprint"],
            "status": "running",
        }
        atomic_write_json(state_path, state)
        result = _run_stage(recipe, step, print)
        ok = result["returncode"] == 0
        state[name].update(
            result, status="complete" if ok else "failed", command=step["stage"].command
        )
        atomic_write_json(state_path, state)
        if not ok:
            failed = name
            break
    if cfg.report:
        paths = write_report(recipe, state)
        print(f"report: {paths[0]}")
    if failed:
        print(
            f"hanlm run: stage '{failed}' failed; completed stages are kept. Fix it and run again.",
            file=sys.stderr,
        )
        return 1
    print(f"hanlm run: {recipe.name} done in {time.time() - started:.1f}s")
    return 0
