"""Bodies of the local inference API: JSON or msgpack in, the same format out (pure).

A predict body is a map with ``input``: one sample (the model's input shape without the
batch dimension) or a batch, as nested lists of numbers, or, in msgpack only, as a tensor
map ``{"dtype": "float32", "shape": [...], "data": <little-endian bytes>}`` (no parsing of
numbers at all). A feedback body is ``{"prediction_id": str, "label": str | int}``.
Decoding is total: anything malformed raises `BadRequestError`, never another error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
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


class BadRequestError(AgentError):
    """A request body the API cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def media_type(content_type: str | None) -> str:
    """`MSGPACK` for a msgpack content type, `JSON` for JSON or none; BadRequestError (415) else."""
    kind = (content_type or JSON).split(";")[0].strip().lower()
    if kind in MSGPACK_TYPES:
        return MSGPACK
    if kind in (JSON, ""):
        return JSON
    raise BadRequestError(f"unsupported content type {kind!r}: use {JSON} or {MSGPACK}", 415)


def decode_body(body: bytes | bytearray, kind: str) -> Mapping[str, Any]:
    """The body as a map; BadRequestError if it is not one in the format `kind` names."""
    try:
        value = (
            msgpack.unpackb(body, raw=False, strict_map_key=True)
            if kind == MSGPACK
            else json.loads(body)
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            RecursionError, UnicodeDecodeError) as exc:  # fmt: skip
        name = "msgpack" if kind == MSGPACK else "JSON"
        raise BadRequestError(f"body is not valid {name}: {exc}") from None
    if not isinstance(value, Mapping):
        raise BadRequestError("body must be a map (a JSON object)")
    return value


def _tensor(value: Mapping[str, Any]) -> np.ndarray[Any, Any]:
    dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if dtype not in TENSOR_DTYPES or not isinstance(data, bytes | bytearray):
        raise BadRequestError(f"input tensor needs dtype (one of {sorted(TENSOR_DTYPES)}) and data")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequestError("input tensor shape must be a list of non-negative integers")
    dt = _LITTLE[dtype]
    size = math.prod(shape) * dt.itemsize
    if size != len(data):
        raise BadRequestError(f"input tensor {shape} {dtype} needs {size} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


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
    if arr.dtype.kind not in "biuf":
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
