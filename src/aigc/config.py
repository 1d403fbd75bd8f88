"""Configs: dataclasses, TOML presets shipped with the package, dotted overrides.

Resolution order (minGPT `merge_from_args`, litgpt `args.py`): dataclass defaults -> preset file
(`presets/<family>/<name>.toml`) -> `--set section.key=value` overrides. Every step is strict:
an unknown key is an error listing the valid keys, a value of the wrong type names the expected
type. The resolved config is saved as JSON into every output directory and is enough to rebuild
what was made (see `to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from aigc.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

T = TypeVar("T")

PRESET_PACKAGE = "aigc.presets"


# ----------------------------------------------------------------------------- type handling


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) `value` against the annotation `tp`; raise ConfigError if wrong."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {_type_name(tp)} ({len(args)} items), got {value!r}")
            return tuple(
                _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of {tp.__name__} settings, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


# ----------------------------------------------------------------------------- dict <-> dataclass


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, strictly: unknown keys and wrong types are errors."""
    fields = _fields(cls)
    hints = _hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys"
            f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # __post_init__ validation
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass config; tuples become lists."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (for help texts and error messages)."""
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


# ----------------------------------------------------------------------------- overrides


def parse_value(text: str) -> Any:
    """Parse an override's right-hand side as a TOML value; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        low = text.strip().lower()
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no", "off"):
            return False
        if low in ("none", "null"):
            return None
        return text


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["train.lr=3e-4", "--model.n_layer=2"]` -> nested dict `{"train": {"lr": 3e-4}, ...}`."""
    out: dict[str, Any] = {}
    for item in items or []:
        item = item.removeprefix("--")
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
        key, _, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part}")
        node[parts[-1]] = parse_value(raw.strip())
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- presets


def list_presets(family: str) -> list[str]:
    """Names of the presets shipped for a model family (e.g. 'gpt' -> ['base', 'small', 'tiny'])."""
    root = resources.files(PRESET_PACKAGE).joinpath(family)
    if not root.is_dir():
        return []
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def load_preset(family: str, name: str) -> dict[str, Any]:
    """A preset as a dict: a shipped name (`tiny`) or a path to a TOML file."""
    path = Path(name)
    if name.endswith(".toml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file {name} not found")
        text = path.read_text(encoding="utf-8")
    else:
        names = list_presets(family)
        if name not in names:
            raise ConfigError(
                f"unknown preset {name!r} for {family}; valid presets: {', '.join(names) or '(none)'}, "
                "or a path to a .toml file"
            )
        text = resources.files(PRESET_PACKAGE).joinpath(family, f"{name}.toml").read_text(encoding="utf-8")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {name}: invalid TOML: {e}") from None


def resolve(
    cls: type[T],
    family: str | None = None,
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """defaults -> `base` dict -> preset -> overrides, strictly validated into `cls`."""
    data: dict[str, Any] = dict(base or {})
    if preset is not None:
        if family is None:
            raise ValueError("a preset needs a family")
        data = merge(data, load_preset(family, preset))
    if overrides:
        data = merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as JSON (atomically)."""
    from aigc.utils.io import atomic_write_json

    return atomic_write_json(path, to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def load_config(cls: type[T], path: str | Path) -> T:
    with open(path, encoding="utf-8") as f:
        return from_dict(cls, json.load(f))


def diff(a: Any, b: Any) -> list[str]:
    """Human-readable differences between two configs (dataclasses or dicts): `key: old -> new`."""
    da = to_dict(a) if dataclasses.is_dataclass(a) else a
    db = to_dict(b) if dataclasses.is_dataclass(b) else b

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    fa, fb = flat(da), flat(db)
    return [
        f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)
    ]


__all__ = [
    "ConfigError",
    "diff",
    "from_dict",
    "list_presets",
    "load_config",
    "load_preset",
    "merge",
    "parse_overrides",
    "parse_value",
    "resolve",
    "save_config",
    "to_dict",
    "valid_keys",
]
