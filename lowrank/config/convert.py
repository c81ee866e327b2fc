"""Mapping to dataclass: every value checked against its annotation, every error naming the dotted key.

So a typo in params.yaml, a `-S` override or a `compress_` keyword fails before any work starts. A dataclass
may name keys that moved elsewhere in a `MOVED: ClassVar[dict[str, str]]` (old key -> where it went); such a
key fails with that hint instead of the list of known keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Sequence

from lowrank.config.base import ConfigError, check


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the precise one
            return _convert(value, options[0], key)
        for option in options:
            try:
                return _convert(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        check(value in args, key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, Sequence):
        check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return build(tp, value, key)
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-5` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def build(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build the dataclass `cls` from a mapping, rejecting unknown keys by name."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    where = f"{prefix}." if prefix else ""
    moved = getattr(cls, "MOVED", {})
    for key in unknown:
        if key in moved:
            raise ConfigError(f"{where}{key} moved: {moved[key]}")
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {name: _convert(value, hints[name], f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(where) or not prefix else f"{where}{message}") from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None
