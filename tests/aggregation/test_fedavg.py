"""StreamingFedAvg: weighted means by hand, every encoding, and all-or-nothing rejection."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import pytest
import torch

from cloud_coordinator import checked_sums
from cloud_coordinator.aggregation import AggregationError, Aggregator, StreamingFedAvg
from protocols.tensors import WireTensor, decode_tensor, encode_dense, encode_sparse
from tests.aggregation.test_kernels import via_wire

F32 = npt.NDArray[np.float32]
SHAPES = {"a": (2, 3), "b": (4,)}


def _f32(*values: float) -> F32:
    return np.array(values, dtype=np.float32)


def _update(a: npt.ArrayLike, b: npt.ArrayLike, dtype: str = "f32") -> tuple[WireTensor, ...]:
    a_arr = np.asarray(a, dtype=np.float32).reshape(SHAPES["a"])
    b_arr = np.asarray(b, dtype=np.float32).reshape(SHAPES["b"])
    return via_wire(encode_dense("a", a_arr, dtype), encode_dense("b", b_arr, dtype))


def test_is_an_aggregator(device: torch.device) -> None:
    agg: Aggregator = StreamingFedAvg(SHAPES, device)
    assert (agg.count, agg.total_weight) == (0, 0.0)


def test_weighted_mean_by_hand(device: torch.device) -> None:
    agg = StreamingFedAvg(SHAPES, device)
    agg.add(_update([1, 2, 3, 4, 5, 6], [1, 1, 1, 1]), 1.0)
    agg.add(_update([3, 2, 1, 0, -1, -2], [2, 0, -2, 8]), 3.0)
    out = agg.result()
    # a: (1*[1..6] + 3*[3,2,1,0,-1,-2]) / 4; b: (1*[1,1,1,1] + 3*[2,0,-2,8]) / 4
    np.testing.assert_array_equal(out["a"], _f32(2.5, 2, 1.5, 1, 0.5, 0).reshape(2, 3))
    np.testing.assert_array_equal(out["b"], _f32(1.75, 0.25, -1.25, 6.25))
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        "a": (np.dtype(np.float32), (2, 3)),
        "b": (np.dtype(np.float32), (4,)),
    }
    assert (agg.count, agg.total_weight, agg.device) == (2, 4.0, device)


def test_matches_numpy_on_random_updates(device: torch.device) -> None:
    rng = np.random.default_rng(1)
    agg = StreamingFedAvg(SHAPES, device)
    sums = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    weights = rng.integers(1, 500, size=20)
    for w in weights:
        a, b = rng.standard_normal(6), rng.standard_normal(4)
        agg.add(_update(a, b), int(w))
        sums["a"] += w * a.astype(np.float32).reshape(2, 3)
        sums["b"] += w * b.astype(np.float32)
    out = agg.result()
    for name in SHAPES:
        np.testing.assert_allclose(out[name], sums[name] / weights.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "i8"])
def test_each_dtype_averages_what_the_codec_decodes(device: torch.device, dtype: str) -> None:
    rng = np.random.default_rng(2)
    updates = [_update(rng.standard_normal(6), rng.standard_normal(4), dtype) for _ in range(3)]
    agg = StreamingFedAvg(SHAPES, device)
    for i, update in enumerate(updates):
        agg.add(update, i + 1)
    out = agg.result()
    for j, name in enumerate(SHAPES):
        expected = sum(
            (i + 1) * decode_tensor(u[j]).astype(np.float64) for i, u in enumerate(updates)
        )
        np.testing.assert_allclose(out[name], expected / 6, rtol=1e-6, atol=1e-6)


def test_mixes_dense_and_sparse(device: torch.device) -> None:
    agg = StreamingFedAvg(SHAPES, device)
    agg.add(_update(np.arange(6), [4, 4, 4, 4]), 1.0)
    sparse = via_wire(
        encode_sparse("a", (2, 3), [0, 5], [6.0, -6.0], "f32"),
        encode_sparse("b", (4,), [2], [1.0], "f16"),
    )
    agg.add(sparse, 2.0)
    agg.add((sparse[1], encode_dense("a", np.ones((2, 3), dtype=np.float32), "bf16")), 1.0)
    out = agg.result()
    np.testing.assert_array_equal(out["a"], _f32(13, 2, 3, 4, 5, -6).reshape(2, 3) / 4)
    np.testing.assert_array_equal(out["b"], _f32(4, 4, 7, 4) / 4)


def test_tensor_order_in_an_update_does_not_matter(device: torch.device) -> None:
    agg = StreamingFedAvg(SHAPES, device)
    a, b = _update(np.ones(6), np.arange(4))
    agg.add((b, a), 1.0)
    np.testing.assert_array_equal(agg.result()["b"], _f32(0, 1, 2, 3))


def _bad_updates() -> dict[str, tuple[tuple[WireTensor, ...], str]]:
    a, b = _update(np.ones(6), np.ones(4))
    nan = encode_dense("b", _f32(1, np.nan, 1, 1))
    inf_sparse = encode_sparse("b", (4,), [3], [np.inf], "f16")
    return {
        "nan in the last tensor": ((a, nan), "non_finite"),
        "inf in a sparse tensor": ((a, inf_sparse), "non_finite"),
        "wrong shape": ((a, dataclasses.replace(b, shape=(2, 2))), "bad_shape"),
        "short data": ((a, dataclasses.replace(b, data=bytes(12))), "bad_tensor"),
        "unknown dtype": ((a, dataclasses.replace(b, dtype="f64")), "bad_tensor"),
        "missing tensor": ((a,), "bad_tensor"),
        "unknown tensor": ((a, b, dataclasses.replace(b, name="c")), "bad_tensor"),
        "repeated tensor": ((a, b, b), "bad_tensor"),
        "bad indices": ((a, dataclasses.replace(inf_sparse, indices=b"\x80")), "bad_tensor"),
    }


@pytest.mark.parametrize("case", sorted(_bad_updates()))
def test_a_bad_update_leaves_the_aggregate_unchanged(device: torch.device, case: str) -> None:
    tensors, reason = _bad_updates()[case]
    agg = StreamingFedAvg(SHAPES, device)
    agg.add(_update(np.arange(6), [1, 2, 3, 4]), 2.0)
    before = agg.result()
    with pytest.raises(AggregationError) as info:
        agg.add(tensors, 5.0)
    assert info.value.reason == reason
    assert (agg.count, agg.total_weight) == (1, 2.0)
    after = agg.result()
    for name in SHAPES:
        np.testing.assert_array_equal(after[name], before[name])
    agg.add(_update(np.zeros(6), [0, 0, 0, 0]), 2.0)  # and it goes on accepting good ones
    np.testing.assert_array_equal(agg.result()["b"], _f32(0.5, 1, 1.5, 2))


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_bad_weights_are_refused(device: torch.device, weight: float) -> None:
    agg = StreamingFedAvg(SHAPES, device)
    with pytest.raises(AggregationError) as info:
        agg.add(_update(np.ones(6), np.ones(4)), weight)
    assert info.value.reason == "bad_weight"
    assert (agg.count, agg.total_weight) == (0, 0.0)


def test_result_without_weight_is_an_error(device: torch.device) -> None:
    agg = StreamingFedAvg(SHAPES, device)
    with pytest.raises(AggregationError, match="no weight") as info:
        agg.result()
    assert info.value.reason == "empty"
    agg.add(_update(np.ones(6), np.ones(4)), 0.0)  # counted, but weighs nothing
    assert (agg.count, agg.total_weight) == (1, 0.0)
    with pytest.raises(AggregationError):
        agg.result()


def test_a_zero_weight_update_is_still_checked(device: torch.device) -> None:
    agg = StreamingFedAvg(SHAPES, device)
    with pytest.raises(AggregationError) as info:
        agg.add(_update(np.ones(6), _f32(1, 1, np.inf, 1)), 0.0)
    assert info.value.reason == "non_finite"


def test_result_is_a_host_copy(device: torch.device) -> None:
    agg = StreamingFedAvg(SHAPES, device)
    agg.add(_update(np.ones(6), np.ones(4)), 1.0)
    first = agg.result()
    first["a"][:] = 99  # the caller may scribble on what it got
    agg.add(_update(np.ones(6), np.ones(4)), 1.0)
    np.testing.assert_array_equal(agg.result()["a"], np.ones((2, 3), dtype=np.float32))


@pytest.mark.parametrize("keep_bytes", [None, 0], ids=["default", "two-pass"])
def test_an_overflowing_update_is_refused(device: torch.device, keep_bytes: int | None) -> None:
    agg = StreamingFedAvg({"b": (4,)}, device, keep_bytes=keep_bytes)
    huge = via_wire(encode_dense("b", np.full(4, 3e38, dtype=np.float32)))
    agg.add(huge, 1.0)  # finite, so accepted
    np.testing.assert_array_equal(agg.result()["b"], np.full(4, 3e38, dtype=np.float32))
    # 6e38 is not a float32: the one-pass fold sees it as it makes it; two passes refuse
    # what could reach it before adding (a later overflow would fail the whole round)
    with pytest.raises(AggregationError, match="overflow") as info:
        agg.add(huge, 1.0)
    assert info.value.reason == "non_finite"
    assert (agg.count, agg.total_weight) == (1, 1.0)
    small = via_wire(encode_dense("b", np.ones(4, dtype=np.float32)))
    agg.add(small, 1.0)  # the round goes on with the others
    np.testing.assert_allclose(agg.result()["b"], np.full(4, 1.5e38, dtype=np.float32))


def test_one_pass_on_the_cpu_when_the_kernel_is_built(device: torch.device) -> None:
    agg = StreamingFedAvg(SHAPES, device)
    expected = device.type == "cpu" and checked_sums.KEEP_BYTES > 0 and checked_sums.kernel_built()
    assert agg.one_pass is expected
    assert not StreamingFedAvg(SHAPES, device, keep_bytes=0).one_pass


def test_negative_dimensions_are_a_programming_error(device: torch.device) -> None:
    with pytest.raises(ValueError, match="negative"):
        StreamingFedAvg({"a": (2, -1)}, device)
