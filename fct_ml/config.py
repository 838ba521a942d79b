"""Typed, closed configuration: frozen dataclasses built from plain dicts.

Every component of fct_ml takes one frozen dataclass. `from_dict` builds one from a mapping
(JSON, YAML, a Dagster `Config`) and refuses unknown keys and ill-typed values with a one-line
message naming the field, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown or of the wrong type (one-line message naming the key)."""


def _check_value(path: str, annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: expected a mapping for {annotation.__name__}, got {type(value).__name__}"
            )
        return from_dict(annotation, value, _path=path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(path, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {annotation}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{path}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(f"{path}[{i}]", args[0], v) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(
            _check_value(f"{path}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value))
        )
    if annotation is float:
        # An int is a fine float (lr: 1 means 1.0); a bool is not.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation in (bool, str):
        if not isinstance(value, annotation):
            raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {annotation!r}")  # a bug in a config class


def from_dict(cls: type[T], data: dict[str, Any], _path: str = "") -> T:
    """Build the frozen dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    prefix = f"{_path}." if _path else ""
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key for {cls.__name__} (known:"
            f" {', '.join(sorted(names))})"
        )
    kwargs = {k: _check_value(prefix + k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{_path or cls.__name__}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved configuration as plain JSON-able data (for provenance)."""
    return dataclasses.asdict(config)


def replace(config: T, **changes: Any) -> T:
    """`dataclasses.replace` with the same checks as `from_dict`, nested keys as `a__b=...`."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition("__")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        if not hasattr(config, head):
            raise ConfigError(f"{head}: unknown key for {type(config).__name__}")
        flat[head] = replace(getattr(config, head), **sub)
    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    unknown = sorted(set(flat) - set(data))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key for {type(config).__name__}")
    data.update(flat)
    return from_dict(type(config), data)
