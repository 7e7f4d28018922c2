"""Bodies of the local inference API: JSON or msgpack in, the same format out (pure).

A predict body is a map with ``input``: one sample (the model's input shape without the
batch dimension) or a batch, as nested lists of numbers, or, in msgpack only, as a tensor
map ``{"dtype": "float32", "shape": [...], "data": <little-endian bytes>}`` (no parsing of
numbers at all). A feedback body is ``{"prediction_id": str, "label": str | int}``.
Decoding is total: anything malformed raises `BadRequestError`, never another error.

Decoding builds Python objects, up to about 70 bytes of them per byte of msgpack (a list
of empty lists) and about 24 per byte of JSON. A body of at most `SMALL_BODY_BYTES` is
decoded as it is (a few MB at worst); a larger predict body is held to what a batch of the
served model's ``max_batch`` rows can need (`InputLimits`): its size first, then the lists,
maps and values it holds, counted before (JSON) or while (msgpack) they are built.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from agent.errors import AgentError

JSON = "application/json"
MSGPACK = "application/msgpack"
MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
TENSOR_DTYPES = frozenset({"float32", "float64", "float16", "int64", "int32", "int8", "uint8"})
# Each as little-endian. np.dtype("<f4") is numpy's own float32 object on a little-endian
# machine (newbyteorder would make a copy), so a decoded tensor meets the predict path's
# `dtype is` fast check.
_LITTLE = {name: np.dtype("<" + np.dtype(name).str[1:]) for name in TENSOR_DTYPES}
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Bodies up to this size are decoded without counting what they hold (see the module doc).
SMALL_BODY_BYTES = 128 * 1024
#: The largest feedback body (an id and a label).
MAX_FEEDBACK_BYTES = 64 * 1024
_SPARE = 64  # lists, maps and values a predict body may hold beyond its input's own
_SLACK_BYTES = 4096  # bytes a predict body may hold beyond its input's own
#: Bytes one number may take at most: in msgpack (a float64, an int64) and in JSON (the 24
#: characters of ``-2.2250738585072014e-308``, a separator, the indentation of pretty printing).
_NUMBER_BYTES = {MSGPACK: 9, JSON: 40}
_LIST_BYTES = {MSGPACK: 5, JSON: 32}  # a list's own bytes: its header; brackets, indentation


class BadRequestError(AgentError):
    """A request body the API cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class InputLimits:
    """What a valid predict body holds at most: a batch of `rows` rows as nested lists has
    `values` numbers in `lists` lists, none longer than `longest`."""

    rows: int
    values: int
    lists: int
    longest: int

    @classmethod
    def of(cls, sample_shape: Sequence[int | None], max_batch: int) -> InputLimits:
        """The limits for samples of `sample_shape` (None: any size) and `max_batch` rows."""
        if None in sample_shape:  # (a symbolic dimension: only the body's size bounds it)
            return cls(max_batch, MAX_BODY_BYTES, MAX_BODY_BYTES, MAX_BODY_BYTES)
        dims = [int(d) for d in sample_shape if d is not None]
        lists, width = 1, max_batch  # the batch's own list, then each level's lists
        for d in dims[:-1]:
            lists += width
            width *= d
        lists += width if dims else 0
        values = width * dims[-1] if dims else max_batch
        return cls(max_batch, values, lists, max([max_batch, *dims]))

    def body_bytes(self, kind: str) -> int:
        """The largest predict body in format `kind` a valid input can need: every number
        and list at its longest, plus a few KiB (`MAX_BODY_BYTES` bounds every body too)."""
        need = _NUMBER_BYTES[kind] * self.values + _LIST_BYTES[kind] * self.lists
        return need + _SLACK_BYTES


class _Budget:
    """What a msgpack predict body may still build; its hooks raise once it is spent."""

    __slots__ = ("lists", "maps", "values")

    def __init__(self, limits: InputLimits) -> None:
        self.lists = limits.lists + _SPARE
        self.values = limits.values + limits.lists + _SPARE  # (a list is its parent's value)
        self.maps = _SPARE

    def array(self, items: list[Any]) -> list[Any]:
        self.lists -= 1
        self.values -= len(items)
        if self.lists < 0 or self.values < 0:
            raise _TooManyError
        return items

    def map(self, items: dict[str, Any]) -> dict[str, Any]:
        self.maps -= 1
        if self.maps < 0:
            raise _TooManyError
        return items


class _TooManyError(Exception):
    """A predict body holds more than a batch of `InputLimits.rows` rows can."""


def media_type(content_type: str | None) -> str:
    """`MSGPACK` for a msgpack content type, `JSON` for JSON or none; BadRequestError (415) else."""
    kind = (content_type or JSON).split(";")[0].strip().lower()
    if kind in MSGPACK_TYPES:
        return MSGPACK
    if kind in (JSON, ""):
        return JSON
    raise BadRequestError(f"unsupported content type {kind!r}: use {JSON} or {MSGPACK}", 415)


