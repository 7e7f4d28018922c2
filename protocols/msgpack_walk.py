"""A small, total msgpack walker that returns large binaries as views of its input.

`protocols.wire.unpack_map` hands a large payload here when msgpack's C unpacker cannot be
shown to give the same result on it. Pure: bytes in, Python values out; only `DecodeError`
leaves `walk`. `flat_map` reads one common shape of large payload in one pass, exactly as
`walk` would, or declines (None).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from protocols.errors import DecodeError

#: Binaries at least this large are joined in (encode) or sliced out (decode) without copies.
BIG_BINARY = 4096
#: Deepest nesting of arrays and maps accepted.
MAX_DEPTH = 32

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
_U32 = struct.Struct(">I").unpack_from
_FLAT_NUMBERS = frozenset((0xCC, 0xCD, 0xCE, 0xCF, 0xCB))  # uint 8 to 64, float 64
_FLAT_ARRAY_UINTS = frozenset((0xCC, 0xCD, 0xCE))  # uint 8 to 32


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
        return (view if n >= BIG_BINARY else view.tobytes()), end
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
    if depth >= MAX_DEPTH:
        raise DecodeError("msgpack nests too deeply", reason="malformed")
    if pos + n > buf.nbytes:  # every element takes at least one byte
        raise _TruncatedError
    out = []
    for _ in range(n):
        item, pos = _value(buf, pos, depth + 1)
        out.append(item)
    return out, pos


def _map(buf: memoryview, n: int, pos: int, depth: int) -> tuple[dict[str, Any], int]:
    if depth >= MAX_DEPTH:
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


def flat_map(data: bytes, at: int) -> dict[str, Any] | None:
    """`walk(data)` for one common shape, else None: a map of at most 15 fields whose last
    value is a large binary (4 KiB or more) with its bin 32 header at `at`, running to the
    end of `data`.

    The keys must be short strings (fixstr) and the other values plain: strings of up to
    255 bytes, non-negative integers, float64, booleans, nil, or short arrays (up to 15)
    of non-negative integers of up to 32 bits, which is what a tensor's map and a blob
    chunk's hold. One pass of plain Python: when the payload has just been received, its
    caches cold, this costs less than msgpack's C unpacker and its setup.
    """
    try:
        count = data[0] - 0x80
        if not 0 < count <= 15:
            return None
        out: dict[str, Any] = {}
        pos = 1
        while count:
            count -= 1
            b = data[pos]
            if b & 0xE0 != 0xA0:
                return None
            end = pos + 1 + (b & 0x1F)
            key = data[pos + 1 : end].decode()
            if end == at:  # the binary: a value here, the last one
                n = len(data) - at - 5
                if count or n < BIG_BINARY or _U32(data, at + 1)[0] != n:
                    return None
                out[key] = memoryview(data)[at + 5 :]
                return out
            b = data[end]
            pos = end + 1
            value: Any
            if b < 0x80:
                value = b
            elif b & 0xE0 == 0xA0:
                end = pos + (b & 0x1F)
                value = data[pos:end].decode()
                pos = end
            elif b == 0xD9:
                end = pos + 1 + data[pos]
                value = data[pos + 1 : end].decode()
                pos = end
            elif b & 0xF0 == 0x90:
                value = []
                for _ in range(b & 0x0F):
                    b = data[pos]
                    if b < 0x80:
                        value.append(b)
                        pos += 1
                    elif b in _FLAT_ARRAY_UINTS:
                        st = _FIXED_S[b]
                        value.append(st.unpack_from(data, pos + 1)[0])
                        pos += 1 + st.size
                    else:
                        return None
            elif b in _FLAT_NUMBERS:
                st = _FIXED_S[b]
                value = st.unpack_from(data, pos)[0]
                pos += st.size
            elif b == 0xC0:
                value = None
            elif b == 0xC2 or b == 0xC3:
                value = b == 0xC3
            else:
                return None
            out[key] = value
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None
