"""msgpack framing: one map per payload, size cap first, zero-copy binaries.

`pack_map` writes a map whose large binary values are joined in without an intermediate
copy (msgpack's own packer grows its buffer and copies large blobs several times).
`unpack_map` checks the size cap before anything else, decodes small payloads with msgpack's
C unpacker, and large ones with a small total walker that returns large binaries as
read-only `memoryview` slices of the input instead of copying them. Either way, only
`DecodeError` leaves it.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from protocols.errors import DecodeError, EncodeError

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: Payloads at least this large are walked without copying their binaries.
ZERO_COPY_THRESHOLD = 64 * 1024
#: Binaries at least this large are joined in (encode) or sliced out (decode) without copies.
_BIG_BIN = 4096
_MAX_DEPTH = 32

_MSGPACK_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes msgpack.ExtraData, FormatError, StackError and UnicodeDecodeError
    TypeError,
    OverflowError,
    RecursionError,
    MemoryError,
)

_SECRET = os.urandom(8)
_tokens = itertools.count(int.from_bytes(os.urandom(4), "little"))
_MARK_LEN = 20  # random token (16 bytes) + ordinal (4 bytes), packed as bin8
_MARK_HEADER = b"\xc4\x14"


class _Splicer:
    """`default` hook for msgpack's C packer: large binaries become markers spliced later."""

    __slots__ = ("token", "views")

    def __init__(self) -> None:
        # Unpredictable per call, so no field value can collide with a marker by design.
        self.token = next(_tokens).to_bytes(8, "little") + _SECRET
        self.views: list[memoryview] = []

    def __call__(self, obj: object) -> object:
        if isinstance(obj, BigBinary):
            self.views.append(obj.view)
            return self.token + (len(self.views) - 1).to_bytes(4, "little")
        raise TypeError(f"cannot encode {type(obj).__name__}")

    def splice(self, packed: bytes) -> bytes:
        if not self.views:
            return packed
        parts: list[bytes | memoryview] = []
        pos = 0
        for i, view in enumerate(self.views):
            at = packed.find(self.token + i.to_bytes(4, "little"), pos) - 2
            if at < pos or packed[at : at + 2] != _MARK_HEADER:
                raise EncodeError("internal error: binary marker not found")
            parts += (packed[pos:at], _bin_header(view.nbytes), view)
            pos = at + 2 + _MARK_LEN
        parts.append(packed[pos:])
        return b"".join(parts)


