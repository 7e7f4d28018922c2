"""Turn frozen message dataclasses into msgpack-ready maps and back, checking every field.

A dataclass field may be typed as: ``str``, ``int``, ``float``, ``bool``, ``bytes``,
`Binary` (a large binary, decoded as a zero-copy view), `Scalar`, ``X | None``,
``tuple[X, ...]``, ``dict[str, X]`` or another such dataclass. Decoding ignores unknown
keys (minor versions add fields, always with defaults) and raises `DecodeError` naming the
field for anything missing or of the wrong type.

Each class gets straight-line code generated once, as `dataclasses` does for ``__init__``:
an encoder (a dict display of its fields; `protocols.encoders`) and a decoder that accepts
only exactly typed input (field types as specs: `protocols.field_specs`). Anything the
decoder does not accept goes to the generic *checked* path, which is the reference: it
accepts a little more (any sequence for an array, say) and raises the `DecodeError` that
names the field. The generated code never decides what is valid.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any, TypeVar

from protocols.encoders import encoder, finite, to_map
from protocols.errors import DecodeError
from protocols.field_specs import (
    SIMPLE_KINDS,
    Binary,
    Scalar,
    Source,
    Spec,
    fields_of,
    omit_defaults,
    omits_defaults,
    required,
)

__all__ = ["Binary", "Scalar", "constructor", "decoder", "encoder", "fast_constructor",
           "finite", "from_map", "omit_defaults", "to_map"]  # fmt: skip

T = TypeVar("T")


# --- the checked (reference) decoder --------------------------------------------------------


def _fail(path: str, expected: str, value: object) -> DecodeError:
    return DecodeError(
        f"field {path!r} should be {expected}, got {type(value).__name__}", reason="bad_field"
    )


_PY_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _check(spec: Spec, value: Any, path: str) -> Any:
    """`value` as a field of type `spec` (ints become floats), or DecodeError naming `path`."""
    kind = spec[0]
    if kind in _PY_TYPES:
        if kind == "float" and type(value) is int:
            return float(value)
        if type(value) is not _PY_TYPES[kind]:
            raise _fail(path, kind, value)
        return value
    if kind in ("binary", "bytes"):
        if not isinstance(value, bytes | memoryview):
            raise _fail(path, "binary", value)
        return value.tobytes() if kind == "bytes" and isinstance(value, memoryview) else value
    if kind == "scalar":
        if not isinstance(value, str | int | float | bool):
            raise _fail(path, "str, int, float or bool", value)
        return value
    if kind == "opt":
        return None if value is None else _check(spec[1], value, path)
    if kind == "tuple":
        if not isinstance(value, list | tuple):
            raise _fail(path, "an array", value)
        return tuple(_check(spec[1], item, f"{path}[{i}]") for i, item in enumerate(value))
    if not isinstance(value, dict):
        raise _fail(path, "a map", value)
    if kind == "cls":
        return from_map(spec[1], value, path)
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise _fail(path, "a map with string keys", key)
        out[key] = _check(spec[1], item, f"{path}.{key}")
    return out


def _checked_from_map(cls: type[T], fields: dict[str, Any], path: str = "") -> T:
    kwargs: dict[str, Any] = {}
    for field, spec in fields_of(cls):
        name = field.name
        full = f"{path}.{name}" if path else name
        if not field.init:
            continue
        if name not in fields:
            if required(field):
                raise DecodeError(f"missing field {full!r}", reason="missing_field")
            continue
        kwargs[name] = _check(spec, fields[name], full)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise DecodeError(f"invalid {cls.__name__}: {exc}", reason="bad_field") from exc


# --- code generation ----------------------------------------------------------------------

_FAIL: Any = type("_Fail", (), {"__repr__": lambda self: "<fail>"})()
_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "<missing>"})()
_FAST: dict[type, Callable[[dict[str, Any]], Any]] = {}
_SCALARS = frozenset((str, int, float, bool))


def _gen_check(src: Source, spec: Spec, v: str, ind: int, fail: str) -> None:
    """Emit code that takes `v` if it is exactly of type `spec` (converted), else `fail`s."""
    kind = spec[0]
    if kind in SIMPLE_KINDS:
        src.emit(ind, f"if type({v}) is not {kind}: {fail}")
    elif kind == "float":
        src.emit(ind, f"if type({v}) is not float:")
        src.emit(ind + 1, f"if type({v}) is not int: {fail}")
        src.emit(ind + 1, f"{v} = float({v})")
    elif kind == "bytes":
        src.emit(ind, f"if type({v}) is not bytes:")
        src.emit(ind + 1, f"if type({v}) is not memoryview: {fail}")
        src.emit(ind + 1, f"{v} = {v}.tobytes()")
    elif kind == "binary":
        src.emit(ind, f"if type({v}) is not memoryview and type({v}) is not bytes: {fail}")
    elif kind == "scalar":
        src.emit(ind, f"if type({v}) not in {src.ref(_SCALARS)}: {fail}")
    elif kind == "opt":
        src.emit(ind, f"if {v} is not None:")
        _gen_check(src, spec[1], v, ind + 1, fail)
    elif kind == "tuple":
        item, acc = src.var(), src.var()
        src.emit(ind, f"if type({v}) is not list: {fail}")
        if spec[1][0] in SIMPLE_KINDS:
            src.emit(ind, f"for {item} in {v}:")
            _gen_check(src, spec[1], item, ind + 1, fail)
            src.emit(ind, f"{v} = tuple({v})")
        else:
            src.emit(ind, f"{acc} = []")
            src.emit(ind, f"for {item} in {v}:")
            _gen_check(src, spec[1], item, ind + 1, fail)
            src.emit(ind + 1, f"{acc}.append({item})")
            src.emit(ind, f"{v} = tuple({acc})")
    elif kind == "dict":
        key, item, acc = src.var(), src.var(), src.var()
        src.emit(ind, f"if type({v}) is not dict: {fail}")
        src.emit(ind, f"{acc} = {{}}")
        src.emit(ind, f"for {key}, {item} in {v}.items():")
        src.emit(ind + 1, f"if type({key}) is not str: {fail}")
        _gen_check(src, spec[1], item, ind + 1, fail)
        src.emit(ind + 1, f"{acc}[{key}] = {item}")
        src.emit(ind, f"{v} = {acc}")
    else:  # a nested dataclass
        src.emit(ind, f"if type({v}) is not dict: {fail}")
        src.emit(ind, f"{v} = {src.ref(_fast_decoder(spec[1]))}({v})")
        src.emit(ind, f"if {v} is _FAIL: {fail}")


def _gen_decoder(cls: type, fail: str, params: str = "", **names: Any) -> Any:
    src = Source()
    src.names.update(names, _FAIL=_FAIL, _MISSING=_MISSING)
    src.emit(0, f"def decode(fields{params}):")
    fields = [(f"a{i}", f, spec) for i, (f, spec) in enumerate(fields_of(cls)) if f.init]
    if omits_defaults(cls):  # optional fields are often missing: look them up with get
        _gen_lookups(src, fields, fail, 1)
        return _gen_checks_and_build(src, cls, fields, fail)
    src.emit(1, "try:")  # every field present, the common case: no method calls
    src.emit(2, "pass")
    for v, field, _ in fields:
        src.emit(2, f"{v} = fields[{field.name!r}]")
    src.emit(1, "except KeyError:")
    _gen_lookups(src, fields, fail, 2)
    return _gen_checks_and_build(src, cls, fields, fail)


def _gen_lookups(src: Source, fields: list[tuple[str, Any, Spec]], fail: str, ind: int) -> None:
    """Emit: each required field by subscript (`fail` if one is missing), the rest by get."""
    src.emit(ind, "try:")
    src.emit(ind + 1, "pass")
    for v, field, _ in fields:
        if required(field):
            src.emit(ind + 1, f"{v} = fields[{field.name!r}]")
    src.emit(ind, "except KeyError:")
    src.emit(ind + 1, fail)
    src.emit(ind, "get = fields.get")
    for v, field, _ in fields:
        if not required(field):
            src.emit(ind, f"{v} = get({field.name!r}, _MISSING)")


def _gen_checks_and_build(
    src: Source, cls: type, fields: list[tuple[str, Any, Spec]], fail: str
) -> Any:
    """The rest of a decoder: check each field (defaults for missing ones), build `cls`."""
    args = []
    for v, field, spec in fields:
        if required(field):
            _gen_check(src, spec, v, 1, fail)
        else:
            src.emit(1, f"if {v} is _MISSING:")
            if field.default_factory is not dataclasses.MISSING:
                src.emit(2, f"{v} = {src.ref(field.default_factory)}()")
            else:
                src.emit(2, f"{v} = {src.ref(field.default)}")
            src.emit(1, "else:")
            _gen_check(src, spec, v, 2, fail)
        args.append(f"{field.name}={v}" if field.kw_only is True else v)
    src.emit(1, "try:")
    twin = _TWINS.get(cls)
    if twin is None:
        src.emit(2, f"return {src.ref(cls)}({', '.join(args)})")
    else:  # the constructor's body, inline
        src.emit(2, f"self = {src.ref(object.__new__)}({src.ref(twin)})")
        for v, field, _ in fields:
            src.emit(2, f"self.{field.name} = {v}")
        src.emit(2, f"self.__class__ = {src.ref(cls)}")
        if hasattr(cls, "__post_init__"):
            src.emit(2, "self.__post_init__()")
        src.emit(2, "return self")
    src.emit(1, "except (ValueError, TypeError):")
    src.emit(2, fail)
    return src.build("decode", f"{cls.__qualname__}.<decoder>")


def _fast_decoder(cls: type) -> Callable[[dict[str, Any]], Any]:
    """`cls`'s generated decoder: the instance, or `_FAIL` for anything but exact input."""
    fast = _FAST.get(cls)
    if fast is None:
        _FAST[cls] = lambda fields: _FAIL  # while compiling, and for classes it cannot do
        try:
            fast = _gen_decoder(cls, "return _FAIL", "")
        except TypeError:
            fast = _FAST[cls]
        _FAST[cls] = fast
    return fast


