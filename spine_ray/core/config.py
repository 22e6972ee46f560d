"""Typed configs: frozen dataclasses loaded from YAML, overridable from the CLI, saved next to outputs.

`load(Cls, path, overrides)` builds a nested frozen dataclass from a YAML mapping, rejecting unknown
keys and values of the wrong type. Overrides are `dotted.key=value` strings whose value is parsed
as YAML and then checked against the field's declared type, exactly like a value from the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from spine_ray.core.storage import atomic_write_text, read_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(kt, k, where): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {unknown} (known: {sorted(fields)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    except ValueError as e:  # __post_init__ validation
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    return obj


def from_dict(cls: type[T], data: dict) -> T:
    """Build a config dataclass from a plain mapping, validating keys and types."""
    return _build(cls, data or {}, "")


def to_dict(cfg: Any) -> dict:
    """A config as plain YAML-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a', 'b', 'c'], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=0.001")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.strip().split("."), value


def set_in(data: dict, keys: list[str], value: Any) -> None:
    """Set a dotted key in nested mappings; a numeric key indexes a list (`grade.0.train.lr`)."""
    node: Any = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"override {'.'.join(keys)}: {where} is not an item of a list of {len(node)}")
            k = int(k)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[:i])} is not a section")
        if last:
            node[k] = value
            return
        child = node[k] if isinstance(node, list) else node.get(k)
        if child is None:
            child = node[k] = {}
        node = child


def _merge(base: Any, top: Any) -> Any:
    """Deep-merge mappings (top wins); anything else in top replaces base."""
    if isinstance(base, dict) and isinstance(top, dict):
        return {**base, **{k: _merge(base.get(k), v) if k in base else v for k, v in top.items()}}
    return top


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load a config from YAML (or defaults when path is None) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        try:
            text = read_text(str(path))
        except FileNotFoundError:
            raise ConfigError(f"config {path}: file not found") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: top level must be a mapping")
    if overrides:
        # Overrides apply on top of defaults ← file, so they can reach defaults the file omits.
        try:
            data = _merge(to_dict(cls()), data)
        except TypeError:  # a config class without defaults for every field
            pass
    for o in overrides:
        keys, value = parse_override(o)
        set_in(data, keys, value)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"config {path or '(defaults)'}: {e}") from None


def save(cfg: Any, dest: str) -> None:
    """Write a config as YAML next to the output it produced (atomically)."""
    atomic_write_text(dest, yaml.safe_dump(to_dict(cfg), sort_keys=False))
