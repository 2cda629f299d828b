"""Typed configs: dataclasses loaded from YAML, with ``key=value`` overrides from the command line.

Every experiment config is a tree of dataclasses. ``load_config(Cls, "configs/x.yaml", ["a.b=3"])``
reads the YAML (following an optional ``_base_: other.yaml`` chain, paths relative to the file;
a section typed as a dataclass may also be a path to its own YAML file, or
``{_base_: path.yaml, key: value}``),
applies the dotted overrides, and builds ``Cls`` strictly: an unknown key or a value of the wrong
type is a one-line :class:`ConfigError` that names the key and what it accepts, raised before any
model or data is touched.

Every entry point shares one command-line convention (:func:`config_parser`, :func:`run_main`):
``--config FILE``, ``key=value`` overrides, ``--help`` that lists every key of the config
dataclass with its type, default and source comment, and a user mistake (:class:`ConfigError`)
printed as one line on stderr with a non-zero exit; ``--debug`` or ``BIMAC_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import hashlib
import inspect
import io
import json
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class UserError(Exception):
    """Something the user fixes (a mistake, a full disk, a directory another run holds): its
    message names the file or key and the fix, and entry points print it as one line."""


class ConfigError(UserError, ValueError):
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
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        guess = f"; did you mean {prefix}{close[0]}?" if close else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: "
            f"{', '.join(sorted(fields))}{guess}"
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
        what = "a directory, not a config file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; the shipped configs are in configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
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
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override value {raw!r} is not valid YAML; quote it") from err
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        return float(value)
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """YAML file (optional) + dotted overrides -> a validated ``cls`` instance."""
    data = _read_yaml(Path(path), cls) if path else {}
    return from_dict(cls, merge(data, parse_overrides(list(overrides))))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# -- the command line of every entry point ---------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the dataclass source (the ``#`` lines just above the field,
    then the one at the end of its line), so ``--help`` says what the code says; fields inherited
    from a base dataclass keep the base's comment unless the subclass redefines them."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_field_comments(klass))
    return out


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # a class defined in a REPL or a test's exec
        return {}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, the line holds code too)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            code_before = bool(tok.line[: tok.start[1]].strip())
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), code_before)
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and not comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        trailing = [
            comments[n][0] for n in range(node.lineno, node.end_lineno + 1) if n in comments
        ]
        if text := " ".join(above + trailing).strip():
            out[node.target.id] = text
    return out


def _annotation_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, get_args(tp))) + "}"
    if origin in (Union, types.UnionType):
        names = [_annotation_name(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in get_args(tp) else "")
    if origin is not None:
        return str(tp).replace("typing.", "")
    return _type_name(tp)


def describe_keys(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf key of config dataclass ``cls``: ``key: type = default  comment``."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines += describe_keys(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(to_dict(f.default), ensure_ascii=False)
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(to_dict(f.default_factory()), ensure_ascii=False)
        else:
            default = "(required)"
        line = f"  {prefix}{f.name}: {_annotation_name(tp)} = {default}"
        if f.name in comments:
            line += f"  # {comments[f.name]}"
        lines.append(line)
    return lines


def program(default: str) -> str:
    """The name for usage lines: ``bimac <command> ...`` when the ``bimac`` command runs the entry
    point (it sets ``sys.argv[0]``), else ``default`` (e.g. ``python -m finetune.caption``)."""
    return sys.argv[0] if sys.argv[0].startswith("bimac") and " " in sys.argv[0] else default


class CliParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the fix."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def config_parser(
    cls: type | None,
    prog: str,
    description: str,
    *,
    config_help: str = "experiment YAML",
    config_required: bool = True,
    overrides: bool = True,
) -> CliParser:
    """``--config FILE``, ``--debug`` and ``key=value`` overrides, with ``--help`` listing every
    key of ``cls`` (type, default, comment). ``overrides=False``: the caller takes the
    ``key=value`` / ``--key value`` words from ``parse_known_args``."""
    epilog = None
    if cls is not None:
        epilog = "config keys (set in the YAML or as key=value; defaults of the code):\n"
        epilog += "\n".join(describe_keys(cls))
    p = CliParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=config_required, metavar="FILE", help=config_help)
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error (also BIMAC_DEBUG=1)",
    )
    if overrides:
        p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=20")
    return p


def path_hint(path: str | Path) -> str:
    """What to add to "``path`` does not exist": where a relative path was looked for."""
    if Path(path).is_absolute() or str(path).startswith(("pipe:", "hf-hub:")) or "://" in str(path):
        return ""
    hint = f" (relative paths are read from the working directory {Path.cwd()}"
    if str(path).startswith("runs/demo"):
        hint += "; the tiny configs read the world `make demo` builds: run it, from the repo root"
    return hint + ")"


def run_main(main: Callable[[list[str]], Any], prog: str, argv: list[str] | None = None) -> int:
    """Run an entry point's ``main(argv)`` and return its exit status (``main``'s int, else 0);
    a :class:`UserError` (its message names the file or key and the fix) becomes one line on
    stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = main(argv)
    except UserError as err:
        if "--debug" in argv or os.environ.get("BIMAC_DEBUG", "") not in ("", "0"):
            raise
        print(f"{program(prog)}: error: {err}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def parse_cli(
    cls: type[T],
    prog: str,
    doc: str,
    argv: Sequence[str] | None = None,
    config_help: str = "YAML with any of the keys below",
) -> T:
    """Build config ``cls`` from ``[--config FILE] [--key VALUE | --flag | key=value ...]``.

    The shared convention (:func:`bimac.config.config_parser`: ``--help`` lists every key) plus
    the dashed form of a key: ``--shard-index 3`` is ``shard_index=3``, a bare ``--flag`` is
    ``flag=true``; values are parsed as YAML, as in :func:`bimac.config.load_config`.
    """
    parser = config_parser(
        cls, program(prog), doc, config_help=config_help,
        config_required=False, overrides=False,
    )  # fmt: skip
    known, args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    overrides = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name = arg[2:].replace("-", "_")
            name, eq, value = name.partition("=")
            if not eq:
                nxt = args[i + 1] if i + 1 < len(args) else "--"
                has_value = not nxt.startswith("--") and not _OVERRIDE.match(nxt)
                value = args[i + 1] if has_value else "true"
                i += has_value
            overrides.append(f"{name}={value}")
        else:
            overrides.append(arg)
        i += 1
    return load_config(cls, known.config, overrides)
