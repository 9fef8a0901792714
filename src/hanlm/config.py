"""Typed configs: YAML files plus dotted command-line overrides, checked before anything is built.

Each stage's config is a dataclass composed of the small shared parts below. Every field carries
a one-line help text in its metadata; `describe()` turns that into `hanlm <command> --help`.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

_MISSING = dataclasses.MISSING


# Chat template names, for every stage that takes one (the table lives in data/templates.py).
TemplateName = Literal["auto", "chatml", "llama2", "llama3", "alpaca"]
# Experiment trackers (`train.report_to`), with the module each needs and its pip package.
Tracker = Literal["none", "tensorboard", "wandb", "swanlab", "mlflow"]
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "swanlab": ("swanlab", "swanlab"),
    "mlflow": ("mlflow", "mlflow"),
}


class InputError(ValueError):
    """Bad input from the user (a config, a data file, a model directory): the message names the
    file, line, record or key and what to do. The command line prints it without a traceback,
    and a run that fails with it removes the output directory it had just created."""


class ConfigError(InputError):
    """A config that cannot be used; the message names the key and what is allowed."""


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's content, or a `ConfigError` naming the file and what is wrong with it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; give the path of a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not valid UTF-8 ({e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{what} {p} cannot be read ({e.strerror or e})") from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a {what}") from None
    _check_shape(value, p, set(), [100_000])
    return value


def _check_shape(value: Any, path: Path, ancestors: set[int], budget: list[int]) -> None:
    """Refuse what YAML aliases can build and no config needs: a section that contains itself,
    nesting hundreds deep, or aliases that expand to a huge tree (a "billion laughs")."""
    if not isinstance(value, (dict, list)):
        return
    if id(value) in ancestors:
        raise ConfigError(
            f"{path}: a section contains itself (a YAML alias used inside its anchor)"
        )
    budget[0] -= 1
    if budget[0] < 0 or len(ancestors) > 100:
        raise ConfigError(f"{path}: nested too deeply, or YAML aliases expand it beyond reason")
    ancestors.add(id(value))
    for item in value.values() if isinstance(value, dict) else value:
        _check_shape(item, path, ancestors, budget)
    ancestors.discard(id(value))


def opt(default: Any = _MISSING, help: str = "", **kw: Any) -> Any:
    """A config field with a help line; mutable defaults are copied per instance."""
    meta = {"help": help}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta, **kw)
    if default is _MISSING:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# --------------------------------------------------------------------------- shared parts


@dataclass
class RopeConfig:
    """Longer context than the model was trained at, by rescaling its rotary positions (applied
    at load, saved in the output's config.json so it loads the same way)."""

    type: Literal["none", "linear", "dynamic", "yarn", "llama3"] = opt(
        "none",
        "none; linear = position interpolation (Chen et al.); dynamic = NTK-aware, grows with the"
        " length; yarn (Peng et al.); llama3",
    )
    factor: float = opt(1.0, "how many times the trained context the model should handle")
    original_max_position_embeddings: int = opt(
        0, "the context the model was trained at (0 = its max_position_embeddings)"
    )
    low_freq_factor: float = opt(1.0, "llama3 only")
    high_freq_factor: float = opt(4.0, "llama3 only")

    def validate(self) -> None:
        if self.type != "none" and self.factor < 1:
            raise ConfigError(f"model.rope.factor={self.factor}: must be >= 1 (the context grows)")


@dataclass
class ModelConfig:
    path: str = opt("", "model: a Hugging Face directory, a .gguf file, or a hub id (online)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "weights dtype: auto = bf16 on a GPU that supports it, fp32 on CPU"
    )
    trust_remote_code: bool = opt(False, "allow custom modelling code from the model directory")
    rope: RopeConfig = opt(RopeConfig, "RoPE scaling for a longer context (none by default)")


@dataclass
class InferenceModelConfig(ModelConfig):
    """A model loaded to answer, not to train: it may be quantized."""

    quantize: Literal["none", "int8", "int4"] = opt(
        "none",
        "weight-only quantization of the linear layers (not lm_head): int8 (torchao), int4"
        " (optimum-quanto, groups of 128); inference only",
    )


@dataclass
class DataConfig:
    paths: list[str] = opt([], "data files, directories, globs, saved datasets dirs or hub ids")
    format: Literal[
        "auto", "text", "alpaca", "sharegpt", "messages", "preference", "ranked", "unpaired"
    ] = opt("auto", "record format; auto detects it from the first record's keys")
    weights: list[float] = opt([], "per-path mixing weight (fraction of records kept; >1 repeats)")
    valid_paths: list[str] = opt(
        [], "explicit validation data (otherwise split off the train data)"
    )
    valid_fraction: float = opt(0.0, "fraction of records held out for validation (0 = none)")
    seed: int = opt(0, "seed for mixing and the train/validation split")
    on_bad_record: Literal["error", "skip"] = opt(
        "error", "error: stop at the first bad record; skip: skip, count and report them"
    )
    text_field: str = opt("text", "field holding the text for the text format")
    txt_unit: Literal["line", "paragraph", "file"] = opt(
        "paragraph", "what one record of a .txt file is"
    )
    normalize: Literal["none", "nfc", "nfkc"] = opt(
        "nfc", "Unicode normalisation of text (nfkc also turns full-width '，' into ',')"
    )
    clean: bool = opt(True, "remove control characters and tidy whitespace in text records")
    min_chars: int = opt(1, "drop text records shorter than this (counted)")
    dedup: Literal["none", "exact", "normalized"] = opt(
        "normalized", "drop duplicate text records: exact, or after removing case/space/punct."
    )
    max_records: int = opt(0, "read at most this many records per path (0 = all)")


@dataclass
class TrainConfig:
    max_steps: int = opt(100, "optimiser steps (takes precedence over epochs when > 0)")
    epochs: float = opt(1.0, "epochs when max_steps is 0")
    batch_size: int = opt(8, "per-device batch size")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr: float = opt(1e-3, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_ratio: float = opt(0.05, "fraction of steps for linear warm-up")
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate schedule")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    seed: int = opt(42, "seed for initialisation, dropout and data order")
    logging_steps: int = opt(10, "write training metrics every N steps")
    eval_steps: int = opt(50, "validate every N steps (0 = only at the end)")
    save_steps: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    save_total_limit: int = opt(2, "keep at most this many checkpoints")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "auto = bf16 on a GPU that supports it, fp32 on CPU"
    )
    gradient_checkpointing: bool = opt(
        False,
        "recompute activations in the backward pass instead of keeping them: less memory, about"
        " a third more compute per step (trl's trainers turn it on by default; hanlm only when"
        " asked, in every stage alike)",
    )
    batching: Literal["auto", "random", "grouped", "padding_free"] = opt(
        "auto",
        "random (padded to the longest), grouped (similar lengths: sft, dpo, orpo, simpo, reward,"
        " distill), padding_free (sft: one sequence, positions restart per conversation); auto ="
        " padding_free where offered on CUDA with flash-attn, else grouped where offered, else"
        " random. Same per-example losses",
    )
    deepspeed: str = opt(
        "",
        "DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); launch with torchrun;"
        ' "auto" values are filled from these settings',
    )
    report_to: list[Tracker] = opt(
        [],
        "experiment trackers that receive the training metrics: tensorboard (event files in"
        " OUTPUT_DIR/tensorboard), wandb, swanlab, mlflow; one name or a list; none (or [])"
        " = only metrics.jsonl",
    )

    def validate(self) -> None:
        if self.deepspeed:
            deepspeed_config(self.deepspeed)
        check_trackers(self.report_to)


def trackers(train: TrainConfig) -> list[str]:
    """The trackers `train.report_to` names ("none" left out)."""
    return [t for t in dict.fromkeys(train.report_to) if t != "none"]


def check_trackers(names: list[str]) -> None:
    """Refuse "none" beside a tracker, and a tracker whose package is not installed (named with
    the pip command), before anything loads."""
    import importlib.util

    if "none" in names and len(set(names)) > 1:
        raise ConfigError(f"train.report_to={names}: 'none' cannot be combined with a tracker")
    for name in names:
        if name == "none":
            continue
        module, package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.report_to={name} needs the {package} package, which is not installed:"
                f" pip install {package}"
            )


