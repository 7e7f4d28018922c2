"""msgpack framing: one map per payload, size cap first, zero-copy binaries.

`pack_map` writes a map whose large binary values are joined in without an intermediate
copy (msgpack's own packer grows its buffer and copies large blobs several times).
`unpack_map` checks the size cap before anything else and decodes small payloads with
msgpack's C unpacker. Large ones come back with their large binaries as read-only
`memoryview` slices of the input instead of copies. A flat map whose one large binary is
its last value (a tensor's, a blob chunk's) is read in one pass (`msgpack_walk.flat_map`);
otherwise the binaries are cut out and the rest goes to the C unpacker, or, where that
cannot be shown to give the same result, to `walk` (`protocols.msgpack_walk`), a small
total walker. Either way, only `DecodeError` leaves it.
"""

from __future__ import annotations

import os
import struct
import typing
from collections.abc import Mapping
from typing import Any

import msgpack

from protocols.errors import DecodeError, EncodeError
from protocols.msgpack_walk import BIG_BINARY, flat_map, walk

__all__ = ["BIG_BINARY", "DEFAULT_MAX_BYTES", "ZERO_COPY_THRESHOLD", "BigBinary", "big",
           "pack_map", "unpack_map", "walk"]  # fmt: skip

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: Payloads at least this large are walked without copying their binaries.
ZERO_COPY_THRESHOLD = 64 * 1024
_BIG_BIN = BIG_BINARY

_MSGPACK_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes msgpack.ExtraData, FormatError, StackError and UnicodeDecodeError
    TypeError,
    OverflowError,
    RecursionError,
    MemoryError,
)

# Large binaries are packed as markers, then spliced in. The token is secret and random per
# process, so no field value can collide with a marker (markers never reach the wire).
_TOKEN = os.urandom(16)
_MARK_LEN = 20  # token (16 bytes) + ordinal (4 bytes), packed as bin8
_MARK_HEADER = b"\xc4\x14"
_MARKS = [_TOKEN + i.to_bytes(4, "little") for i in range(256)]
_MARK0 = _MARK_HEADER + _MARKS[0]  # as packed: bin 8 header and the marker, 22 bytes
_BIN8 = struct.Struct(">BB").pack
_BIN16 = struct.Struct(">BH").pack
_BIN32 = struct.Struct(">BI").pack


class _Splicer:
    """A reusable C packer whose `default` hook turns large binaries into markers."""

    __slots__ = ("packer", "views")

    def __init__(self) -> None:
        self.views: list[memoryview] = []
        self.packer = msgpack.Packer(
            default=self.hook, use_bin_type=True, strict_types=False, autoreset=True
        )

    def hook(self, obj: object) -> object:
        if type(obj) is BigBinary:
            views = self.views
            i = len(views)
            views.append(obj.view)
            return _MARKS[i] if i < 256 else _TOKEN + i.to_bytes(4, "little")
        raise TypeError(f"cannot encode {type(obj).__name__}")

    def splice(self, packed: bytes) -> bytes:
        parts: list[bytes | memoryview] = []
        pos = 0
        for i, view in enumerate(self.views):
            at = packed.find(_MARKS[i] if i < 256 else _TOKEN + i.to_bytes(4, "little"), pos) - 2
            if at < pos or packed[at : at + 2] != _MARK_HEADER:
                raise EncodeError("internal error: binary marker not found")
            n = view.nbytes
            header = _BIN32(0xC6, n) if 0x10000 <= n < 0x1_0000_0000 else _bin_header(n)
            parts += (packed[pos:at], header, view)
            pos = at + 2 + _MARK_LEN
        parts.append(packed[pos:])
        return b"".join(parts)


# Idle splicers. list.pop/append are atomic, so each caller (thread, or a re-entrant call)
# gets a splicer of its own.
_IDLE: list[_Splicer] = []


