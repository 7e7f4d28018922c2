"""What message dataclass fields may hold, as small trees, and the generated-code helper.

Shared by the decoders (`protocols.schema`) and the encoders (`protocols.encoders`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

Binary = bytes | memoryview
Scalar = str | int | float | bool

Spec = tuple[Any, ...]  # ("str",), ("opt", inner), ("tuple", inner), ("cls", C), ...
SIMPLE_KINDS = ("str", "int", "bool")


def spec_of(hint: Any) -> Spec:
    """The field type `hint` as a small tree; TypeError for types this module cannot carry."""
    if hint == Binary:
        return ("binary",)
    if hint == Scalar:
        return ("scalar",)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
        return ("opt", spec_of(inner))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return ("tuple", spec_of(args[0]))
    if origin is dict and args and args[0] is str:
        return ("dict", spec_of(args[1]))
    if hint in (str, int, float, bool, bytes):
        return (hint.__name__,)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return ("cls", hint)
    raise TypeError(f"unsupported field type {hint!r}")


def fields_of(cls: type) -> list[tuple[dataclasses.Field[Any], Spec]]:
    """The fields of dataclass `cls` with their specs (computed once per class)."""
    found = _FIELD_CACHE.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        found = _FIELD_CACHE[cls] = [(f, spec_of(hints[f.name])) for f in dataclasses.fields(cls)]
    return found


_FIELD_CACHE: dict[type, list[tuple[dataclasses.Field[Any], Spec]]] = {}


_OMIT_MARK = "__wire_omits_defaults__"
C = typing.TypeVar("C", bound=type)


def omit_defaults(cls: C) -> C:
    """Class decorator: encode `cls` without the optional fields that hold their default.

    A field is left out only while it holds the very default object its declaration names
    (``1.0``, ``0``, ``None``; never one from a ``default_factory``), so decoding, which
    fills in missing fields with that default, gives back an equal instance. Maps that
    carry every field still decode: this changes what is written, not what is accepted.
    The defaults become part of the wire protocol: changing one changes what old bytes mean.
    """
    setattr(cls, _OMIT_MARK, True)  # (an attribute: dataclass(slots=True) copies it)
    return cls


def omits_defaults(cls: type) -> bool:
    """Whether `cls` is encoded without its default-valued optional fields."""
    return getattr(cls, _OMIT_MARK, False) is True


def required(field: dataclasses.Field[Any]) -> bool:
    """Whether `field` has no default (a decoder must find it in the map)."""
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


class Source:
    """Lines of one generated function and the objects its names refer to."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.names: dict[str, Any] = {}
        self.count = 0

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def ref(self, obj: Any) -> str:
        name = f"_r{len(self.names)}"
        self.names[name] = obj
        return name

    def var(self) -> str:
        self.count += 1
        return f"_v{self.count}"

    def build(self, name: str, qualname: str) -> Any:
        namespace = dict(self.names)
        exec("\n".join(self.lines), namespace)  # our own source, as dataclasses does
        fn = namespace[name]
        fn.__qualname__ = qualname
        return fn