def zero_stage(train: TrainConfig) -> int | None:
    """The ZeRO stage of `train.deepspeed` (None without DeepSpeed)."""
    if not train.deepspeed:
        return None
    return deepspeed_config(train.deepspeed).get("zero_optimization", {}).get("stage", 0)


def deepspeed_config(path: str) -> dict[str, Any]:
    """Read and check a `train.deepspeed` JSON file (and that DeepSpeed is installed), before
    anything loads; errors name the file and the fix."""
    import importlib.util
    import json

    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"train.deepspeed={path}: no such file (configs/deepspeed/ has zero2.json,"
            " zero3.json and zero3_offload.json)"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"train.deepspeed={path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"train.deepspeed={path}: expected a JSON object, got {type(data).__name__}"
        )
    stage = data.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed={path}: zero_optimization.stage={stage!r}, not 0-3")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"train.deepspeed={path} needs DeepSpeed: pip install 'hanlm[deepspeed]' (on a machine"
            " without CUDA: DS_BUILD_OPS=0 pip install 'hanlm[deepspeed]')"
        )
    return data


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "train LoRA adapters instead of all weights")
    r: int = opt(8, "LoRA rank")
    alpha: int = opt(16, "LoRA alpha (scale = alpha / r)")
    dropout: float = opt(0.05, "dropout on the LoRA path")
    targets: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get adapters",
    )
    modules_to_save: list[str] = opt([], "modules trained in full beside the adapters")
    merge: bool = opt(True, "merge the adapters into the saved model")
    keep_adapter: bool = opt(False, "also save the adapter directory beside the merged model")


