"""Tensor codec: numpy arrays to and from `WireTensor`, never through pickle.

Element types on the wire (``dtype``): ``f32``, ``f16``, ``bf16`` (little-endian) and
``i8`` (quantised: ``value = (q - zero_point) * scale``). A *sparse* tensor carries only
some elements: ``data`` holds their values and ``indices`` their flat positions, as
LEB128 varints of the gaps between consecutive positions (the first is absolute), so a
top-1 % update spends one or two bytes per index instead of eight.

Encoding takes memoryviews of the caller's arrays (no copy for contiguous ``float32``);
dense decoding returns a read-only view of the received bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocols.errors import DecodeError, EncodeError
from protocols.schema import Binary, constructor, fast_constructor, omit_defaults

DTYPES: dict[str, np.dtype[np.generic]] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "i8": np.dtype("i1"),
}
MAX_ELEMENTS = 1 << 28
_F32 = DTYPES["f32"]
_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)
_MAX_RANK = 8
_VARINT_BLOCK = 1 << 18

FloatArray = npt.NDArray[np.float32]


@omit_defaults  # a dense f32 tensor goes as four fields: name, dtype, shape, data
@fast_constructor
@dataclass(frozen=True, slots=True)
class WireTensor:
    """One named tensor as carried inside a message."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Binary
    scale: float = 1.0
    zero_point: int = 0
    indices: Binary | None = None

    @property
    def is_sparse(self) -> bool:
        """True when only some elements are carried."""
        return self.indices is not None

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload (values plus indices) on the wire."""
        extra = 0 if self.indices is None else memoryview(self.indices).nbytes
        return memoryview(self.data).nbytes + extra


_make_tensor = constructor(WireTensor)


def _as_bytes_view(array: npt.NDArray[np.generic]) -> memoryview:
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.data.cast("B") if flat.size else memoryview(b"")


def _to_bf16(values: FloatArray) -> npt.NDArray[np.uint16]:
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(values)
    if nan.any():  # rounding would carry a NaN's payload into the sign: keep it a (quiet) NaN
        rounded[nan] = (bits[nan] >> np.uint32(16)) | np.uint32(0x0040)
    return rounded.astype("<u2")


def _quantise(values: FloatArray) -> tuple[npt.NDArray[np.int8], float]:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if not math.isfinite(peak):
        raise EncodeError("cannot quantise a tensor holding NaN or Inf")
    # The scale must stay a normal float32, or dividing by it overflows (subnormal peaks).
    scale = max(peak / 127.0, _F32_TINY) if peak > 0 else 1.0
    q = np.clip(np.rint(values / np.float32(scale)), -127, 127).astype(np.int8)
    return q, scale


def _encode_values(name: str, values: FloatArray, dtype: str) -> tuple[Binary, float]:
    if dtype == "f32":
        return _as_bytes_view(np.asarray(values, dtype="<f4")), 1.0
    if dtype == "f16":
        with np.errstate(over="ignore"):  # beyond +-65504 becomes +-Inf, which receivers reject
            return _as_bytes_view(values.astype("<f2")), 1.0
    if dtype == "bf16":
        return _as_bytes_view(_to_bf16(values)), 1.0
    if dtype == "i8":
        q, scale = _quantise(values)
        return _as_bytes_view(q), scale
    raise EncodeError(f"unknown tensor dtype {dtype!r}; choose one of {sorted(DTYPES)}")


def encode_dense(name: str, array: npt.ArrayLike, dtype: str = "f32") -> WireTensor:
    """Encode every element of `array` as `dtype` (f32, f16, bf16 or i8 with a scale).

    Values are not inspected (receivers check for NaN/Inf); quantising one raises EncodeError.
    """
    if dtype == "f32" and type(array) is np.ndarray and array.dtype is _F32:
        try:
            view = array.data.cast("B")  # zero copy; TypeError unless C-contiguous
        except TypeError:
            pass
        else:
            return _make_tensor(name, dtype, array.shape, view if view else b"")
    values = np.asarray(array, dtype=np.float32)
    if dtype == "f32" and values.flags.c_contiguous and values.dtype.byteorder != ">":
        data: Binary = values.data.cast("B") if values.size else b""  # zero copy
        return WireTensor(name, dtype, values.shape, data)
    data, scale = _encode_values(name, values, dtype)
    return WireTensor(name, dtype, values.shape, data, scale)


def encode_sparse(
    name: str,
    shape: tuple[int, ...],
    flat_indices: npt.ArrayLike,
    values: npt.ArrayLike,
    dtype: str = "i8",
) -> WireTensor:
    """Encode the elements at strictly increasing `flat_indices` of a tensor of `shape`."""
    idx = np.asarray(flat_indices, dtype=np.int64).reshape(-1)
    vals = np.asarray(values, dtype=np.float32).reshape(-1)
    size = math.prod(shape)
    if idx.shape != vals.shape:
        raise EncodeError(f"tensor {name!r}: {idx.size} indices but {vals.size} values")
    if idx.size and (idx[0] < 0 or idx[-1] >= size or np.any(np.diff(idx) <= 0)):
        raise EncodeError(f"tensor {name!r}: indices must be increasing and inside 0..{size - 1}")
    data, scale = _encode_values(name, vals, dtype)
    gaps = (
        np.diff(idx, prepend=np.int64(0)).astype(np.uint64) if idx.size else idx.astype(np.uint64)
    )
    dims = tuple(int(d) for d in shape)
    return WireTensor(name, dtype, dims, data, scale, 0, varint_encode(gaps).tobytes())


def varint_encode(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """LEB128-encode non-negative integers below 2**35, vectorised."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size and int(v.max()) >= 1 << 35:
        raise EncodeError("varint value too large")
    lengths = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 5):
        lengths += v >= np.uint64(1 << (7 * k))
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    for k in range(5):
        mask = lengths > k
        if not mask.any():
            break
        byte = (v[mask] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[mask] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[mask] + k] = (byte | more).astype(np.uint8)
    return out