def decode_body(
    body: bytes | bytearray, kind: str, limits: InputLimits | None = None
) -> Mapping[str, Any]:
    """The body as a map; BadRequestError if it is not one in the format `kind` names.

    With `limits` (a predict body), one over `SMALL_BODY_BYTES` is refused (413) if it is
    larger than a valid input can need, and (400) as soon as it is seen to hold more lists,
    maps or values than a batch of ``limits.rows`` rows.
    """
    try:
        if limits is not None and len(body) > SMALL_BODY_BYTES:
            value = _decode_counted(body, kind, limits)
        elif kind == MSGPACK:
            value = msgpack.unpackb(body, raw=False, strict_map_key=True)
        else:
            value = json.loads(body)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            RecursionError, UnicodeDecodeError) as exc:  # fmt: skip
        name = "msgpack" if kind == MSGPACK else "JSON"
        raise BadRequestError(f"body is not valid {name}: {exc}") from None
    except _TooManyError:
        raise BadRequestError(
            f"predict body holds more values than a batch of {limits.rows if limits else 0} "
            "rows of the model's input (inference_max_batch): send fewer rows"
        ) from None
    if not isinstance(value, Mapping):
        raise BadRequestError("body must be a map (a JSON object)")
    return value


def too_large(length: int, limits: InputLimits, kind: str) -> BadRequestError | None:
    """The 413 for a predict body of `length` bytes over what `limits` can need, else None
    (also for one over `MAX_BODY_BYTES`: the HTTP layer refuses any such body itself)."""
    most = limits.body_bytes(kind)
    if length <= most or length > MAX_BODY_BYTES:
        return None
    name = "msgpack" if kind == MSGPACK else "JSON"
    return BadRequestError(
        f"predict body of {length} bytes: a {name} batch of {limits.rows} rows of this model "
        f"needs at most {most} (send fewer rows, or msgpack tensors)",
        413,
    )


def _decode_counted(body: bytes | bytearray, kind: str, limits: InputLimits) -> Any:
    """A large predict body, refused once it is seen to hold more than `limits` allow."""
    refusal = too_large(len(body), limits, kind)
    if refusal is not None:
        raise refusal
    if kind == MSGPACK:
        budget = _Budget(limits)
        return msgpack.unpackb(
            body, raw=False, strict_map_key=True, list_hook=budget.array,
            object_hook=budget.map, max_array_len=limits.longest, max_map_len=_SPARE,
            max_ext_len=0,
        )  # fmt: skip
    # JSON: each list opens with "[", each map with "{", and values are separated by ","
    # (counting those inside strings too only errs on the safe side): counted before parsing
    if (
        body.count(b"[") > limits.lists + _SPARE
        or body.count(b"{") > _SPARE
        or body.count(b",") > limits.values + limits.lists + _SPARE
    ):
        raise _TooManyError
    return json.loads(body)


def _tensor(value: Mapping[str, Any]) -> np.ndarray[Any, Any]:
    dtype: Any = value.get("dtype")
    shape, data = value.get("shape"), value.get("data")
    try:
        dt = _LITTLE[dtype]
    except (KeyError, TypeError):  # (TypeError: a list or map, which no dict holds)
        dt = None
    if dt is None or not isinstance(data, bytes | bytearray):
        raise BadRequestError(f"input tensor needs dtype (one of {sorted(TENSOR_DTYPES)}) and data")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequestError("input tensor shape must be a list of non-negative integers")
    size = math.prod(shape) * dt.itemsize
    if size != len(data):
        raise BadRequestError(f"input tensor {shape} {dtype} needs {size} bytes, got {len(data)}")
    try:
        return np.frombuffer(data, dtype=dt).reshape(shape)
    except ValueError as exc:  # more dimensions than numpy takes, or sizes it cannot hold
        raise BadRequestError(f"input tensor shape cannot be used: {exc}") from None


def predict_input(body: Mapping[str, Any]) -> np.ndarray[Any, Any]:
    """The ``input`` of a predict body as an array; BadRequestError if missing or not numeric."""
    if "input" not in body:
        raise BadRequestError('predict body needs "input": one sample or a batch')
    value = body["input"]
    if isinstance(value, Mapping):
        return _tensor(value)
    if not isinstance(value, list) or not value:
        raise BadRequestError('"input" must be a non-empty list of numbers (or of lists)')
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise BadRequestError(f'"input" is not a regular array of numbers: {exc}') from None
    if arr.dtype.kind not in "iuf":  # (true and false are not numbers here: send 1 and 0)
        raise BadRequestError(f'"input" must hold numbers, got {arr.dtype}')
    return arr


def feedback_fields(body: Mapping[str, Any]) -> tuple[str, str | int]:
    """(prediction_id, label) of a feedback body; BadRequestError if either is missing or bad."""
    pid, label = body.get("prediction_id"), body.get("label")
    if not isinstance(pid, str) or not pid:
        raise BadRequestError('feedback body needs "prediction_id" (a string)')
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise BadRequestError('feedback body needs "label": a label name or a class index')
    return pid, label


def encode_body(value: Mapping[str, Any], kind: str) -> bytes:
    """`value` as JSON or msgpack bytes."""
    if kind == MSGPACK:
        data: bytes = msgpack.packb(value, use_bin_type=True)
        return data
    return json.dumps(value, separators=(",", ":")).encode()
