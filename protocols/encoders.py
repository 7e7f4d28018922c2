"""Message dataclasses to msgpack-ready maps: straight-line code generated once per class.

`to_map` is what `protocols.messages.encode` packs; `encoder(cls, finite=True)` also
refuses NaN and Inf floats.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from protocols import wire
from protocols.errors import EncodeError
from protocols.field_specs import Source, Spec, fields_of, omits_defaults


def _nonfinite() -> EncodeError:
    return EncodeError("NaN or Inf in a message field")


def _as_float(value: object) -> object:
    """An int as the float it decodes to (so encode(decode(b)) == b); anything else as is."""
    return float(value) if type(value) is int else value


def _gen_finite(src: Source, spec: Spec, v: str, ind: int) -> None:
    """Emit code raising EncodeError if `v` (of type `spec`) holds a NaN or Inf float."""
    kind = spec[0]
    if kind in ("float", "scalar"):
        src.emit(ind, f"if type({v}) is float and not _isfinite({v}): raise _nonfinite()")
    elif kind == "opt":
        _gen_finite(src, spec[1], v, ind)
    elif kind in ("tuple", "dict") and spec[1][0] in ("float", "scalar", "opt"):
        item = src.var()
        src.emit(ind, f"for {item} in {v}{'.values()' if kind == 'dict' else ''}:")
        _gen_finite(src, spec[1], item, ind + 1)


def _gen_value(src: Source, spec: Spec, v: str, finite: bool) -> str:
    """An expression for the map form of `v`, a value of type `spec`."""
    kind = spec[0]
    if kind == "float":  # (an int would decode as a float: re-encoded, other bytes)
        return f"({v} if type({v}) is float else {src.ref(_as_float)}({v}))"
    if kind in ("bytes", "binary"):
        return f"{src.ref(wire.big)}({v})"
    if kind == "cls":
        return f"{src.ref(to_map_finite if finite else to_map)}({v})"
    if kind == "opt" and spec[1][0] in ("bytes", "binary", "cls", "tuple", "dict", "float"):
        return f"None if {v} is None else {_gen_value(src, spec[1], v, finite)}"
    if kind in ("tuple", "dict") and spec[1][0] in ("bytes", "binary", "cls", "opt"):
        item, key = src.var(), src.var()
        inner = _gen_value(src, spec[1], item, finite)
        if kind == "tuple":
            return f"[{inner} for {item} in {v}]"
        return f"{{{key}: {inner} for {key}, {item} in {v}.items()}}"
    return v  # tuples of scalars pack as arrays, dicts of scalars as maps: no copies


def encoder(
    cls: type, head: dict[str, Any] | None = None, *, finite: bool = False
) -> Callable[[Any], dict[str, Any]]:
    """Compile `to_map` for `cls`, with `head` items first; `finite` refuses NaN and Inf."""
    src = Source()
    src.names.update(_isfinite=math.isfinite, _nonfinite=_nonfinite)
    src.emit(0, "def encode(o):")
    items = [f"{key!r}: {src.ref(value)}" for key, value in (head or {}).items()]
    omitting = omits_defaults(cls)
    # (field name, its variable, map value, the default it is left out at or None), in order
    entries: list[tuple[str, str, str, str | None]] = []
    for i, (field, spec) in enumerate(fields_of(cls)):
        v = f"a{i}"
        src.emit(1, f"{v} = o.{field.name}")
        if finite:
            _gen_finite(src, spec, v, 1)
        default = None
        if omitting and field.default is not dataclasses.MISSING:
            default = src.ref(field.default)
        if spec[0] == "binary" and default is None:  # wire.big, inline for the common case
            w, big = src.var(), src.ref(wire.big)
            src.emit(1, f"if type({v}) is memoryview and {v}.nbytes >= {wire.BIG_BINARY}:")
            src.emit(2, f"if not {v}.c_contiguous: {big}({v})  # raises")
            src.emit(2, f"{w} = {src.ref(object.__new__)}({src.ref(wire.BigBinary)})")
            src.emit(2, f"{w}.view = {v}")
            src.emit(2, f"{v} = {w}")
            src.emit(1, f"else: {v} = {big}({v})")
            entries.append((field.name, v, v, None))
        else:
            entries.append((field.name, v, _gen_value(src, spec, v, finite), default))
    # One dict display up to the first field that may be left out, then stores in order.
    lead = next((n for n, entry in enumerate(entries) if entry[3] is not None), len(entries))
    items += [f"{name!r}: {value}" for name, _, value, _ in entries[:lead]]
    if lead == len(entries):
        src.emit(1, f"return {{{', '.join(items)}}}")
    else:
        src.emit(1, f"m = {{{', '.join(items)}}}")
        for name, v, value, default in entries[lead:]:
            store = f"m[{name!r}] = {value}"
            src.emit(1, store if default is None else f"if {v} is not {default}: {store}")
        src.emit(1, "return m")
    fn: Callable[[Any], dict[str, Any]] = src.build("encode", f"{cls.__qualname__}.<encoder>")
    return fn


_ENCODERS: dict[type, Callable[[Any], dict[str, Any]]] = {}
_FINITE_ENCODERS: dict[type, Callable[[Any], dict[str, Any]]] = {}


def to_map(obj: object) -> dict[str, Any]:
    """The map form of a message dataclass: field order kept, nested dataclasses as maps."""
    try:
        enc = _ENCODERS[type(obj)]
    except KeyError:
        enc = _ENCODERS[type(obj)] = encoder(type(obj))
    return enc(obj)


def to_map_finite(obj: object) -> dict[str, Any]:
    """`to_map` that raises EncodeError for a NaN or Inf float anywhere in `obj`."""
    try:
        enc = _FINITE_ENCODERS[type(obj)]
    except KeyError:
        enc = _FINITE_ENCODERS[type(obj)] = encoder(type(obj), finite=True)
    return enc(obj)


def finite(value: float) -> bool:
    """True when `value` is neither NaN nor infinite."""
    return math.isfinite(value)
