"""Tensor kernels: wire tensors decoded onto a device match the numpy codec, or are refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import pytest
import torch

from cloud_coordinator.aggregation import (
    AggregationError,
    all_finite,
    decode_to_torch,
    pick_device,
)
from cloud_coordinator.errors import CoordinatorError
from protocols import messages
from protocols.messages import ModelUpdate
from protocols.tensors import (
    WireTensor,
    decode_tensor,
    encode_dense,
    encode_sparse,
    varint_encode,
)

F32 = npt.NDArray[np.float32]
DTYPES = ["f32", "f16", "bf16", "i8"]
SHAPES = [(), (0,), (1,), (7,), (3, 4), (2, 3, 4)]


def _values(shape: tuple[int, ...], seed: int = 0) -> F32:
    return (np.random.default_rng(seed).standard_normal(shape) * 3).astype(np.float32)


def via_wire(*tensors: WireTensor) -> tuple[WireTensor, ...]:
    """`tensors` after a trip through a real message: data as views into the payload."""
    payload = messages.encode(ModelUpdate("d", "j", 0, "v", 0, 1, tensors))
    return messages.decode_as(ModelUpdate, payload).tensors


def _host(x: torch.Tensor) -> F32:
    out: F32 = x.cpu().numpy()
    return out


def test_pick_device_auto_follows_torch() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device() == torch.device(expected)
    assert pick_device("auto") == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_pick_device_refuses_cuda_without_a_gpu() -> None:
    with pytest.raises(AggregationError, match="no CUDA GPU") as info:
        pick_device("cuda")
    assert info.value.reason == "no_device"
    assert isinstance(info.value, CoordinatorError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_pick_device_gives_cuda_when_present() -> None:
    assert pick_device("cuda") == torch.device("cuda")


def test_pick_device_refuses_unknown_names() -> None:
    with pytest.raises(AggregationError, match="'tpu'") as info:
        pick_device("tpu")
    assert info.value.reason == "no_device"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_the_numpy_codec(
    device: torch.device, dtype: str, shape: tuple[int, ...]
) -> None:
    (t,) = via_wire(encode_dense("w", _values(shape), dtype))
    out = decode_to_torch(t, device, shape)
    assert (out.dtype, out.device.type, tuple(out.shape)) == (torch.float32, device.type, shape)
    np.testing.assert_array_equal(_host(out), decode_tensor(t))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_matches_the_numpy_codec(device: torch.device, dtype: str) -> None:
    shape = (5, 40)
    flat = np.array([0, 1, 7, 128, 129, 150, 199])
    (t,) = via_wire(encode_sparse("w", shape, flat, _values((flat.size,)), dtype))
    out = decode_to_torch(t, device, shape)
    assert (out.dtype, tuple(out.shape)) == (torch.float32, shape)
    np.testing.assert_array_equal(_host(out), decode_tensor(t))


def test_empty_sparse_is_zeros(device: torch.device) -> None:
    t = encode_sparse("w", (3,), [], [], "f32")
    np.testing.assert_array_equal(_host(decode_to_torch(t, device, (3,))), np.zeros(3))


def test_dense_f32_on_cpu_is_a_view_of_the_payload() -> None:
    (t,) = via_wire(encode_dense("w", _values((64,))))
    out = decode_to_torch(t, torch.device("cpu"), (64,))
    assert out.data_ptr() == np.frombuffer(t.data, dtype=np.uint8).ctypes.data


def test_data_may_be_any_contiguous_buffer(device: torch.device) -> None:
    values = _values((3, 4))
    t = WireTensor("w", "f32", (3, 4), values.data)  # format "f", two dimensions
    np.testing.assert_array_equal(_host(decode_to_torch(t, device, (3, 4))), values)
    strided = WireTensor("w", "f32", (6,), values[:, ::2].data)
    assert _reason(strided, device, (6,)) == "bad_tensor"


def _reason(t: WireTensor, device: torch.device, shape: tuple[int, ...]) -> str:
    with pytest.raises(AggregationError) as info:
        decode_to_torch(t, device, shape)
    return info.value.reason


@pytest.mark.parametrize("dtype", DTYPES)
def test_shape_mismatch_is_bad_shape(device: torch.device, dtype: str) -> None:
    t = encode_dense("w", _values((3, 4)), dtype)
    assert _reason(t, device, (4, 3)) == "bad_shape"
    assert _reason(t, device, (12,)) == "bad_shape"
    sparse = encode_sparse("w", (3, 4), [1, 2], [1.0, 2.0], dtype)
    assert _reason(sparse, device, (4, 3)) == "bad_shape"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_nan_and_inf_are_non_finite(device: torch.device, dtype: str, bad: float) -> None:
    values = _values((100,))
    values[37] = bad
    (dense,) = via_wire(encode_dense("w", values, dtype))
    assert _reason(dense, device, (100,)) == "non_finite"
    (sparse,) = via_wire(encode_sparse("w", (100,), [3, 37], [1.0, bad], dtype))
    assert _reason(sparse, device, (100,)) == "non_finite"


def test_f16_overflow_is_non_finite(device: torch.device) -> None:
    t = encode_dense("w", np.array([1.0, 1e6], dtype=np.float32), "f16")  # 1e6 -> +Inf
    assert _reason(t, device, (2,)) == "non_finite"


def test_i8_scale_that_overflows_is_non_finite(device: torch.device) -> None:
    t = WireTensor("w", "i8", (2,), np.array([1, 127], dtype=np.int8).tobytes(), scale=3e38)
    assert _reason(t, device, (2,)) == "non_finite"


def test_finite_values_whose_sum_overflows_pass(device: torch.device) -> None:
    values = np.full(8, 3e38, dtype=np.float32)
    out = decode_to_torch(encode_dense("w", values), device, (8,))
    np.testing.assert_array_equal(_host(out), values)
    assert all_finite([torch.from_numpy(values).to(device)])
    assert not all_finite([torch.tensor([1.0, float("nan")], device=device)])
    assert all_finite([])


def _varints(*gaps: int) -> bytes:
    return varint_encode(np.array(gaps, dtype=np.uint64)).tobytes()


MALFORMED = {
    "unknown dtype": WireTensor("w", "f64", (2,), bytes(16)),
    "short data": WireTensor("w", "f32", (2,), bytes(7)),
    "long data": WireTensor("w", "f32", (2,), bytes(12)),
    "nan scale": WireTensor("w", "i8", (2,), bytes(2), scale=float("nan")),
    "negative scale": WireTensor("w", "i8", (2,), bytes(2), scale=-1.0),
    "zero point": WireTensor("w", "i8", (2,), bytes(2), zero_point=300),
    "repeated index": WireTensor("w", "f32", (4,), bytes(8), indices=_varints(1, 0)),
    "index out of range": WireTensor("w", "f32", (4,), bytes(8), indices=_varints(1, 3)),
    "truncated varint": WireTensor("w", "f32", (4,), bytes(4), indices=b"\x80"),
    "more indices than values": WireTensor("w", "f32", (4,), bytes(4), indices=_varints(0, 1)),
    "more indices than elements": WireTensor(
        "w", "f32", (2,), bytes(12), indices=_varints(0, 1, 1)
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_tensors_are_bad_tensor(device: torch.device, name: str) -> None:
    t = MALFORMED[name]
    assert _reason(t, device, t.shape) == "bad_tensor"


def test_errors_carry_a_reason_and_name_the_tensor(device: torch.device) -> None:
    t = dataclasses.replace(encode_dense("layer.0", _values((3,))), shape=(4,))
    with pytest.raises(AggregationError, match=r"layer\.0") as info:
        decode_to_torch(t, device, (3,))
    assert info.value.reason == "bad_shape"