@typing.final
class BigBinary:
    """A large binary to be joined into the output without intermediate copies."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view


def big(value: bytes | bytearray | memoryview) -> bytes | BigBinary:
    """Wrap a binary for `pack_map`: large ones as `BigBinary`, small ones as bytes."""
    try:
        view = value if type(value) is memoryview else memoryview(value)
    except TypeError as exc:
        raise EncodeError(f"a binary field needs bytes, not {type(value).__name__}") from exc
    if view.nbytes < _BIG_BIN:
        return view.tobytes()
    if not view.c_contiguous:
        raise EncodeError("binary values must be C-contiguous")
    wrapped = _new(BigBinary)  # (what BigBinary(view) does, without a Python-level call)
    wrapped.view = view  # any contiguous view: it is joined in as its bytes
    return wrapped


_new = object.__new__


def _bin_header(n: int) -> bytes:
    if n >= 0x1_0000_0000:
        raise EncodeError(f"binary of {n} bytes exceeds msgpack's 4 GiB limit")
    if n < 0x100:
        return _BIN8(0xC4, n)
    if n < 0x10000:
        return _BIN16(0xC5, n)
    return _BIN32(0xC6, n)


def pack_map(fields: Mapping[str, Any]) -> bytes:
    """Encode `fields` as one msgpack map in insertion order; `BigBinary` values are copied once."""
    splicer = _IDLE.pop() if _IDLE else _Splicer()
    views = splicer.views
    try:
        packed: bytes = splicer.packer.pack(fields)
        if views:
            if len(views) == 1:  # the common case, spliced here
                view = views[0]
                n = view.nbytes
                head, found, tail = packed.partition(_MARK0)
                if found and 0x10000 <= n < 1 << 32:
                    return b"".join((head, _BIN32(0xC6, n), view, tail))
            packed = splicer.splice(packed)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode message: {exc}") from exc
    finally:
        views.clear()
        _IDLE.append(splicer)  # (as many as callers at once, at most)
    return packed


def unpack_map(
    data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES
) -> dict[str, Any]:
    """Decode one msgpack map of at most `max_bytes`; raise DecodeError for anything else."""
    size = len(data) if type(data) is bytes else memoryview(data).nbytes
    if size > max_bytes:
        raise DecodeError(
            f"payload of {size} bytes exceeds the cap of {max_bytes}", reason="too_large"
        )
    if size == 0:
        raise DecodeError("empty payload", reason="malformed")
    if size >= ZERO_COPY_THRESHOLD:
        value = _FAIL
        # (a bytearray or memoryview: one copy, for the fast paths below and bytes.find)
        raw = data if isinstance(data, bytes) else bytes(data)
        # The common case, tried first: one bin 32 found near the start that ends too near
        # the end for another large binary to follow (what `_cut_and_unpack` would cut).
        at = raw.find(b"\xc6", 0, _CUT_WINDOW)
        stop = size - _BIG_BIN - 3
        if 0 <= at <= stop:
            end = at + 5 + _U32(raw, at + 1)[0]
            if stop < end <= size and end - at - 5 >= _BIG_BIN:
                # the payload's last value: perhaps of a flat map (a tensor's, a chunk's)
                value = flat_map(raw, at) if end == size else None
                if value is None:
                    value = _unpack_one_cut(raw, at, end)
        if value is _FAIL:
            value = _cut_and_unpack(raw)
        if value is _FAIL:  # msgpack's C unpacker on the whole (its binaries copied) ...
            value = _unpack_whole(raw)
        if value is _FAIL:  # ... and only where it fails, the walker: its errors name why
            value = walk(raw)
    else:
        try:
            value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except _MSGPACK_ERRORS as exc:
            raise DecodeError(f"not msgpack: {exc}", reason="malformed") from exc
    if not isinstance(value, dict):
        raise DecodeError(f"payload is a {type(value).__name__}, not a map", reason="malformed")
    return value


# --- large payloads: large binaries cut out, msgpack's C unpacker for the rest --------------
#
# Candidate binary headers (0xc5/0xc6 with a length of 4 KiB or more that fits) are found
# with bytes.find and replaced by placeholders: ext values carrying a secret nonce and their
# ordinal. msgpack parses left to right, deterministically, so if its parse of the result
# meets every placeholder, in order, as a value, each candidate was a binary at a value
# position of the original and the two parses agree, placeholders standing for views of the
# binaries. Anything else (a candidate inside a string, a large binary not cut out, an error)
# gives up, and the walker decides. The result equals the walker's.

_NONCE = os.urandom(12)
_PLACEHOLDER_CODE = 127
_CUT_WINDOW = 4096  # bytes searched per step, so a search never runs far into a binary
_CUT_MAX_MISSES = 64  # candidate headers that turned out implausible before giving up
_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_FAIL: Any = object()


def _placeholder(i: int) -> bytes:  # fixext 16, code 127: the nonce and the ordinal
    return _PLACEHOLDERS[i] if i < 256 else b"\xd8\x7f" + _NONCE + i.to_bytes(4, "little")


_PLACEHOLDERS = [b"\xd8\x7f" + _NONCE + i.to_bytes(4, "little") for i in range(256)]
_unpackb = msgpack.unpackb


def _unpack_whole(data: bytes) -> Any:
    """`data` decoded by msgpack's C unpacker, or `_FAIL`."""
    try:
        return _unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except _MSGPACK_ERRORS:
        return _FAIL


def _unpack_one_cut(data: bytes, at: int, end: int) -> Any:
    """`data` decoded with the binary at `at`..`end` cut out and put back as a view; or _FAIL."""
    return _unpack_cut(data[:at] + _PLACEHOLDERS[0] + data[end:], [memoryview(data)[at + 5 : end]])


def _cut_and_unpack(data: bytes) -> Any:
    """Decode `data` as `walk` would, or return `_FAIL` to leave it to `walk`."""
    size = len(data)
    stop = size - _BIG_BIN - 3  # no large binary fits in a header found past this
    find = data.find
    pieces: list[bytes] = []
    views: list[memoryview] = []
    last = pos = misses = 0
    while pos <= stop:
        limit = pos + _CUT_WINDOW
        if limit > stop:
            limit = stop + 1
        at = find(b"\xc6", pos, limit)
        short = find(b"\xc5", pos, limit if at < 0 else at)
        if short >= 0:
            at, start, n = short, short + 3, _U16(data, short + 1)[0]
        elif at >= 0:
            start, n = at + 5, _U32(data, at + 1)[0]
        else:
            pos = limit
            continue
        end = start + n
        if n < _BIG_BIN or end > size:
            misses += 1
            if misses > _CUT_MAX_MISSES:
                return _FAIL
            pos = at + 1
            continue
        pieces += (data[last:at], _placeholder(len(views)))
        views.append(memoryview(data)[start:end])
        last = pos = end
    pieces.append(data[last:])
    return _unpack_cut(b"".join(pieces), views)


def _unpack_cut(skeleton: bytes, views: list[memoryview]) -> Any:
    """Unpack `skeleton`, each of its placeholders, met in order, standing for its view."""
    met = 0

    def hook(code: int, ext: bytes) -> Any:
        nonlocal met
        if code == _PLACEHOLDER_CODE and ext[:12] == _NONCE:
            i = met
            if i >= len(views) or ext != _placeholder(i)[2:]:
                raise ValueError("placeholder out of order")
            met = i + 1
            return views[i]
        return msgpack.ExtType(code, ext)

    try:
        value = msgpack.unpackb(skeleton, ext_hook=hook, max_bin_len=_BIG_BIN - 1)
    except _MSGPACK_ERRORS:
        return _FAIL
    return value if met == len(views) else _FAIL
