"""msgpack framing: `pack_map` splicing, `unpack_map` paths and the zero-copy walker."""

from __future__ import annotations

import threading
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
    assert wrapped.view.nbytes == array.nbytes
    assert wire.pack_map({"a": wrapped}) == msgpack.packb({"a": array.tobytes()})
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


# --- large payloads: binaries cut out, the rest to msgpack's C unpacker ---------------------


def _big_values() -> list[Any]:
    blob16 = bytes(range(256)) * 20  # 5120 bytes: bin 16
    blob32 = bytes(70_000)  # bin 32
    decoy = "\xc6\x00\x01\x00\x00 and \xc5\x20\x00"  # header bytes inside a string
    return [
        {"a": blob32},
        {"a": blob16, "b": blob32, "c": [blob16, {"d": blob32}], "e": 1.5},
        {"s": decoy, "f": 3.0e-310, "a": blob32, "t": decoy},
        {"pad": ["x" * 30] * 300, "a": blob32, "more": ["y" * 30] * 300, "b": blob16},
        {"ints": [0xC6C6C6C6, 0xC5C5, -0x3A3A3A3A] * 100, "a": blob32},
        {blob16: 1, "a": blob32},  # a large binary as a key
        {"ext": msgpack.ExtType(127, b"\xd8\x7f" * 8), "a": blob32},
        {"ts": msgpack.Timestamp(5, 6), "a": [blob32, blob32, blob32]},
        {"a": blob32, "tail": "z" * 5000},
        {"only": "s" * 70_000},
        {"nested": [[[[blob16]]]], "a": blob32},
    ]


@pytest.mark.parametrize("value", _big_values())
def test_large_payloads_decode_as_msgpack_does(value: Any) -> None:
    data = msgpack.packb(value)
    assert len(data) >= wire.ZERO_COPY_THRESHOLD
    decoded = wire.unpack_map(data)
    assert plain(decoded) == msgpack.unpackb(data)
    assert plain(decoded) == plain(wire.walk(data))

    def views(obj: Any) -> list[Any]:
        if isinstance(obj, dict):
            return [v for item in obj.items() for x in item for v in views(x)]
        if isinstance(obj, list):
            return [v for item in obj for v in views(item)]
        return [obj] if isinstance(obj, bytes | memoryview) and len(obj) >= 4096 else []

    for binary in views(decoded):
        if binary is not None and not isinstance(binary, bytes):  # keys are bytes
            assert isinstance(binary, memoryview)
            assert binary.obj is data


def _no_walker(monkeypatch: pytest.MonkeyPatch) -> None:
    def walk(data: object) -> None:
        raise AssertionError("the pure-Python walker was used (several times slower)")

    monkeypatch.setattr(wire, "walk", walk)


def test_many_false_headers_fall_back_to_msgpacks_unpacker_not_the_walker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # More implausible candidate headers than the cutter tries (a sender can place them):
    # msgpack's C unpacker decides, several times faster than the walker.
    value = {"junk": [b"\xc5\x00\x01"] * 200, "b": bytes(5000), "a": bytes(70_000)}
    data = msgpack.packb(value)
    assert wire._cut_and_unpack(data) is wire._FAIL
    _no_walker(monkeypatch)
    assert plain(wire.unpack_map(data)) == msgpack.unpackb(data)


def test_large_payload_given_as_a_view_or_bytearray(monkeypatch: pytest.MonkeyPatch) -> None:
    data = msgpack.packb({"a": bytes(70_000), "b": "x"})
    _no_walker(monkeypatch)  # (they take the fast paths too)
    for given_as in (memoryview(data), bytearray(data)):
        assert plain(wire.unpack_map(given_as)) == msgpack.unpackb(data)


@pytest.mark.parametrize("cut", [1, 5, 40, 70_000, 70_040])
def test_truncated_large_payloads(cut: int) -> None:
    data = msgpack.packb({"a": bytes(70_000), "b": "tail"})
    with pytest.raises(DecodeError):
        wire.unpack_map(data[:-cut] if cut < len(data) else data[:1])
    with pytest.raises(DecodeError):
        wire.unpack_map(data + b"\x00")


def test_pack_map_recovers_after_an_error_and_is_thread_safe() -> None:
    blob = bytes(range(256)) * 300
    with pytest.raises(EncodeError):
        wire.pack_map({"a": wire.big(blob), "b": object()})
    assert wire.pack_map({"a": wire.big(blob)}) == msgpack.packb({"a": blob})
    results: list[bool] = []

    def work(seed: int) -> None:
        blobs = [bytes([seed, i]) * 3000 for i in range(5)]
        for _ in range(200):
            packed = wire.pack_map({"n": seed, "l": [wire.big(b) for b in blobs]})
            results.append(packed == msgpack.packb({"n": seed, "l": blobs}))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 800
    assert all(results)