@dataclass
class OutputConfig:
    """Stage configs inherit this, so `output_dir=`, `overwrite=` and `resume=` are top-level."""

    output_dir: str = opt("", "where the run writes its model, hanlm.json and metrics.jsonl")
    overwrite: bool = opt(False, "replace a non-empty output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if origin is dict:
        k, v = get_args(tp)
        return f"dict[{_type_name(k)}, {_type_name(v)}]"
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting the few safe cases."""
    origin = get_origin(tp)
    bad = ConfigError(
        f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"config key '{key}': {value!r} is not allowed; choose one of "
                + ", ".join(repr(c) for c in choices)
            )
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `paths=a.jsonl` on the command line means a one-item list
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if isinstance(value, tp):
        return value
    raise bad


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {prefix}{key!r} is not a name (e.g. train.lr)")
        if key not in fields:
            valid = list(fields)
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{_suggest(key, valid, prefix)} "
                f"(valid keys here: {', '.join(valid)})"
            )
        f = fields[key]
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            # A section given in part keeps the field's own defaults for the rest.
            if f.default_factory is not _MISSING:
                value = _merge(dataclasses.asdict(f.default_factory()), value)
            elif dataclasses.is_dataclass(f.default):
                value = _merge(dataclasses.asdict(f.default), value)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    for name, f in fields.items():
        if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"config key '{prefix}{name}' is required: {f.metadata.get('help')}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (for suggestions and --help)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(all_keys(tp, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def parse_value(raw: str) -> Any:
    """A command-line value read as YAML (`3`, `[1,2]`, `true`), or the text itself if not YAML."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', value), the value read as YAML so `x=3`, `x=[1,2]` work."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key, parse_value(raw)


def _set_dotted(data: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value
    valid = all_keys(cls)
    sections = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    if key not in valid and key not in sections:
        raise ConfigError(f"unknown config key '{key}'{_suggest(key, valid)}")


def _rename(cls: type, key: str, where: str = "") -> str:
    """The current name of a renamed key (`cls.RENAMED`: old -> new), said once on stderr; old
    names keep working for one release."""
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    new = renamed.get(key)
    if new is None:
        return key
    print(
        f"[hanlm] deprecated: {where}config key '{key}' is now '{new}'; the old name stops"
        " working in the next release",
        file=sys.stderr,
    )
    return new


def _has_dotted(data: dict[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _check_unused(cls: type, data: dict[str, Any]) -> None:
    """A key the command accepts in its shared sections but does not use is an error when set
    to anything but its default, not silently ignored (`cls.UNUSED`: dotted key -> why). (A
    resolved config written out whole, as the recipe runner does, carries the default.)"""
    unused = getattr(cls, "UNUSED", {})
    if not unused:
        return
    defaults = cls()
    for key, why in unused.items():
        if not _has_dotted(data, key):
            continue
        node: Any = data
        default: Any = defaults
        for part in key.split("."):
            node, default = node[part], getattr(default, part)
        if node != default:
            raise ConfigError(f"config key '{key}' is not used by this command: {why}")


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str | tuple[str, Any]] | None = None,
) -> T:
    """Build `cls` from an optional YAML file and `key.sub=value` overrides (applied last).

    An override is a `key=value` string (the value read as YAML) or a ready `(key, value)` pair.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: expected a mapping of config keys, got {type(loaded).__name__}"
            )
        data = {_rename(cls, k, f"{p}: "): v for k, v in loaded.items()}
    for item in overrides or []:
        key, value = parse_override(item) if isinstance(item, str) else item
        _set_dotted(data, _rename(cls, key), value, cls)
    try:
        _check_unused(cls, data)
        return _build(cls, data)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field, nested sections flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
