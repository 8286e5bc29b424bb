"""Typed configs from YAML: dataclasses, ``yaml.safe_load``, unknown keys and wrong types rejected with the key path.

    recipes/mnist.yaml: distill.temprature: unknown key; did you mean 'temperature'? (allowed: alpha, ...)
    recipes/mnist.yaml: distill.temperature: expected float, got 'high'

Validation that needs more than a type lives in each dataclass's ``__post_init__`` and raises
``FieldError(field, message)``; the loader prefixes the key path and the source.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from edgepkd.errors import ConfigError, first_line
from edgepkd.registry import closest


class FieldError(ValueError):
    """Raised by ``__post_init__`` checks: ``field`` is relative to the dataclass being built."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise FieldError(field, message)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str, source: str) -> Any:
    def fail() -> typing.NoReturn:
        raise ConfigError(f"{source}: {path}: expected {_type_name(tp)}, got {value!r}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(non_none[0], value, path, source)
        for arg in non_none:  # first member that accepts the value
            try:
                return _coerce(arg, value, path, source)
            except ConfigError:
                continue
        fail()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{source}: {path}: {value!r} is not allowed{closest(value, choices)} "
                f"(allowed: {', '.join(map(str, choices))})"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            fail()
        (item_tp,) = typing.get_args(tp)[:1]
        items = [_coerce(item_tp, v, _join(path, i), source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(val_tp, v, _join(path, k), source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path=path, source=source)
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                fail()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    raise TypeError(f"config type {tp!r} at {path} is not supported")  # a bug in edgepkd, not user input


def from_dict(cls: type, data: Any, *, path: str = "", source: str = "<config>"):
    """Build dataclass ``cls`` from plain YAML data, checking every key and type recursively."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {path or '<top level>'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{source}: {_join(path, key)}: unknown key{closest(key, fields)} "
                f"(allowed: {', '.join(fields)})"
            )
    missing = [
        n for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: {_join(path, missing[0])}: required key is missing")
    kwargs = {k: _coerce(hints[k], v, _join(path, k), source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{source}: {_join(path, e.field)}: {e.message}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain data (lists, dicts, scalars) that ``from_dict`` accepts back."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to raw config data, in order."""
    data = dict(data or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key.path=value (e.g. --set distill.temperature=2.0)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            nxt = _child(node, part, key, source)
            if nxt is None:
                nxt = {}
                _assign(node, part, nxt, key)
            elif isinstance(nxt, dict):
                nxt = dict(nxt)
                _assign(node, part, nxt, key)
            elif isinstance(nxt, list):
                nxt = list(nxt)
                _assign(node, part, nxt, key)
            else:
                raise ConfigError(f"{source}: --set {key}: '{'.'.join(parts[:depth + 1])}' is a value, not a section")
            node = nxt
        _assign(node, parts[-1], value, key)
    return data


def _child(node: Any, part: str, key: str, source: str) -> Any:
    if isinstance(node, list):
        idx = _index(node, part, key)
        return node[idx]
    return node.get(part)


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: '{part}' is not an index of a list of {len(node)} items")
    return int(part)


def _assign(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, key)] = value
    else:
        node[part] = value


def load_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` a file; missing files and syntax errors become one-line ConfigErrors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def load_named(cls: type, path: Path):
    """One YAML file -> ``cls`` whose ``name`` must equal the file's stem (export targets, device profiles)."""
    obj = from_dict(cls, load_yaml(path), source=str(path))
    if obj.name != path.stem:
        raise ConfigError(f"{path}: name: '{obj.name}' must match the file name '{path.stem}'")
    return obj


def load_named_dirs(cls: type, kind: str, builtin: Path, local: str, extra_dirs, option: str):
    """Every ``*.yaml`` of the built-in folder, then ``./<local>/`` and ``extra_dirs`` (``option`` names the CLI
    flag in errors) into one ``Registry``; a later file reusing a known name fails."""
    from edgepkd.registry import Registry

    registry = Registry(kind)
    seen: set[Path] = set()
    for folder in map(Path, extra_dirs):
        if not folder.is_dir():
            raise ConfigError(f"{option} {folder}: no such directory")
    for folder in [builtin, Path.cwd() / local, *map(Path, extra_dirs)]:
        if not folder.is_dir() or folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        for path in sorted(folder.glob("*.yaml")):
            obj = load_named(cls, path)
            if obj.name in registry:
                raise ConfigError(f"{path}: {kind} '{obj.name}' is already defined by another file "
                                  "(give yours another name)")
            registry.register(obj.name, obj)
    if not len(registry):
        raise ConfigError(empty_message(f"{kind}s", builtin, [f"./{local}/", *(f"{option} {d}" for d in extra_dirs)],
                                        f"add a YAML file to ./{local}/ (or {option} DIR)"))
    return registry


def empty_message(what: str, builtin: Path, others: list[str], add: str) -> str:
    """One line for a registry of files that came out empty (a broken install: the built-ins are missing)."""
    state = "is missing" if not builtin.is_dir() else "holds no *.yaml"
    elsewhere = f"; none in {' or '.join(others)} either" if others else ""
    return (f"no {what} found: the built-in folder {builtin} {state}{elsewhere}; reinstall edgepkd (its wheel "
            f"carries the built-in {what}), or {add}")
