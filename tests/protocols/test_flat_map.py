"""`flat_map`, the one-pass reader of large flat maps, and the single-cut path of `unpack_map`:
both must give exactly what the walker (the reference) gives, or decline."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import schema, wire
from protocols.errors import DecodeError
from protocols.messages import BlobChunk, ModelUpdate, encode
from protocols.msgpack_walk import flat_map
from protocols.tensors import WireTensor, decode_tensor, encode_dense
from tests.protocols.golden_samples import plain, same

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BLOB = bytes(range(256)) * 300  # 76,800 bytes: a bin 32


def _at(data: bytes) -> int:
    """Where `unpack_map` looks for the large binary: the first bin 32 header byte."""
    return data.find(b"\xc6", 0, 4096)


def _tensor_payload() -> bytes:
    array = np.arange(70_000, dtype=np.float32).reshape(700, 100)
    return wire.pack_map(schema.to_map(encode_dense("layer.weight", array)))


def _chunk_payload() -> bytes:
    chunk = BlobChunk("ab" * 32, 3, 9, 9 * len(BLOB), len(BLOB), BLOB)
    return encode(chunk)


@pytest.mark.parametrize("data", [_tensor_payload(), _chunk_payload()], ids=["tensor", "chunk"])
def test_a_tensor_and_a_blob_chunk_are_read_in_one_pass(data: bytes) -> None:
    read = flat_map(data, _at(data))
    assert read is not None
    assert plain(read) == plain(wire.walk(data)) == plain(msgpack.unpackb(data))
    last = list(read.values())[-1]
    assert isinstance(last, memoryview)
    assert last.obj is data
    assert last.readonly
    decoded = wire.unpack_map(data)
    assert plain(decoded) == plain(read)


def test_a_decoded_tensor_is_a_view_of_the_payload() -> None:
    data = _tensor_payload()
    tensor = schema.from_map(WireTensor, wire.unpack_map(data))
    out = decode_tensor(tensor)
    assert out.shape == (700, 100)
    assert np.array_equal(out.reshape(-1), np.arange(70_000, dtype=np.float32))
    assert not out.flags.writeable


@pytest.mark.parametrize(
    "fields",
    [
        {"nested": {"a": 1}, "data": BLOB},  # a map value
        {"neg": -1, "data": BLOB},  # negative integers are left to msgpack
        {"f32": [1.5], "data": BLOB},  # an array of floats
        {"wide": [1 << 40], "data": BLOB},  # an array element past 32 bits
        {"data": BLOB, "after": 1},  # the binary is not the last value
        {"k" * 40: 1, "data": BLOB},  # a key longer than a fixstr
        {b"bytes-key": 1, "data": BLOB},  # a binary key
        {"long": "s" * 300, "data": BLOB},  # a str 16
        {"small": b"x", "data": BLOB},  # a small binary
        {str(i): i for i in range(16)} | {"data": BLOB},  # a map 16
        {"ts": msgpack.Timestamp(1, 2), "data": BLOB},  # an extension value
    ],
)
def test_other_maps_are_declined_and_decoded_by_the_other_paths(fields: dict[Any, Any]) -> None:
    data = msgpack.packb(fields)
    assert flat_map(data, _at(data)) is None
    assert plain(wire.unpack_map(data)) == plain(msgpack.unpackb(data)) == plain(wire.walk(data))


def test_a_header_byte_inside_an_earlier_value_is_not_taken_for_the_binary() -> None:
    # 0xc6 first appears inside the string and the integer, not at the binary
    for fields in ({"s": "\u0180" * 3, "data": BLOB}, {"n": 0xC6000000, "data": BLOB}):
        data = msgpack.packb(fields)
        assert data.index(b"\xc6") < data.rindex(b"\xc6")
        assert flat_map(data, _at(data)) is None
        assert plain(wire.unpack_map(data)) == plain(msgpack.unpackb(data))


def test_a_nested_binary_takes_the_single_cut_path() -> None:
    array = np.arange(20_000, dtype=np.float32)
    data = encode(ModelUpdate("d", "j", 1, "v", 2, 3, (encode_dense("w", array),)))
    assert flat_map(data, _at(data)) is None  # the tensors are inside an array
    decoded = wire.unpack_map(data)
    view = decoded["tensors"][0]["data"]
    assert isinstance(view, memoryview)
    assert view.obj is data
    assert plain(decoded) == plain(msgpack.unpackb(data))


@pytest.mark.parametrize("depth", [40, 1000, 1023])
def test_deep_nesting_before_the_binary_still_decodes_or_is_refused(depth: int) -> None:
    # msgpack's C unpacker takes up to 1,024 levels; putting the view back must not recurse
    data = b"\x82\xa4deep" + b"\x91" * depth + b"\x01\xa1a" + msgpack.packb(BLOB)
    try:
        decoded = wire.unpack_map(data)
    except DecodeError:
        return
    assert list(decoded) == ["deep", "a"]
    assert bytes(decoded["a"]) == BLOB
    assert decoded["a"].obj is data


_SCALARS = st.one_of(
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.text(max_size=40),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, (1 << 33)), max_size=17),
    st.binary(max_size=8),
)
_FLAT = st.dictionaries(st.text(max_size=33), _SCALARS, max_size=16)


@st.composite
def _payloads(draw: st.DrawFn) -> bytes:
    fields = draw(_FLAT)
    fields[draw(st.text(max_size=33))] = BLOB
    data: bytes = msgpack.packb(fields)
    cut = draw(st.sampled_from([None, "flip", "truncate", "insert"]))
    if cut is None:
        return data
    at = draw(st.integers(0, min(len(data) - 1, 400)))
    if cut == "flip":
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    if cut == "truncate":
        return data[: at + 1]
    return data[:at] + draw(st.binary(min_size=1, max_size=6)) + data[at:]


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # (a failure's report)
@PROPERTY
@given(_payloads())
def test_flat_map_gives_what_the_walker_gives_or_declines(data: bytes) -> None:
    at = _at(data)
    read = flat_map(data, at) if at >= 0 else None
    try:
        walked = wire.walk(data)
    except DecodeError:
        assert read is None
        return
    if read is not None:
        assert same(read, walked)
    if len(data) < wire.ZERO_COPY_THRESHOLD:
        return
    if isinstance(walked, dict):
        assert same(wire.unpack_map(data, 1 << 20), walked)
    else:  # (a flipped first byte: an array, say)
        with pytest.raises(DecodeError, match="not a map"):
            wire.unpack_map(data, 1 << 20)
