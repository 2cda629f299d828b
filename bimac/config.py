"""Typed configs: dataclasses loaded from YAML, with ``key=value`` overrides from the command line.

Every experiment config is a tree of dataclasses. ``load_config(Cls, "configs/x.yaml", ["a.b=3"])``
reads the YAML (following an optional ``_base_: other.yaml`` chain, paths relative to the file;
a section typed as a dataclass may also be a path to its own YAML file, or
``{_base_: path.yaml, key: value}``),
applies the dotted overrides, and builds ``Cls`` strictly: an unknown key or a value of the wrong
type is a one-line :class:`ConfigError` that names the key and what it accepts, raised before any
model or data is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be built; the message names the key and the fix."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float)."""
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
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {k: _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping; unknown keys and wrong types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key {prefix}{missing[0]}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable mapping of a config (paths become strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def config_hash(cfg: Any) -> str:
    """Stable SHA-256 of a config, recorded in checkpoints to detect a changed config on resume."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def _read_yaml(path: Path, cls: type | None = None, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"_base_ cycle through {path}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = _expand_sections(data, cls, path.parent)
    base = data.pop("_base_", None)
    if base is None:
        return data
    return merge(_read_yaml(path.parent / base, cls, (*seen, path)), data)


def _expand_sections(data: dict[str, Any], cls: type | None, folder: Path) -> dict[str, Any]:
    """A dataclass-typed section given as ``path.yaml`` or ``{_base_: path.yaml, key: value}``
    is read from that file (relative to ``folder``), so experiments share data/model files."""
    if cls is None or not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for name, value in data.items():
        section_cls = hints.get(name)
        if not (isinstance(section_cls, type) and dataclasses.is_dataclass(section_cls)):
            continue
        if isinstance(value, str):
            value = {"_base_": value}
        if isinstance(value, dict) and "_base_" in value:
            value = dict(value)
            file = folder / value.pop("_base_")
            out[name] = merge(
                _read_yaml(file, section_cls), _expand_sections(value, section_cls, folder)
            )
        elif isinstance(value, dict):
            out[name] = _expand_sections(value, section_cls, folder)
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1,2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}``; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_value(raw)
    return tree


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _parse_value(raw: str) -> Any:
    """YAML scalar, except that ``1e-3`` is a float (YAML 1.1 reads it as a string)."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        return float(value)
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """YAML file (optional) + dotted overrides -> a validated ``cls`` instance."""
    data = _read_yaml(Path(path), cls) if path else {}
    return from_dict(cls, merge(data, parse_overrides(list(overrides))))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
