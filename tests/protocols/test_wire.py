"""msgpack framing: `pack_map` splicing, `unpack_map` paths and the zero-copy walker."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from protocols import wire
from protocols.errors import DecodeError, EncodeError
from tests.protocols.golden_samples import plain

SIZES = [0, 1, 255, 256, 4095, 4096, 65535, 65536, 70000]


@pytest.mark.parametrize("size", SIZES)
def test_pack_map_is_byte_identical_to_msgpack(size: int) -> None:
    blob = bytes(i % 253 for i in range(size))
    fields = {"v": 1, "kind": "x", "a": blob, "nested": [{"b": blob, "c": 1.5}], "z": "end"}
    wrapped = {
        "v": 1,
        "kind": "x",
        "a": wire.big(blob),
        "nested": [{"b": wire.big(memoryview(blob)), "c": 1.5}],
        "z": "end",
    }
    assert wire.pack_map(wrapped) == msgpack.packb(fields)


def test_big_wraps_only_large_binaries() -> None:
    assert wire.big(b"abc") == b"abc"
    assert wire.big(bytearray(b"abc")) == b"abc"
    large = wire.big(bytes(5000))
    assert isinstance(large, wire.BigBinary)
    array = np.arange(2000, dtype=np.float32).reshape(40, 50)
    wrapped = wire.big(array.data)
    assert isinstance(wrapped, wire.BigBinary)
    assert wrapped.view.format == "B"
    assert wrapped.view.nbytes == array.nbytes
    with pytest.raises(EncodeError):
        wire.big(array.T.data)  # not C-contiguous
    small_strided = wire.big(np.arange(10, dtype=np.float32)[::2].data)
    assert small_strided == np.arange(10, dtype=np.float32)[::2].tobytes()


def test_pack_map_refuses_foreign_values() -> None:
    with pytest.raises(EncodeError):
        wire.pack_map({"x": object()})
    with pytest.raises(EncodeError):
        wire.pack_map({"x": {1, 2}})


def test_pack_map_many_big_binaries_in_order() -> None:
    blobs = [bytes([i % 256]) * (4096 + i) for i in range(600)]
    packed = wire.pack_map({"list": [wire.big(b) for b in blobs]})
    assert packed == msgpack.packb({"list": blobs})


@pytest.mark.parametrize("size", SIZES)
def test_unpack_map_paths_agree(size: int) -> None:
    fields = {"v": 1, "blob": bytes(size), "pad": "x" * 10, "n": [None, True, -1, 2**64 - 1]}
    data = msgpack.packb(fields)
    decoded = wire.unpack_map(data)
    assert plain(decoded) == fields
    assert plain(wire.walk(data)) == fields
    assert plain(wire.unpack_map(bytearray(data))) == fields
    assert plain(wire.unpack_map(memoryview(data))) == fields


def test_walker_returns_read_only_views_of_large_binaries() -> None:
    data = msgpack.packb({"small": bytes(4095), "large": bytes(range(256)) * 16})
    value = wire.walk(data)
    assert type(value["small"]) is bytes
    large = value["large"]
    assert isinstance(large, memoryview)
    assert large.readonly
    assert large.obj is data
    assert large.tobytes() == bytes(range(256)) * 16


def test_walker_views_of_mutable_input_are_read_only() -> None:
    data = bytearray(msgpack.packb({"large": bytes(5000)}))
    large = wire.walk(data)["large"]
    assert large.readonly
    with pytest.raises(TypeError):
        large[0] = 1


def test_walker_accepts_non_contiguous_and_typed_input() -> None:
    data = msgpack.packb({"a": [1, 2, 3]})
    strided = memoryview(bytes(b for pair in zip(data, data, strict=True) for b in pair))[::2]
    assert not strided.c_contiguous
    assert wire.walk(strided) == {"a": [1, 2, 3]}
    padded = data + bytes(-len(data) % 4)
    with pytest.raises(DecodeError):  # trailing zero bytes
        wire.walk(np.frombuffer(padded, dtype=np.uint32).data)


@pytest.mark.parametrize(
    "value",
    [
        msgpack.ExtType(5, b"abc"),
        msgpack.ExtType(0, b""),
        msgpack.ExtType(127, bytes(16)),
        msgpack.ExtType(1, bytes(70000)),
        msgpack.Timestamp(1, 0),
        msgpack.Timestamp(2**33, 999_999_999),
        msgpack.Timestamp(-5, 7),
    ],
)
def test_walker_reads_extension_types_like_msgpack(value: Any) -> None:
    data = msgpack.packb({"x": [value]})
    assert wire.walk(data) == msgpack.unpackb(data)


@pytest.mark.parametrize("data", [b"\xd4\xfb\x00", b"\xd4\x80\x00", b"\xc7\x00\xfe"])
def test_walker_rejects_reserved_extension_types(data: bytes) -> None:
    with pytest.raises(ValueError, match="code must be"):
        msgpack.unpackb(data)
    with pytest.raises(DecodeError):
        wire.walk(data)


def test_walker_rejects_a_bad_timestamp() -> None:
    with pytest.raises(DecodeError):
        wire.walk(b"\xd5\xff\x00\x01")  # 2-byte timestamp
    with pytest.raises(DecodeError):
        wire.walk(b"\xd7\xff\xff\xff\xff\xff\x00\x00\x00\x00")  # nanoseconds > 999999999


def test_walker_map_keys_like_msgpack() -> None:
    data = msgpack.packb({b"bin": 1, "str": 2, bytes(5000): 3})
    assert wire.walk(data) == msgpack.unpackb(data)
    for key in (1, 1.5, None, True):
        bad = b"\x81" + msgpack.packb(key) + b"\x01"
        with pytest.raises(DecodeError):
            wire.walk(bad)
        with pytest.raises(ValueError, match="not allowed for map key"):
            msgpack.unpackb(bad)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        b"\x81\xa1a",
        b"\xda\x00\x05abc",
        b"\xc6\xff\xff\xff\xff",
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xc9\x00\x00\x00\x05\x01abc",
        b"\xcb\x00\x00",
        b"\xa2\xff\xfe",
        b"\x01\x02",
        b"\x91" * 100 + b"\x01",
        b"\x81\xa1a" * 50 + b"\x01",
    ],
)
def test_walker_rejects_malformed_input(data: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.walk(data)


def test_walker_depth_limit() -> None:
    shallow = b"\x91" * 32 + b"\x01"
    assert wire.walk(shallow) == msgpack.unpackb(shallow)
    with pytest.raises(DecodeError, match="deeply"):
        wire.walk(b"\x91" * 33 + b"\x01")
    with pytest.raises(DecodeError, match="deeply"):
        wire.walk(b"\x81\xa1a" * 33 + b"\x01")


def test_unpack_map_rejects_non_maps_and_empty() -> None:
    for data in (b"", msgpack.packb([1]), msgpack.packb("x"), msgpack.packb([bytes(70000)])):
        with pytest.raises(DecodeError) as info:
            wire.unpack_map(data)
        assert info.value.reason == "malformed"
