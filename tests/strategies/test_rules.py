"""NormBoundedFedAvg and the buffered rules, fed real wire updates; and make_aggregator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
import torch

from cloud_coordinator.aggregation import AggregationError, Aggregator, StreamingFedAvg
from cloud_coordinator.strategies import STRATEGY_NAMES, make_aggregator, parse_strategy
from cloud_coordinator.strategies.catalog import Krum, Median, MultiKrum, TrimmedMean
from cloud_coordinator.strategies.rules import BufferedParams, BufferedRule, NormBoundedFedAvg
from protocols.tensors import WireTensor, decode_tensor, encode_dense, encode_sparse
from tests.aggregation.test_kernels import via_wire

F32 = npt.NDArray[np.float32]
SHAPES = {"a": (2, 2), "b": (1,)}
# The worked rows of test_kernels, as updates: a = the first four values, b = the last.
ROWS = [
    [1, 5, -2, 0, 10],
    [3, 1, -1, 4, -10],
    [2, 9, -7, 2, 0],
    [100, -100, 0, 1, 1],
    [4, 2, 3, -3, 5],
]


def _update(row: npt.ArrayLike, dtype: str = "f32") -> tuple[WireTensor, ...]:
    flat = np.asarray(row, dtype=np.float32)
    return via_wire(encode_dense("a", flat[:4].reshape(2, 2), dtype), encode_dense("b", flat[4:]))


def _flat(out: dict[str, F32]) -> F32:
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        "a": (np.dtype(np.float32), (2, 2)),
        "b": (np.dtype(np.float32), (1,)),
    }
    return np.concatenate([out["a"].reshape(-1), out["b"]])


def _buffered(
    params: BufferedParams, rows: Sequence[Sequence[float]], device: torch.device, **kw: int
) -> BufferedRule:
    agg = BufferedRule(params, SHAPES, device, **kw)
    for i, row in enumerate(rows):
        agg.add(_update(row), i + 1, f"d{i}")
    return agg


def test_buffered_rules_are_aggregators(device: torch.device) -> None:
    agg: Aggregator = BufferedRule(Median(), SHAPES, device)
    assert (agg.count, agg.total_weight) == (0, 0.0)
    assert agg.report() == {
        "rule": "median",
        "aggregation_device": str(device),
        "buffer_device": str(torch.empty(0, device=device).device),
        "updates": 0,
        "weighted": False,
    }


def test_median_by_hand(device: torch.device) -> None:
    agg = _buffered(Median(), ROWS[:3], device)
    np.testing.assert_array_equal(_flat(agg.result()), [2, 5, -2, 2, 0])
    agg.add(_update(ROWS[3]), 1.0, "d3")  # even count: mean of the middle two
    np.testing.assert_array_equal(_flat(agg.result()), [2.5, 3, -1.5, 1.5, 0.5])
    assert (agg.count, agg.total_weight) == (4, 7.0)


def test_trimmed_mean_by_hand(device: torch.device) -> None:
    agg = _buffered(TrimmedMean(trim_fraction=0.2), ROWS, device)
    np.testing.assert_allclose(_flat(agg.result()), [3, 8 / 3, -1, 1, 2], rtol=1e-6)
    assert agg.report()["trimmed_per_side"] == 1
    agg = _buffered(TrimmedMean(trim_fraction=0.4), ROWS, device)
    np.testing.assert_array_equal(_flat(agg.result()), [3, 2, -1, 1, 1])
    assert agg.report()["trimmed_per_side"] == 2


# Points 0, 1, 2, 4, 100 (a = [x, -x, 0, 0], b = [0]); with f = 1 their Krum scores are
# 10, 4, 10, 26 and 2 * (96^2 + 98^2): Krum keeps 1; Multi-Krum 1, 0, 2, 4 (ties: lower first).
POINTS = [[x, -x, 0, 0, 0] for x in (0, 1, 2, 4, 100)]


def test_krum_by_hand(device: torch.device) -> None:
    agg = _buffered(Krum(byzantine=1), POINTS, device)
    np.testing.assert_array_equal(_flat(agg.result()), [1, -1, 0, 0, 0])
    assert agg.report()["selected"] == ["d1"]


def test_multi_krum_by_hand(device: torch.device) -> None:
    agg = _buffered(MultiKrum(byzantine=1), POINTS, device)  # keep n - f = 4
    # Weights are 1..5: (0*1 + 1*2 + 2*3 + 4*4) / (1 + 2 + 3 + 4) = 2.4
    np.testing.assert_allclose(_flat(agg.result()), [2.4, -2.4, 0, 0, 0], rtol=1e-6)
    report = agg.report()
    assert report["selected"] == ["d1", "d0", "d2", "d3"]
    assert (report["rule"], report["weighted"]) == ("multi_krum", True)
    agg = _buffered(MultiKrum(byzantine=1, keep=2), POINTS, device)
    np.testing.assert_allclose(_flat(agg.result()), [2 / 3, -2 / 3, 0, 0, 0], rtol=1e-6)
    assert agg.report()["selected"] == ["d1", "d0"]


def test_krum_with_too_few_updates_says_how_many_it_needs(device: torch.device) -> None:
    agg = _buffered(Krum(byzantine=1), POINTS[:4], device)
    with pytest.raises(AggregationError, match="needs at least 5 updates, got 4") as info:
        agg.result()
    assert info.value.reason == "too_few"
    assert agg.report()["selected"] == []
    agg.add(_update(POINTS[4]), 5.0, "d4")  # one more and it runs
    np.testing.assert_array_equal(_flat(agg.result()), [1, -1, 0, 0, 0])
    many = _buffered(MultiKrum(byzantine=0, keep=6), POINTS, device)
    with pytest.raises(AggregationError, match="at least 6") as info:
        many.result()
    assert info.value.reason == "too_few"


@pytest.mark.parametrize("params", [Median(), TrimmedMean(), Krum(0), MultiKrum(0)])
def test_no_updates_is_empty(device: torch.device, params: BufferedParams) -> None:
    with pytest.raises(AggregationError) as info:
        BufferedRule(params, SHAPES, device).result()
    assert info.value.reason == "empty"


def test_multi_krum_kept_updates_without_weight(device: torch.device) -> None:
    agg = BufferedRule(MultiKrum(byzantine=0, keep=1), SHAPES, device)
    for i, row in enumerate(POINTS[:3]):
        agg.add(_update(row), 0.0, f"d{i}")
    with pytest.raises(AggregationError, match="no weight") as info:
        agg.result()
    assert info.value.reason == "empty"


def test_the_buffer_doubles_and_keeps_its_rows(device: torch.device) -> None:
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((9, 5)).astype(np.float32)
    agg = BufferedRule(Median(), SHAPES, device, capacity=1)
    capacities = []
    for row in rows:
        agg.add(_update(row), 1.0)
        capacities.append(agg.capacity)
    assert capacities == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    np.testing.assert_allclose(_flat(agg.result()), np.median(rows, axis=0), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "i8"])
def test_compressed_and_sparse_updates(device: torch.device, dtype: str) -> None:
    rng = np.random.default_rng(5)
    dense = [_update(rng.standard_normal(5), dtype) for _ in range(3)]
    sparse = via_wire(
        encode_sparse("a", (2, 2), [1, 3], [7.0, -7.0], dtype),
        encode_sparse("b", (1,), [], [], dtype),
    )
    expected_rows = [
        np.concatenate([decode_tensor(t).reshape(-1) for t in u]) for u in [*dense, sparse]
    ]
    for params in (Median(), TrimmedMean(0.25)):
        agg = BufferedRule(params, SHAPES, device)
        for u in [*dense, sparse]:
            agg.add(u, 1.0)
        expected = (
            np.median(expected_rows, axis=0)
            if isinstance(params, Median)
            else np.sort(expected_rows, axis=0)[1:3].mean(axis=0)
        )
        np.testing.assert_allclose(_flat(agg.result()), expected, rtol=1e-6, atol=1e-7)
    assert np.array_equal(expected_rows[3], [0, 7, 0, -7, 0])


def _bad_updates() -> dict[str, tuple[tuple[WireTensor, ...], float, str]]:
    a, b = _update([1, 1, 1, 1, 1])
    return {
        "nan": ((a, encode_dense("b", np.array([np.nan], dtype=np.float32))), 1.0, "non_finite"),
        "inf in sparse": ((a, encode_sparse("b", (1,), [0], [np.inf], "f16")), 1.0, "non_finite"),
        "wrong shape": ((a, dataclasses.replace(b, shape=(1, 1))), 1.0, "bad_shape"),
        "missing tensor": ((a,), 1.0, "bad_tensor"),
        "short data": ((a, dataclasses.replace(b, data=b"\0\0")), 1.0, "bad_tensor"),
        "bad weight": ((a, b), -1.0, "bad_weight"),
    }


@pytest.mark.parametrize("case", sorted(_bad_updates()))
@pytest.mark.parametrize("params", [Median(), Krum(byzantine=1)], ids=["median", "krum"])
def test_a_refused_update_leaves_the_buffer_unchanged(
    device: torch.device, case: str, params: Median | Krum
) -> None:
    tensors, weight, reason = _bad_updates()[case]
    agg = _buffered(params, POINTS, device, capacity=5)  # full: the next add would grow it
    before, report = agg.result(), agg.report()
    with pytest.raises(AggregationError) as info:
        agg.add(tensors, weight, "bad")
    assert info.value.reason == reason
    assert (agg.count, agg.total_weight, agg.capacity) == (5, 15.0, 5)
    np.testing.assert_array_equal(_flat(agg.result()), _flat(before))
    assert agg.report() == report
    agg.add(_update(POINTS[1]), 1.0, "good")  # and good ones are still taken
    assert agg.count == 6


def test_result_is_a_host_copy(device: torch.device) -> None:
    agg = _buffered(Krum(byzantine=0), POINTS[:3], device)
    first = agg.result()
    expected = _flat(first).copy()
    first["a"][:] = 99  # Krum's answer is a stored row: scribbling must not reach it
    np.testing.assert_array_equal(_flat(agg.result()), expected)


def test_planted_outliers_through_the_wire(device: torch.device) -> None:
    rng = np.random.default_rng(6)
    honest = [rng.standard_normal(5) + 1 for _ in range(8)]
    rows = [*honest, honest[0] * -10, np.full(5, 1e6)]
    sources = [f"honest{i}" for i in range(8)] + ["flipped", "huge"]
    rules: list[Aggregator] = [
        BufferedRule(p, SHAPES, device) for p in (Median(), TrimmedMean(0.2), MultiKrum(2))
    ]
    fedavg = StreamingFedAvg(SHAPES, device)
    for agg in [*rules, fedavg]:
        for row, source in zip(rows, sources, strict=True):
            agg.add(_update(row), float(rng.integers(10, 100)), source)
    assert _flat(fedavg.result()).mean() > 1e4
    for agg in rules:
        assert abs(_flat(agg.result()).mean() - 1) < 0.5, agg.report()["rule"]
    selected = rules[2].report()["selected"]
    assert isinstance(selected, list)
    assert len(selected) == 8
    assert not {"flipped", "huge"} & set(selected)
    krum = _buffered(Krum(2), [[float(v) for v in r] for r in rows], device)
    krum.result()
    assert krum.report()["selected"] in [[f"d{i}"] for i in range(8)]


def test_norm_bounded_by_hand(device: torch.device) -> None:
    agg: Aggregator = NormBoundedFedAvg(SHAPES, device, norm_bound=5.0)
    agg.add(_update([3, 0, 0, 0, 4]), 1.0, "a")  # norm 5: kept as is
    agg.add(_update([0, 6, 0, 0, 8]), 3.0, "b")  # norm 10: halved to [0, 3, 0, 0, 4]
    # (1 * [3, 0, 0, 0, 4] + 3 * [0, 3, 0, 0, 4]) / 4
    np.testing.assert_array_equal(_flat(agg.result()), [0.75, 2.25, 0, 0, 4])
    assert agg.report() == {
        "rule": "norm_bounded",
        "aggregation_device": str(device),
        "updates": 2,
        "total_weight": 4.0,
        "norm_bound": 5.0,
        "clipped": 1,
    }


def test_norm_bounded_sparse_and_refusals(device: torch.device) -> None:
    agg = NormBoundedFedAvg(SHAPES, device, norm_bound=5.0)
    sparse = via_wire(
        encode_sparse("a", (2, 2), [1], [30.0], "f32"), encode_sparse("b", (1,), [], [], "f32")
    )
    agg.add(sparse, 2.0, "s")  # norm of the values: 30, scaled by 1/6
    np.testing.assert_allclose(_flat(agg.result()), [0, 5, 0, 0, 0], rtol=1e-6)
    for tensors, weight, reason in _bad_updates().values():
        with pytest.raises(AggregationError) as info:
            agg.add(tensors, weight)
        assert info.value.reason == reason
    assert (agg.count, agg.clipped, agg.total_weight) == (1, 1, 2.0)
    huge = _update([3e38, 3e38, 0, 0, 0])  # squares overflow float32, the norm does not
    agg.add(huge, 2.0)
    np.testing.assert_allclose(
        _flat(agg.result()), [5 / 2**1.5, 2.5 + 5 / 2**1.5, 0, 0, 0], rtol=1e-5
    )
    with pytest.raises(ValueError, match="norm_bound"):
        NormBoundedFedAvg(SHAPES, device, norm_bound=0.0)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_make_aggregator(device: torch.device, name: str) -> None:
    agg = make_aggregator(parse_strategy(name, {}), SHAPES, device)
    expected = {
        "norm_bounded": NormBoundedFedAvg,
        "median": BufferedRule,
        "trimmed_mean": BufferedRule,
        "krum": BufferedRule,
        "multi_krum": BufferedRule,
    }.get(name, StreamingFedAvg)
    assert type(agg) is expected
    report = agg.report()
    assert (report["rule"], report["aggregation_device"]) == (name, str(device))
    for row in POINTS:
        agg.add(_update(row), 1.0, "x")
    assert _flat(agg.result()).shape == (5,)
    big = make_aggregator(parse_strategy("median", {}), SHAPES, device, expected_updates=100)
    assert isinstance(big, BufferedRule)
    assert big.capacity == 100
