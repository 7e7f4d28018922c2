"""Turn frozen message dataclasses into msgpack-ready maps and back, checking every field.

A dataclass field may be typed as: ``str``, ``int``, ``float``, ``bool``, ``bytes``,
`Binary` (a large binary, decoded as a zero-copy view), `Scalar`, ``X | None``,
``tuple[X, ...]``, ``dict[str, X]`` or another such dataclass. Decoding ignores unknown
keys (minor versions add fields, always with defaults) and raises `DecodeError` naming the
field for anything missing or of the wrong type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from protocols import wire
from protocols.errors import DecodeError

Binary = bytes | memoryview
Scalar = str | int | float | bool

T = TypeVar("T")
_Check = Callable[[Any, str], Any]


def _fail(path: str, expected: str, value: object) -> DecodeError:
    return DecodeError(
        f"field {path!r} should be {expected}, got {type(value).__name__}", reason="bad_field"
    )


def _scalar(kind: type) -> _Check:
    def check(value: Any, path: str) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not kind:
            raise _fail(path, kind.__name__, value)
        return value

    return check


def _binary(value: Any, path: str) -> Any:
    if isinstance(value, bytes | memoryview):
        return value
    raise _fail(path, "binary", value)


def _bytes(value: Any, path: str) -> Any:
    if isinstance(value, bytes):
        return value
    if isinstance(value, memoryview):
        return value.tobytes()
    raise _fail(path, "binary", value)


def _any_scalar(value: Any, path: str) -> Any:
    if isinstance(value, str | int | float | bool):
        return value
    raise _fail(path, "str, int, float or bool", value)


def _optional(inner: _Check) -> _Check:
    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

    return check


def _tuple(inner: _Check) -> _Check:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, list | tuple):
            raise _fail(path, "an array", value)
        return tuple(inner(item, f"{path}[{i}]") for i, item in enumerate(value))

    return check


def _mapping(inner: _Check) -> _Check:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _fail(path, "a map", value)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(path, "a map with string keys", key)
            out[key] = inner(item, f"{path}.{key}")
        return out

    return check


def _nested(cls: type) -> _Check:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _fail(path, "a map", value)
        return from_map(cls, value, path)

    return check


def _checker(hint: Any) -> _Check:
    if hint == Binary:
        return _binary
    if hint == Scalar:
        return _any_scalar
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
        return _optional(_checker(inner))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _tuple(_checker(args[0]))
    if origin is dict and args and args[0] is str:
        return _mapping(_checker(args[1]))
    if hint is bytes:
        return _bytes
    if hint in (str, int, float, bool):
        return _scalar(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _nested(hint)
    raise TypeError(f"unsupported field type {hint!r}")


_PLANS: dict[type, list[tuple[str, _Check, bool]]] = {}


def _plan(cls: type) -> list[tuple[str, _Check, bool]]:
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = []
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            required = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            plan.append((field.name, _checker(hints[field.name]), required))
        _PLANS[cls] = plan
    return plan


def from_map(cls: type[T], fields: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a decoded map, or raise DecodeError naming the bad field."""
    kwargs: dict[str, Any] = {}
    for name, check, required in _plan(cls):
        full = f"{path}.{name}" if path else name
        if name not in fields:
            if required:
                raise DecodeError(f"missing field {full!r}", reason="missing_field")
            continue
        kwargs[name] = check(fields[name], full)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise DecodeError(f"invalid {cls.__name__}: {exc}", reason="bad_field") from exc


_NAMES: dict[type, tuple[str, ...]] = {}
_SIMPLE = (str, int, float, bool, type(None))


def to_map(obj: object) -> dict[str, Any]:
    """The map form of a message dataclass: field order kept, nested dataclasses as maps."""
    cls = type(obj)
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(obj))  # type: ignore[arg-type]
    return {name: _plain(getattr(obj, name)) for name in names}


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind in _SIMPLE:
        return value
    if kind is memoryview or kind is bytes or kind is bytearray:
        return wire.big(value)
    if kind is tuple or kind is list:
        return [_plain(v) for v in value]
    if kind is dict:
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return to_map(value)
    return value


def finite(value: float) -> bool:
    """True when `value` is neither NaN nor infinite."""
    return math.isfinite(value)
