"""Reading configs: YAML files and dotted command-line overrides into the typed dataclasses of
`hanlm.config.parts`, with unknown keys, wrong types and unused keys refused by name."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from hanlm.config.parts import MISSING, ConfigError

T = TypeVar("T")


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
            if f.default_factory is not MISSING:
                value = _merge(dataclasses.asdict(f.default_factory()), value)
            elif dataclasses.is_dataclass(f.default):
                value = _merge(dataclasses.asdict(f.default), value)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    for name, f in fields.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
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
        if f.default is not MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