_DECODERS: dict[type, Callable[..., Any]] = {}


def decoder(cls: type[T]) -> Callable[..., T]:
    """`cls`'s decoder, compiled once: ``decoder(cls)(fields, path="")`` is `from_map`."""
    dec = _DECODERS.get(cls)
    if dec is None:
        _fast_decoder(cls)  # compiles nested classes first
        try:
            dec = _gen_decoder(
                cls,
                "return _checked(_cls, fields, path)",
                ', path=""',
                _cls=cls,
                _checked=_checked_from_map,
            )
        except TypeError:
            dec = functools.partial(_checked_from_map, cls)
        _DECODERS[cls] = dec
    return dec


def from_map(cls: type[T], fields: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a decoded map, or raise DecodeError naming the bad field."""
    try:
        dec = _DECODERS[cls]
    except KeyError:
        dec = decoder(cls)
    result: T = dec(fields, path)
    return result


_FACTORY: Any = type("_Factory", (), {"__repr__": lambda self: "<factory>"})()
_CONSTRUCTORS: dict[type, Callable[..., Any]] = {}


def fast_constructor(cls: type[T]) -> type[T]:
    """Class decorator: compile `constructor` for a frozen slotted dataclass.

    The dataclass must keep the ``__init__`` dataclasses generates (``__post_init__`` is
    fine); the constructor does exactly what it does, faster.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if not all(f.init and type(getattr(cls, f.name, None)) is _SLOT for f in fields):
        raise TypeError(f"{cls.__name__} must be a dataclass with slots and no init=False field")
    # A mutable twin with the same slots has the same layout, so an instance filled by plain
    # (fast) attribute stores can then be made a `cls`; TypeError here if it cannot.
    twin = type(f"_{cls.__name__}Builder", (), {"__slots__": cls.__slots__})  # type: ignore[attr-defined]
    probe: Any = object.__new__(twin)
    probe.__class__ = cls
    _TWINS[cls] = twin
    src = Source()
    signature, body, keyword_only = (
        [],
        [f"self = {src.ref(object.__new__)}({src.ref(twin)})"],
        False,
    )
    for f in fields:
        if f.kw_only is True and not keyword_only:
            signature.append("*")
            keyword_only = True
        if f.default_factory is not dataclasses.MISSING:
            factory = src.ref(_FACTORY)
            signature.append(f"{f.name}={factory}")
            body.append(f"if {f.name} is {factory}: {f.name} = {src.ref(f.default_factory)}()")
        elif f.default is not dataclasses.MISSING:
            signature.append(f"{f.name}={src.ref(f.default)}")
        else:
            signature.append(f.name)
        body.append(f"self.{f.name} = {f.name}")
    body.append(f"self.__class__ = {src.ref(cls)}")
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    src.emit(0, f"def make({', '.join(signature)}):")
    for line in [*body, "return self"]:
        src.emit(1, line)
    _CONSTRUCTORS[cls] = src.build("make", f"{cls.__qualname__}.<constructor>")
    return cls


_SLOT = types.MemberDescriptorType
_TWINS: dict[type, type] = {}


def constructor(cls: type[T]) -> Callable[..., T]:
    """A function that builds `cls` as calling it does, from the same arguments, faster.

    Calling a frozen dataclass sets each field through ``object.__setattr__`` (to get past
    the frozen ``__setattr__``): a generic call that is most of the cost of building a
    decoded message. For a class given `fast_constructor`, the fields are set by plain
    stores on a mutable twin, which then becomes a `cls`. Other classes are returned as is.
    """
    return _CONSTRUCTORS.get(cls, cls)
