"""Hypothesis fuzzing of every decoder: whatever the bytes, only `DecodeError` gets out."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import messages, schema, tensors, wire
from protocols.chunks import Reassembly, split_blob
from protocols.errors import DecodeError
from protocols.messages import MESSAGE_TYPES, BlobChunk, ModelUpdate
from protocols.tensors import WireTensor, decode_sparse, decode_tensor, encode_dense
from tests.protocols.golden_samples import golden_path, plain, same

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KINDS = sorted(cls.KIND for cls in MESSAGE_TYPES)
GOLDEN = {kind: golden_path(kind).read_bytes() for kind in KINDS}
_MAX_ELEMENTS = 1 << 20  # what a receiver would pass; keeps dense sparse-decodes small here


def _large(kind: str) -> bytes:
    """The golden payload grown past the zero-copy threshold by an unknown trailing field."""
    fields = msgpack.unpackb(GOLDEN[kind])
    fields["zz_pad"] = bytes(wire.ZERO_COPY_THRESHOLD)
    data: bytes = msgpack.packb(fields)
    return data


def _big_update() -> bytes:
    array = np.arange(wire.ZERO_COPY_THRESHOLD // 4 + 10, dtype=np.float32)
    small = encode_dense("b", np.arange(3, dtype=np.float32))
    tensors_ = (small, encode_dense("w", array), encode_dense("q", array[:5000], "i8"))
    return messages.encode(ModelUpdate("d", "j", 1, "v", 2, 3, tensors_))


def _tensor_map() -> bytes:  # a bare tensor's map: read by the flat reader when intact
    array = np.arange(wire.ZERO_COPY_THRESHOLD // 4 + 10, dtype=np.float32).reshape(2, -1)
    return wire.pack_map(schema.to_map(encode_dense("w", array)))


LARGE = {
    **{kind: _large(kind) for kind in KINDS},
    "big_update": _big_update(),
    "tensor_map": _tensor_map(),
}
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3]
INTERESTING += [*range(0xC4, 0xE0), 0xE0, 0xFF]


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` with a few bit flips, byte changes, insertions, deletions or a truncation."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        if n == 0:
            break
        pos = draw(
            st.one_of(
                st.integers(0, min(n - 1, 600)),  # headers and small fields
                st.integers(max(0, n - 64), n - 1),  # the tail
                st.integers(0, n - 1),
            )
        )
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


def _exercise(message: messages.Message) -> None:
    """Run a decoded message through the decoders a receiver would use next."""
    for name in ("tensors", "inputs", "outputs"):
        for t in getattr(message, name, ()):
            if isinstance(t, WireTensor):
                decode_tensor(t, _MAX_ELEMENTS)
                if t.is_sparse:
                    decode_sparse(t, _MAX_ELEMENTS)
    if isinstance(message, BlobChunk):
        r = Reassembly(message, max_size=1 << 20)
        r.add(message)
        r.missing()
        if r.complete:
            r.result()


def _total(data: bytes, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> None:
    """Decode `data` every way there is; anything but DecodeError fails the test."""
    with contextlib.suppress(DecodeError):
        _exercise(messages.decode(data, max_bytes))
    for decoder in (wire.walk, wire.unpack_map):
        with contextlib.suppress(DecodeError):
            decoder(data)


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 1024))
def test_random_bytes(data: bytes, max_bytes: int) -> None:
    _total(data)
    _total(data, max_bytes)


@FUZZ
@given(st.sampled_from(KINDS).flatmap(lambda kind: mutated(GOLDEN[kind])))
def test_mutated_golden_payloads(data: bytes) -> None:
    _total(data)


@FEW
@given(st.sampled_from(sorted(LARGE)).flatmap(lambda kind: mutated(LARGE[kind])))
def test_mutated_large_payloads_through_the_zero_copy_walker(data: bytes) -> None:
    _total(data)
    _same_as_the_walker(data)


def _same_as_the_walker(data: bytes) -> None:
    """Large payloads decode to what the walker gives (binaries cut out or not)."""
    try:
        walked = wire.walk(data)
    except DecodeError as exc:
        walked = exc
    try:
        unpacked = plain(wire.unpack_map(data))
    except DecodeError:
        assert isinstance(walked, DecodeError) or not isinstance(walked, dict)
        return
    if isinstance(walked, DecodeError):  # msgpack itself allows deeper nesting
        assert "deeply" in str(walked)
    else:
        assert same(unpacked, walked)


def _msgpack_values(big: bool = False, leaves: int = 12) -> st.SearchStrategy[Any]:
    """Arbitrary msgpack-able values; with `big`, some binaries past the walker's view size."""
    binaries = st.binary(max_size=40)
    if big:
        binaries |= st.integers(4090, 4200).map(lambda n: bytes(range(256)) * (n // 256 + 1))
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=12)
        | binaries
        | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20))
        | st.builds(msgpack.Timestamp, st.integers(-(2**34), 2**34), st.integers(0, 999_999_999))
    )
    keys = st.text(max_size=6) | st.binary(max_size=6)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=leaves,
    )