def varint_decode(buf: Binary, limit: int) -> npt.NDArray[np.int64]:
    """Decode at most `limit` LEB128 integers, each below 2**35; DecodeError otherwise.

    Decoded in blocks of `_VARINT_BLOCK` integers, a byte position at a time, so memory
    stays near the output's 8 bytes per integer (about 17 times the input at most)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size == 0 or ends[-1] != raw.size - 1:
        raise DecodeError("truncated varint", reason="bad_tensor")
    if ends.size > limit:
        raise DecodeError("more indices than elements", reason="bad_tensor")
    out = np.empty(ends.size, np.int64)
    for first in range(0, ends.size, _VARINT_BLOCK):
        block_ends = ends[first : first + _VARINT_BLOCK]
        starts = np.empty_like(block_ends)
        starts[0] = ends[first - 1] + 1 if first else 0
        starts[1:] = block_ends[:-1] + 1
        extra = block_ends - starts  # bytes after the first
        if int(extra.max()) >= 5:
            raise DecodeError("varint longer than 5 bytes", reason="bad_tensor")
        values = out[first : first + block_ends.size]
        np.bitwise_and(raw[starts], 0x7F, out=values, casting="unsafe")
        for k in range(1, 5):
            more = np.flatnonzero(extra >= k)
            if more.size == 0:
                break
            values[more] |= (raw[starts[more] + k] & 0x7F).astype(np.int64) << (7 * k)
    return out


def _check_shape(t: WireTensor, max_elements: int) -> int:
    if len(t.shape) > _MAX_RANK or any(d < 0 for d in t.shape):
        raise DecodeError(f"tensor {t.name!r}: bad shape {t.shape}", reason="bad_tensor")
    # Bound the product of the non-zero dimensions too: numpy refuses a shape like (0, 2**70).
    if math.prod(d or 1 for d in t.shape) > max_elements:
        raise DecodeError(
            f"tensor {t.name!r}: shape {t.shape} exceeds {max_elements} elements",
            reason="too_large",
        )
    size = math.prod(t.shape)
    if t.dtype not in DTYPES:
        raise DecodeError(f"tensor {t.name!r}: unknown dtype {t.dtype!r}", reason="bad_tensor")
    # The scale is applied in float32: one beyond its range would overflow to Inf.
    if not 0 <= t.scale <= _F32_MAX or not -128 <= t.zero_point <= 127:
        raise DecodeError(f"tensor {t.name!r}: bad scale or zero point", reason="bad_tensor")
    return size


def _values(t: WireTensor, count: int) -> npt.NDArray[np.generic]:
    dtype = DTYPES[t.dtype]
    if memoryview(t.data).nbytes != count * dtype.itemsize:
        raise DecodeError(
            f"tensor {t.name!r}: {memoryview(t.data).nbytes} data bytes for {count} x {t.dtype}",
            reason="bad_tensor",
        )
    return np.frombuffer(t.data, dtype=dtype)


def _to_float(t: WireTensor, raw: npt.NDArray[np.generic]) -> npt.NDArray[np.floating]:
    if t.dtype in ("f32", "f16"):
        return raw  # type: ignore[return-value]
    if t.dtype == "bf16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    with np.errstate(over="ignore"):  # (q - zero_point) * scale may pass float32's range: Inf
        return (raw.astype(np.float32) - np.float32(t.zero_point)) * np.float32(t.scale)


def decode_sparse(
    t: WireTensor, max_elements: int = MAX_ELEMENTS
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.floating]]:
    """Flat indices and values of a sparse tensor; DecodeError for anything inconsistent."""
    if t.indices is None:
        raise DecodeError(f"tensor {t.name!r} is dense", reason="bad_tensor")
    size = _check_shape(t, max_elements)
    gaps = varint_decode(t.indices, size)
    if gaps.size and np.any(gaps[1:] == 0):
        raise DecodeError(f"tensor {t.name!r}: repeated index", reason="bad_tensor")
    idx = np.cumsum(gaps)
    if idx.size and idx[-1] >= size:
        raise DecodeError(f"tensor {t.name!r}: index {idx[-1]} outside {size}", reason="bad_tensor")
    return idx, _to_float(t, _values(t, int(idx.size)))


def decode_tensor(t: WireTensor, max_elements: int = MAX_ELEMENTS) -> npt.NDArray[np.floating]:
    """The tensor as an array (f32 dense: a read-only view of the received bytes)."""
    if t.indices is None and t.dtype == "f32" and t.scale == 1.0 and t.zero_point == 0:
        # The common case, checked by numpy: the bytes must hold exactly `shape`.
        shape = t.shape
        try:
            out = np.frombuffer(t.data, _F32)
            count = len(out)
            if len(shape) != 1 or count != shape[0]:  # (a flat tensor needs no reshape)
                if len(shape) > _MAX_RANK or min(shape, default=0) <= 0:
                    raise ValueError
                out = out.reshape(shape)
        except (ValueError, TypeError):
            pass
        else:
            if count <= max_elements:
                return out
    if t.indices is not None:
        idx, vals = decode_sparse(t, max_elements)
        out = np.zeros(math.prod(t.shape), dtype=np.float32)
        out[idx] = vals
        return out.reshape(t.shape)
    size = _check_shape(t, max_elements)
    return _to_float(t, _values(t, size)).reshape(t.shape)