class BigBinary:
    """A large binary to be joined into the output without intermediate copies."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view


def big(value: bytes | bytearray | memoryview) -> bytes | BigBinary:
    """Wrap a binary for `pack_map`: large ones as `BigBinary`, small ones as bytes."""
    view = value if isinstance(value, memoryview) else memoryview(value)
    if view.nbytes < _BIG_BIN:
        return view.tobytes()
    if not view.c_contiguous:
        raise EncodeError("binary values must be C-contiguous")
    return BigBinary(view.cast("B") if view.format != "B" or view.ndim != 1 else view)


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 0x1_0000_0000:
        return b"\xc6" + n.to_bytes(4, "big")
    raise EncodeError(f"binary of {n} bytes exceeds msgpack's 4 GiB limit")


def pack_map(fields: Mapping[str, Any]) -> bytes:
    """Encode `fields` as one msgpack map in insertion order; `BigBinary` values are copied once."""
    splicer = _Splicer()
    try:
        packed = msgpack.packb(fields, use_bin_type=True, default=splicer, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode message: {exc}") from exc
    return splicer.splice(packed)


def unpack_map(
    data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES
) -> dict[str, Any]:
    """Decode one msgpack map of at most `max_bytes`; raise DecodeError for anything else."""
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise DecodeError(
            f"payload of {size} bytes exceeds the cap of {max_bytes}", reason="too_large"
        )
    if size == 0:
        raise DecodeError("empty payload", reason="malformed")
    if size >= ZERO_COPY_THRESHOLD:
        value = walk(data)
    else:
        try:
            value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except _MSGPACK_ERRORS as exc:
            raise DecodeError(f"not msgpack: {exc}", reason="malformed") from exc
    if not isinstance(value, dict):
        raise DecodeError(f"payload is a {type(value).__name__}, not a map", reason="malformed")
    return value


# --- the zero-copy walker ------------------------------------------------------------------

_FIXED = {
    0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
    0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
    0xCA: ">f", 0xCB: ">d",
}  # fmt: skip
_FIXED_S = {b: struct.Struct(f) for b, f in _FIXED.items()}
_LEN_S = {
    0xC4: struct.Struct(">B"), 0xC5: struct.Struct(">H"), 0xC6: struct.Struct(">I"),
    0xD9: struct.Struct(">B"), 0xDA: struct.Struct(">H"), 0xDB: struct.Struct(">I"),
    0xDC: struct.Struct(">H"), 0xDD: struct.Struct(">I"),
    0xDE: struct.Struct(">H"), 0xDF: struct.Struct(">I"),
}  # fmt: skip
_EXT_FIXED = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_EXT_LEN_S = {0xC7: struct.Struct(">B"), 0xC8: struct.Struct(">H"), 0xC9: struct.Struct(">I")}
_CODE_S = struct.Struct(">b")


class _TruncatedError(Exception):
    pass


def _value(buf: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    """Decode the value at `pos`; IndexError/struct.error/_Truncated on short input."""
    b = buf[pos]
    pos += 1
    if b < 0x80:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if b <= 0x8F:
        return _map(buf, b & 0x0F, pos, depth)
    if b <= 0x9F:
        return _array(buf, b & 0x0F, pos, depth)
    if b <= 0xBF:
        return _text(buf, b & 0x1F, pos)
    if b == 0xC0:
        return None, pos
    if b == 0xC2 or b == 0xC3:
        return b == 0xC3, pos
    st = _FIXED_S.get(b)
    if st is not None:
        return st.unpack_from(buf, pos)[0], pos + st.size
    st = _LEN_S.get(b)
    if st is None:
        return _ext(buf, b, pos)
    n = st.unpack_from(buf, pos)[0]
    pos += st.size
    if b <= 0xC6:
        end = pos + n
        if end > buf.nbytes:
            raise _TruncatedError
        view = buf[pos:end]
        return (view if n >= _BIG_BIN else view.tobytes()), end
    if b <= 0xDB:
        return _text(buf, n, pos)
    if b <= 0xDD:
        return _array(buf, n, pos, depth)
    return _map(buf, n, pos, depth)


def _ext(buf: memoryview, b: int, pos: int) -> tuple[Any, int]:
    """An extension value, as msgpack's own unpacker returns it (ExtType or Timestamp)."""
    n = _EXT_FIXED.get(b)
    if n is None:
        st = _EXT_LEN_S.get(b)
        if st is None:
            raise DecodeError(f"unsupported msgpack type byte 0x{b:02x}", reason="malformed")
        n = st.unpack_from(buf, pos)[0]
        pos += st.size
    code = _CODE_S.unpack_from(buf, pos)[0]
    end = pos + 1 + n
    if end > buf.nbytes:
        raise _TruncatedError
    data = buf[pos + 1 : end].tobytes()
    if code >= 0:
        return msgpack.ExtType(code, data), end
    if code != -1:
        raise DecodeError(f"reserved msgpack extension type {code}", reason="malformed")
    try:
        return msgpack.Timestamp.from_bytes(data), end
    except ValueError as exc:
        raise DecodeError(f"invalid timestamp: {exc}", reason="malformed") from exc


def _text(buf: memoryview, n: int, pos: int) -> tuple[str, int]:
    end = pos + n
    if end > buf.nbytes:
        raise _TruncatedError
    return str(buf[pos:end], "utf-8"), end


def _array(buf: memoryview, n: int, pos: int, depth: int) -> tuple[list[Any], int]:
    if depth >= _MAX_DEPTH:
        raise DecodeError("msgpack nests too deeply", reason="malformed")
    if pos + n > buf.nbytes:  # every element takes at least one byte
        raise _TruncatedError
    out = []
    for _ in range(n):
        item, pos = _value(buf, pos, depth + 1)
        out.append(item)
    return out, pos


def _map(buf: memoryview, n: int, pos: int, depth: int) -> tuple[dict[str, Any], int]:
    if depth >= _MAX_DEPTH:
        raise DecodeError("msgpack nests too deeply", reason="malformed")
    if pos + 2 * n > buf.nbytes:
        raise _TruncatedError
    out: dict[str, Any] = {}
    key: Any
    for _ in range(n):
        b = buf[pos]
        if 0xA0 <= b <= 0xBF:
            key, pos = _text(buf, b & 0x1F, pos + 1)
        else:  # like msgpack's strict_map_key: str or bin keys only
            key, pos = _value(buf, pos, depth + 1)
            if isinstance(key, memoryview):
                key = key.tobytes()
            elif not isinstance(key, str | bytes):
                raise DecodeError("map keys must be strings", reason="malformed")
        out[key], pos = _value(buf, pos, depth + 1)
    return out, pos


def walk(data: bytes | bytearray | memoryview) -> Any:
    """Decode one msgpack value, returning binaries of 4 KiB or more as views of `data`."""
    buf = memoryview(data)
    if not buf.c_contiguous:
        buf = memoryview(buf.tobytes())
    elif buf.format != "B" or buf.ndim != 1 or not buf.readonly:
        buf = buf.cast("B").toreadonly()
    try:
        value, pos = _value(buf, 0, 0)
    except (IndexError, struct.error, _TruncatedError) as exc:
        raise DecodeError("truncated msgpack", reason="malformed") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid UTF-8 in string", reason="malformed") from exc
    if pos != buf.nbytes:
        raise DecodeError(
            f"{buf.nbytes - pos} trailing bytes after msgpack value", reason="malformed"
        )
    return value