def _field_values(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """Maps with this kind's field names (and some others) holding arbitrary values."""
    names = [f.name for f in dataclasses.fields(cls)] + ["shape", "data", "indices", "name"]
    return st.dictionaries(st.sampled_from(names), _msgpack_values(leaves=6), max_size=len(names))


@FEW
@given(
    st.sampled_from(MESSAGE_TYPES).flatmap(
        lambda cls: st.tuples(st.just(cls), _field_values(cls), st.integers(0, 2))
    )
)
def test_structured_maps_with_wrong_values(case: tuple[Any, dict[str, Any], int]) -> None:
    cls, fields, version = case
    _total(msgpack.packb({"v": version, "kind": cls.KIND, **fields}))


@FEW
@given(st.sampled_from(KINDS), st.data())
def test_golden_fields_replaced_by_arbitrary_values(kind: str, data: st.DataObject) -> None:
    fields = msgpack.unpackb(GOLDEN[kind])
    name = data.draw(st.sampled_from(sorted(fields)))
    fields[name] = data.draw(_msgpack_values())
    _total(msgpack.packb(fields))


# --- tensors, varints and chunks built directly --------------------------------------------

_dims = st.integers(-2, 3) | st.integers(0, 2**64 - 1) | st.sampled_from([0, 1 << 20, 1 << 40])
wire_tensors = st.builds(
    WireTensor,
    name=st.text(max_size=4),
    dtype=st.sampled_from([*tensors.DTYPES, "f64", ""]),
    shape=st.lists(_dims, max_size=10).map(tuple),
    data=st.binary(max_size=64),
    scale=st.floats(allow_nan=True, allow_infinity=True),
    zero_point=st.integers(-200, 200),
    indices=st.none() | st.binary(max_size=24),
)


@FUZZ
@given(wire_tensors)
def test_tensor_decoders_are_total(t: WireTensor) -> None:
    for decoder in (decode_tensor, decode_sparse):
        try:
            out = decoder(t, _MAX_ELEMENTS)
        except DecodeError:
            continue
        if decoder is decode_tensor:
            assert isinstance(out, np.ndarray)
            assert out.shape == t.shape


@FUZZ
@given(
    st.sampled_from(["f32", "f16", "bf16", "i8"]),
    st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
    st.data(),
)
def test_consistent_tensors_always_decode(
    dtype: str, shape: tuple[int, ...], data: st.DataObject
) -> None:
    size = math.prod(shape)
    itemsize = tensors.DTYPES[dtype].itemsize
    payload = data.draw(st.binary(min_size=size * itemsize, max_size=size * itemsize))
    t = WireTensor("w", dtype, shape, payload, data.draw(st.floats(0, 1e30)))
    assert decode_tensor(t).shape == shape


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 100))
def test_varint_decode_is_total(buf: bytes, limit: int) -> None:
    try:
        out = tensors.varint_decode(buf, limit)
    except DecodeError:
        return
    assert out.size <= limit
    assert np.all(out >= 0)
    assert np.all(out < 2**35)


@FUZZ
@given(st.lists(st.integers(0, 2**35 - 1), max_size=50))
def test_varint_round_trip(values: list[int]) -> None:
    encoded = tensors.varint_encode(np.array(values, dtype=np.uint64))
    assert tensors.varint_decode(encoded.tobytes(), len(values)).tolist() == values


_header_ints = st.integers(-3, 300) | st.integers(-(2**64), 2**64)
blob_chunks = st.builds(
    BlobChunk,
    blob_sha256=st.sampled_from(["a" * 64, "A" * 64, "", "g" * 64]) | st.text(max_size=70),
    index=_header_ints,
    count=_header_ints,
    size=_header_ints,
    chunk_size=_header_ints,
    data=st.binary(max_size=300),
)


@FUZZ
@given(blob_chunks, st.lists(blob_chunks, max_size=6))
def test_reassembly_is_total(first: BlobChunk, rest: list[BlobChunk]) -> None:
    try:
        r = Reassembly(first, max_size=4096)
    except DecodeError:
        return
    for chunk in [first, *rest]:
        with contextlib.suppress(DecodeError):
            r.add(chunk)
    assert set(r.missing()) <= set(range(r.count))
    with contextlib.suppress(DecodeError):
        r.result()


@FUZZ
@given(st.binary(max_size=2000), st.integers(1, 300), st.randoms(use_true_random=False))
def test_reassembly_of_a_shuffled_split_blob(blob: bytes, chunk_size: int, rng: Any) -> None:
    parts = list(split_blob(blob, chunk_size))
    feed = parts + [rng.choice(parts) for _ in range(3)]
    rng.shuffle(feed)
    r = Reassembly(feed[0])
    for part in feed:
        r.add(part)
    assert r.result() == blob


# --- the walker against msgpack's own unpacker ----------------------------------------------


@FUZZ
@given(_msgpack_values(big=True))
def test_walker_equals_msgpack(value: Any) -> None:
    data = msgpack.packb(value)
    assert plain(wire.walk(data)) == msgpack.unpackb(data)
    try:
        single = msgpack.packb(value, use_single_float=True)
    except OverflowError:  # a double beyond float32's range
        return
    assert plain(wire.walk(single)) == msgpack.unpackb(single)


@FEW
@given(st.dictionaries(st.text(max_size=8), _msgpack_values(big=True), max_size=6))
def test_unpack_map_paths_equal(fields: dict[str, Any]) -> None:
    small = msgpack.packb(fields)
    fields["zz_pad"] = bytes(wire.ZERO_COPY_THRESHOLD)
    large = msgpack.packb(fields)
    assert plain(wire.unpack_map(small)) == msgpack.unpackb(small)
    assert plain(wire.unpack_map(large)) == msgpack.unpackb(large)


def test_walker_nan() -> None:
    value = wire.walk(msgpack.packb([float("nan")]))
    assert math.isnan(value[0])


@pytest.mark.parametrize("kind", KINDS)
def test_large_golden_payloads_decode(kind: str) -> None:
    assert plain(messages.decode(LARGE[kind])) == plain(messages.decode(GOLDEN[kind]))
