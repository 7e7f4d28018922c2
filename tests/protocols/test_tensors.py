"""Tensor codec: dense and sparse round trips with error bounds, zero copy, and rejections."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import numpy.typing as npt
import pytest

from protocols import messages, tensors
from protocols.errors import DecodeError, EncodeError
from protocols.messages import ModelUpdate
from protocols.tensors import (
    WireTensor,
    decode_sparse,
    decode_tensor,
    encode_dense,
    encode_sparse,
    varint_decode,
    varint_encode,
)

SHAPES = [(), (0,), (1,), (7,), (3, 4), (2, 0, 3), (2, 3, 4, 5)]
F32 = npt.NDArray[np.float32]


def _values(shape: tuple[int, ...], seed: int = 0) -> F32:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3).astype(np.float32)


def _via_wire(t: WireTensor) -> WireTensor:
    """`t` after a trip through a real message (so data comes back as the wire hands it)."""
    update = messages.decode_as(
        ModelUpdate, messages.encode(ModelUpdate("d", "j", 0, "v", 0, 1, (t,)))
    )
    return update.tensors[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_f32_round_trip_is_exact(shape: tuple[int, ...]) -> None:
    values = _values(shape)
    t = encode_dense("w", values)
    assert (t.dtype, t.shape, t.is_sparse, t.nbytes) == ("f32", shape, False, values.nbytes)
    for wire_t in (t, _via_wire(t)):
        out = decode_tensor(wire_t)
        assert out.dtype == np.float32
        assert out.shape == shape
        np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("shape", SHAPES)
def test_f16_round_trip_within_half_precision(shape: tuple[int, ...]) -> None:
    values = _values(shape)
    out = decode_tensor(_via_wire(encode_dense("w", values, "f16")))
    assert out.shape == shape
    np.testing.assert_allclose(out, values, rtol=2**-11, atol=2**-24)


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_round_trip_within_bfloat_precision(shape: tuple[int, ...]) -> None:
    values = _values(shape)
    t = encode_dense("w", values, "bf16")
    assert t.nbytes == 2 * values.size
    out = decode_tensor(_via_wire(t))
    assert out.dtype == np.float32
    assert out.shape == shape
    np.testing.assert_allclose(out, values, rtol=2**-8, atol=0)


def test_bf16_rounds_to_nearest_even_and_keeps_specials() -> None:
    bits = np.array(
        [0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7F800000, 0xFF800000],
        dtype=np.uint32,
    )
    out = decode_tensor(encode_dense("w", bits.view(np.float32), "bf16"))
    expected = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x7F80, 0xFF80]
    assert (out.view(np.uint32) >> 16).tolist() == expected


@pytest.mark.parametrize("nan_bits", [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFC00000])
def test_bf16_keeps_nan_a_nan(nan_bits: int) -> None:
    values = np.array([nan_bits, 0x3F800000], dtype=np.uint32).view(np.float32)
    out = decode_tensor(encode_dense("w", values, "bf16"))
    assert np.isnan(out[0])
    assert np.signbit(out[0]) == np.signbit(values[0])
    assert out[1] == 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_i8_round_trip_within_half_a_step(shape: tuple[int, ...]) -> None:
    values = _values(shape)
    t = encode_dense("w", values, "i8")
    assert t.nbytes == values.size
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    assert t.scale == pytest.approx(peak / 127 if peak else 1.0)
    out = decode_tensor(_via_wire(t))
    assert out.dtype == np.float32
    assert out.shape == shape
    np.testing.assert_allclose(out, values, rtol=0, atol=t.scale * 0.5001)


@pytest.mark.parametrize("scale", [1e-45, 1e-40, 1e-38, 1e30, 3.4e38])
def test_i8_extreme_magnitudes(scale: float) -> None:
    values = np.array([1.0, -0.5, 0.25, 0.0], dtype=np.float32) * np.float32(scale)
    t = encode_dense("w", values, "i8")
    out = decode_tensor(t)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, values, rtol=0, atol=t.scale * 0.5001)


def test_i8_overflowing_float32_is_inf_without_a_warning() -> None:
    peak = float(np.finfo(np.float32).max)
    t = WireTensor("w", "i8", (2,), np.array([-128, 127], dtype=np.int8).tobytes(), peak, 127)
    assert decode_tensor(t).tolist() == [-np.inf, 0.0]


def test_i8_with_zero_point() -> None:
    t = WireTensor("w", "i8", (3,), np.array([-10, 0, 10], dtype=np.int8).tobytes(), 0.5, 10)
    np.testing.assert_array_equal(decode_tensor(t), [-10.0, -5.0, 0.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_i8_refuses_non_finite_values(bad: float) -> None:
    with pytest.raises(EncodeError):
        encode_dense("w", np.array([1.0, bad], dtype=np.float32), "i8")
    with pytest.raises(EncodeError):
        encode_sparse("w", (4,), [1, 2], [1.0, bad], "i8")


def test_float_codecs_carry_nan_and_inf_for_the_receiver_to_see() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    for dtype in ("f32", "f16", "bf16"):
        out = decode_tensor(encode_dense("w", values, dtype))
        assert np.isnan(out[0])
        assert out[1:].tolist() == [np.inf, -np.inf, 1.0]


def test_f16_overflow_becomes_inf_without_a_warning() -> None:
    out = decode_tensor(encode_dense("w", np.array([1e5, -1e6, 65504.0], dtype=np.float32), "f16"))
    assert out.tolist() == [np.inf, -np.inf, 65504.0]


def test_encode_dense_accepts_other_inputs() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    for source in (base, base.T, base.tolist(), base.astype(np.int32), base[:, ::2]):
        expected = np.asarray(source, dtype=np.float32)
        np.testing.assert_array_equal(decode_tensor(encode_dense("w", source)), expected)
    big_endian = np.arange(5, dtype=">f4")
    np.testing.assert_array_equal(decode_tensor(_via_wire(encode_dense("w", big_endian))), range(5))


def test_unknown_dtype_is_an_encode_error() -> None:
    with pytest.raises(EncodeError, match="dtype"):
        encode_dense("w", [1.0], "f64")
    with pytest.raises(EncodeError, match="dtype"):
        encode_sparse("w", (3,), [1], [1.0], "int4")


def test_f32_encode_is_zero_copy() -> None:
    values = np.arange(4096, dtype=np.float32)
    t = encode_dense("w", values)
    assert np.shares_memory(np.frombuffer(t.data, dtype=np.uint8), values)


def test_f32_decode_is_zero_copy() -> None:
    values = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    payload = messages.encode(ModelUpdate("d", "j", 0, "v", 0, 1, (encode_dense("w", values),)))
    t = messages.decode_as(ModelUpdate, payload).tensors[0]
    out = decode_tensor(t)
    assert np.shares_memory(out, np.frombuffer(payload, dtype=np.uint8))
    base: object = out
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, memoryview)
    assert base.obj is payload
    assert not out.flags.writeable
    np.testing.assert_array_equal(out, values)


# --- sparse ----------------------------------------------------------------------------------

SPARSE_CASES = [
    ((10,), [0]),
    ((10,), [9]),
    ((10,), []),
    ((0,), []),
    ((3, 4), [0, 1, 2, 11]),
    ((1 << 24,), [0, 1, (1 << 21) + 5, (1 << 23), (1 << 24) - 1]),
    ((4096, 4096), [3, (1 << 22) + 7, (1 << 24) - 1]),
    ((128,), list(range(128))),
]


@pytest.mark.parametrize(("shape", "indices"), SPARSE_CASES)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "i8"])
def test_sparse_round_trip(shape: tuple[int, ...], indices: list[int], dtype: str) -> None:
    values = np.linspace(-2, 2, len(indices), dtype=np.float32)
    t = _via_wire(encode_sparse("s", shape, indices, values, dtype))
    assert t.is_sparse
    assert t.shape == shape
    idx, vals = decode_sparse(t)
    assert idx.dtype == np.int64
    assert idx.tolist() == indices
    tolerance = {"f32": 0.0, "f16": 2e-3, "bf16": 2e-2, "i8": t.scale * 0.5001}[dtype]
    np.testing.assert_allclose(vals, values, rtol=0, atol=tolerance)
    if np.prod(shape) <= 1 << 20:
        dense = decode_tensor(t)
        assert dense.shape == shape
        assert dense.dtype == np.float32
        expected = np.zeros(shape, dtype=np.float32).reshape(-1)
        expected[indices] = vals
        np.testing.assert_array_equal(dense.reshape(-1), expected)


def test_sparse_indices_are_delta_varints() -> None:
    t = encode_sparse("s", (1 << 30,), [0, 1, 129, 129 + (1 << 21)], [1, 2, 3, 4], "f32")
    assert t.indices == bytes([0x00, 0x01, 0x80, 0x01, 0x80, 0x80, 0x80, 0x01])
    empty = encode_sparse("s", (5,), [], [], "i8")
    assert (empty.indices, bytes(empty.data), empty.scale) == (b"", b"", 1.0)


def test_sparse_shape_is_plain_ints() -> None:
    t = encode_sparse("s", tuple(np.array([2, 3])), [1], [1.0], "f32")
    assert all(type(d) is int for d in t.shape)
    assert decode_tensor(_via_wire(t)).shape == (2, 3)


@pytest.mark.parametrize(
    ("indices", "values"),
    [([1, 1], [1, 2]), ([2, 1], [1, 2]), ([-1], [1]), ([10], [1]), ([1, 2], [1]), ([1], [1, 2])],
)
def test_encode_sparse_rejects_bad_indices(indices: list[int], values: list[float]) -> None:
    with pytest.raises(EncodeError):
        encode_sparse("s", (10,), indices, values, "f32")


def _sparse(indices: bytes, data: bytes, shape: tuple[int, ...] = (10,)) -> WireTensor:
    return WireTensor("s", "i8", shape, data, 1.0, 0, indices)


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [
        (_sparse(b"\x01\x00", b"\x01\x02"), "bad_tensor"),  # repeated index
        (_sparse(b"\x0a", b"\x01"), "bad_tensor"),  # index 10 of 10
        (_sparse(b"\x05\x05", b"\x01\x02"), "bad_tensor"),  # 5 + 5 = 10
        (_sparse(b"\x01\x02", b"\x01"), "bad_tensor"),  # fewer values than indices
        (_sparse(b"\x01", b"\x01\x02"), "bad_tensor"),  # more values than indices
        (_sparse(b"\x81", b"\x01"), "bad_tensor"),  # truncated varint
        (_sparse(b"\x80\x80\x80\x80\x80\x00", b"\x01"), "bad_tensor"),  # 6-byte varint
        (_sparse(bytes(11), bytes(11)), "bad_tensor"),  # more indices than elements
        (_sparse(b"", b"", (0, 1 << 40)), "too_large"),
        (_sparse(b"", b"", (-1,)), "bad_tensor"),
    ],
)
def test_decode_sparse_rejects_inconsistent_tensors(tensor: WireTensor, reason: str) -> None:
    for decoder in (decode_sparse, decode_tensor):
        with pytest.raises(DecodeError) as info:
            decoder(tensor)
        assert info.value.reason == reason


def test_decode_sparse_refuses_a_dense_tensor() -> None:
    with pytest.raises(DecodeError, match="dense"):
        decode_sparse(encode_dense("w", [1.0]))


def _dense(**changes: object) -> WireTensor:
    base = WireTensor("w", "f32", (2, 2), bytes(16))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [
        (_dense(data=bytes(15)), "bad_tensor"),
        (_dense(data=bytes(17)), "bad_tensor"),
        (_dense(shape=(2, 3)), "bad_tensor"),
        (_dense(shape=(-2, -2)), "bad_tensor"),
        (_dense(shape=(1,) * 9, data=bytes(4)), "bad_tensor"),
        (_dense(dtype="f64"), "bad_tensor"),
        (_dense(dtype="F32"), "bad_tensor"),
        (_dense(shape=(1 << 14, 1 << 15), data=b""), "too_large"),
        (_dense(shape=(0, 1 << 62), data=b""), "too_large"),
        (_dense(shape=(0, 1 << 20, 1 << 20, 1 << 20), data=b""), "too_large"),
        (_dense(shape=(0, 2**70), data=b""), "too_large"),
        (_dense(scale=float("nan")), "bad_tensor"),
        (_dense(scale=float("inf")), "bad_tensor"),
        (_dense(scale=-1.0), "bad_tensor"),
        (_dense(dtype="i8", data=bytes(4), scale=3.4028235677973366e38), "bad_tensor"),
        (_dense(dtype="i8", data=bytes(4), scale=1e300), "bad_tensor"),
        (_dense(zero_point=128), "bad_tensor"),
        (_dense(zero_point=-129), "bad_tensor"),
    ],
)
def test_decode_tensor_rejects_inconsistent_tensors(tensor: WireTensor, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_tensor(tensor)
    assert info.value.reason == reason


def test_max_elements_is_the_callers_cap() -> None:
    t = encode_dense("w", np.zeros(100, dtype=np.float32))
    assert decode_tensor(t, max_elements=100).shape == (100,)
    with pytest.raises(DecodeError) as info:
        decode_tensor(t, max_elements=99)
    assert info.value.reason == "too_large"


def test_empty_shapes_decode() -> None:
    assert decode_tensor(_dense(shape=(0, 5), data=b"")).shape == (0, 5)
    assert decode_tensor(_dense(shape=(), data=bytes(4))).shape == ()


# --- varints ---------------------------------------------------------------------------------

VARINTS = [0, 1, 127, 128, 255, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**35 - 1]


def test_varint_round_trip() -> None:
    values = np.array(VARINTS, dtype=np.uint64)
    encoded = varint_encode(values)
    assert encoded.dtype == np.uint8
    assert len(encoded) == sum(
        1 + (v >= 2**7) + (v >= 2**14) + (v >= 2**21) + (v >= 2**28) for v in VARINTS
    )
    assert varint_decode(encoded.tobytes(), len(VARINTS)).tolist() == VARINTS
    assert varint_decode(memoryview(encoded.tobytes()), len(VARINTS)).tolist() == VARINTS
    assert varint_encode(np.zeros(0, dtype=np.uint64)).size == 0
    assert varint_decode(b"", 0).tolist() == []


def test_varints_across_blocks_and_in_bounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(3).integers(0, 2**35, 10_001).astype(np.uint64)
    encoded = varint_encode(values).tobytes()
    monkeypatch.setattr(tensors, "_VARINT_BLOCK", 7)  # many blocks, varints of every length
    assert varint_decode(encoded, len(values)).tolist() == values.tolist()
    monkeypatch.undo()
    ones = bytes(1_000_000)  # a million one-byte varints (zero gaps): the costliest input
    tracemalloc.start()
    try:
        assert varint_decode(ones, len(ones)).sum() == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * len(ones) + (16 << 20)  # the output (8 bytes each), its ends, a block


def test_varint_limits() -> None:
    with pytest.raises(EncodeError):
        varint_encode(np.array([2**35], dtype=np.uint64))
    with pytest.raises(DecodeError):
        varint_decode(b"\x01\x02\x03", 2)
    with pytest.raises(DecodeError):
        varint_decode(b"\xff\xff\xff\xff\xff\x01", 1)
    with pytest.raises(DecodeError):
        varint_decode(b"\x01\x80", 5)
    assert varint_decode(b"\xff\xff\xff\xff\x7f", 1).tolist() == [2**35 - 1]


def test_dtypes_table() -> None:
    assert set(tensors.DTYPES) == {"f32", "f16", "bf16", "i8"}
