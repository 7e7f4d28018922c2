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
    if kind in ("bytes", "binary"):
        return f"{src.ref(wire.big)}({v})"
    if kind == "cls":
        return f"{src.ref(to_map_finite if finite else to_map)}({v})"
    if kind == "opt" and spec[1][0] in ("bytes", "binary", "cls", "tuple", "dict"):
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
    optional: list[tuple[str, str, str]] = []  # (name, variable, map value) left out at default
    for i, (field, spec) in enumerate(fields_of(cls)):
        v = f"a{i}"
        src.emit(1, f"{v} = o.{field.name}")
        if finite:
            _gen_finite(src, spec, v, 1)
        if omitting and field.default is not dataclasses.MISSING:
            optional.append((field.name, v, _gen_value(src, spec, v, finite)))
            continue
        if optional:  # (dataclasses put defaults last, keyword-only fields aside)
            raise TypeError(f"{cls.__name__}: a required field after an optional one")
        if spec[0] == "binary":  # wire.big, inline for the common case: a large view
            w, big = src.var(), src.ref(wire.big)
            src.emit(1, f"if type({v}) is memoryview and {v}.nbytes >= {wire.BIG_BINARY}:")
            src.emit(2, f"if not {v}.c_contiguous: {big}({v})  # raises")
            src.emit(2, f"{w} = {src.ref(object.__new__)}({src.ref(wire.BigBinary)})")
            src.emit(2, f"{w}.view = {v}")
            src.emit(2, f"{v} = {w}")
            src.emit(1, f"else: {v} = {big}({v})")
            items.append(f"{field.name!r}: {v}")
            continue
        items.append(f"{field.name!r}: {_gen_value(src, spec, v, finite)}")
    if not optional:
        src.emit(1, f"return {{{', '.join(items)}}}")
    else:
        defaults = {f.name: f.default for f, _ in fields_of(cls)}
        src.emit(1, f"m = {{{', '.join(items)}}}")
        for name, v, value in optional:
            src.emit(1, f"if {v} is not {src.ref(defaults[name])}: m[{name!r}] = {value}")
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
