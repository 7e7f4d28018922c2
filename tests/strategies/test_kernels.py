"""Strategy kernels against numbers worked out by hand, numpy references and properties."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cloud_coordinator.aggregation import AggregationError
from cloud_coordinator.strategies import kernels
from tests.strategies.conftest import TORCH_DEVICES

F32 = npt.NDArray[np.float32]

# Five updates of five coordinates; worked examples below use their columns.
ROWS = [
    [1, 5, -2, 0, 10],
    [3, 1, -1, 4, -10],
    [2, 9, -7, 2, 0],
    [100, -100, 0, 1, 1],
    [4, 2, 3, -3, 5],
]


def _rows(rows: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=device)


def _host(x: torch.Tensor) -> F32:
    out: F32 = x.cpu().numpy()
    return out


def test_weighted_sum_and_mean(device: torch.device) -> None:
    rows = _rows(ROWS[:2], device)
    np.testing.assert_array_equal(
        _host(kernels.weighted_sum(rows, [1.0, 3.0], device)), [10, 8, -5, 12, -20]
    )
    np.testing.assert_array_equal(
        _host(kernels.weighted_mean(rows, [1.0, 3.0], device)), [2.5, 2, -1.25, 3, -5]
    )
    with pytest.raises(AggregationError) as info:
        kernels.weighted_mean(rows, [0.0, 0.0], device)
    assert info.value.reason == "empty"
    with pytest.raises(ValueError, match="3 weights for 2 rows"):
        kernels.weighted_sum(rows, [1.0, 1.0, 1.0], device)


def test_inputs_move_to_the_device_and_results_stay_there(device: torch.device) -> None:
    host_rows = torch.tensor(ROWS, dtype=torch.float64)  # elsewhere, and not float32
    out = kernels.coordinate_median(host_rows, device)
    assert (out.device.type, out.dtype) == (device.type, torch.float32)
    assert kernels.pairwise_sq_distances(host_rows, device).device.type == device.type


def test_median_odd_count_by_hand(device: torch.device) -> None:
    out = kernels.coordinate_median(_rows(ROWS[:3], device), device)
    np.testing.assert_array_equal(_host(out), [2, 5, -2, 2, 0])


def test_median_even_count_is_the_mean_of_the_middle_two(device: torch.device) -> None:
    # Columns sorted: [1,2,3,100] [-100,1,5,9] [-7,-2,-1,0] [0,1,2,4] [-10,0,1,10]
    out = kernels.coordinate_median(_rows(ROWS[:4], device), device)
    np.testing.assert_array_equal(_host(out), [2.5, 3, -1.5, 1.5, 0.5])


def test_median_even_count_with_ties(device: torch.device) -> None:
    rows = _rows([[1, 1, 5], [1, 2, 5], [1, 2, 5], [2, 2, 5]], device)
    np.testing.assert_array_equal(_host(kernels.coordinate_median(rows, device)), [1, 2, 5])
    two = _rows([[3e38, -3e38], [3e38, 3e38]], device)  # halves first: no overflow
    expected = np.array([3e38, 0], dtype=np.float32)
    np.testing.assert_array_equal(_host(kernels.coordinate_median(two, device)), expected)
    tiny = np.float32(3.821e-42)  # an odd multiple of the smallest subnormal: halving rounds
    same = torch.tensor([[tiny], [tiny]], device=device)
    np.testing.assert_array_equal(_host(kernels.coordinate_median(same, device)), [tiny])


def test_median_of_nothing_is_too_few(device: torch.device) -> None:
    with pytest.raises(AggregationError, match="at least 1") as info:
        kernels.coordinate_median(torch.zeros((0, 3)), device)
    assert info.value.reason == "too_few"


def test_median_across_column_blocks_matches_numpy(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "_CPU_BLOCK", 40)  # 10 rows: blocks of 4 columns
    monkeypatch.setattr(kernels, "_GPU_BLOCK", 40)
    rows = np.random.default_rng(0).standard_normal((10, 23)).astype(np.float32)
    out = kernels.coordinate_median(torch.from_numpy(rows), device)
    np.testing.assert_allclose(_host(out), np.median(rows, axis=0), rtol=1e-6)
    trimmed = kernels.trimmed_mean(torch.from_numpy(rows), 2, device)
    expected = np.sort(rows, axis=0)[2:8].mean(axis=0)
    np.testing.assert_allclose(_host(trimmed), expected, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_by_hand(device: torch.device) -> None:
    rows = _rows(ROWS, device)
    assert kernels.trim_count(5, 0.2) == kernels.trim_count(5, 0.39) == 1
    # Columns sorted: [1,2,3,4,100] [-100,1,2,5,9] [-7,-2,-1,0,3] [-3,0,1,2,4] [-10,0,1,5,10]
    np.testing.assert_allclose(
        _host(kernels.trimmed_mean(rows, 1, device)), [3, 8 / 3, -1, 1, 2], rtol=1e-6
    )
    assert kernels.trim_count(5, 0.4) == 2  # leaves the median
    np.testing.assert_array_equal(_host(kernels.trimmed_mean(rows, 2, device)), [3, 2, -1, 1, 1])
    np.testing.assert_array_equal(
        _host(kernels.trimmed_mean(rows, 0, device)), np.mean(ROWS, axis=0, dtype=np.float32)
    )


def test_trimmed_mean_needs_one_value_left(device: torch.device) -> None:
    with pytest.raises(AggregationError, match="needs at least 5 updates, got 4") as info:
        kernels.trimmed_mean(_rows(ROWS[:4], device), 2, device)
    assert info.value.reason == "too_few"


# Five points on a line (as two coordinates, value and -value): 0, 1, 2, 4, 100.
POINTS = [[0, 0], [1, -1], [2, -2], [4, -4], [100, -100]]


def test_pairwise_squared_distances(device: torch.device) -> None:
    dist = _host(kernels.pairwise_sq_distances(_rows(POINTS[:3], device), device))
    np.testing.assert_allclose(dist, [[0, 2, 8], [2, 0, 2], [8, 2, 0]], atol=1e-4)
    huge = _rows([[3e38, 0], [3e38, 0], [0, 1]], device)  # squares overflow float32
    dist = _host(kernels.pairwise_sq_distances(huge, device))
    assert not np.isnan(dist).any()
    assert np.all(np.diag(dist) == 0)
    assert dist[0, 2] == dist[2, 0] == math.inf


def test_krum_scores_by_hand(device: torch.device) -> None:
    # With f = 1, each point sums its n - f - 2 = 2 smallest squared distances (here x2 for
    # the mirrored coordinate): 0 -> 1+4, 1 -> 1+1, 2 -> 1+4, 4 -> 4+9, 100 -> 96^2+98^2.
    dist = kernels.pairwise_sq_distances(_rows(POINTS, device), device)
    scores = _host(kernels.krum_scores(dist, 1, device))
    np.testing.assert_allclose(scores, [10, 4, 10, 26, 2 * (96**2 + 98**2)], rtol=1e-6)
    assert kernels.krum_select(_rows(POINTS, device), 1, 1, device) == [1]
    # Ties (0 and 2 both score 10) go to the lower row.
    assert kernels.krum_select(_rows(POINTS, device), 1, 4, device) == [1, 0, 2, 3]


def test_krum_needs_more_than_2f_plus_2(device: torch.device) -> None:
    with pytest.raises(AggregationError, match="needs at least 5 updates, got 4") as info:
        kernels.krum_select(_rows(POINTS[:4], device), 1, 1, device)
    assert info.value.reason == "too_few"
    assert kernels.krum_select(_rows(POINTS[:4], device), 0, 1, device) == [1]  # f = 0: n >= 3
    with pytest.raises(AggregationError, match="at least 6"):
        kernels.krum_select(_rows(POINTS, device), 1, 6, device)


def test_update_norm_and_clip_factor(device: torch.device) -> None:
    values = [torch.tensor([3.0, 0.0], device=device), torch.tensor([4.0], device=device)]
    assert kernels.update_norm(values, device) == 5.0
    assert kernels.update_norm([], device) == 0.0
    big = [torch.full((4,), 1e30, device=device)]  # squares overflow float32; norm does not
    assert kernels.update_norm(big, device) == pytest.approx(2e30, rel=1e-6)
    assert kernels.clip_factor(5.0, 10.0) == 1.0
    assert kernels.clip_factor(10.0, 10.0) == 1.0
    assert kernels.clip_factor(40.0, 10.0) == 0.25
    assert kernels.clip_factor(0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="norm_bound"):
        kernels.clip_factor(1.0, 0.0)


def test_planted_outliers(device: torch.device) -> None:
    rng = np.random.default_rng(3)
    honest = rng.standard_normal((8, 1000)).astype(np.float32) + 1
    rows = torch.from_numpy(np.concatenate([honest, honest[:1] * -10, np.full((1, 1000), 1e6)]))
    rows = rows.to(device, dtype=torch.float32)
    weights = [1.0] * 10
    assert float(kernels.weighted_mean(rows, weights, device).mean()) > 1e4  # FedAvg is lost
    assert abs(float(kernels.coordinate_median(rows, device).mean()) - 1) < 0.2
    assert abs(float(kernels.trimmed_mean(rows, 2, device).mean()) - 1) < 0.2
    assert kernels.krum_select(rows, 2, 1, device)[0] < 8
    assert sorted(kernels.krum_select(rows, 2, 8, device)) == list(range(8))


MATRIX_SHAPES = st.tuples(st.integers(1, 9), st.integers(1, 6))
finite32 = st.floats(-(2.0**100), 2.0**100, width=32)  # sums of 9 stay finite


@pytest.mark.parametrize("device_name", TORCH_DEVICES)
@settings(max_examples=60, deadline=None)
@given(
    matrix=arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 6)), elements=finite32)
)
def test_median_property(device_name: str, matrix: F32) -> None:
    device = torch.device(device_name)
    out = _host(kernels.coordinate_median(torch.from_numpy(matrix), device))
    assert np.all(out >= matrix.min(axis=0))
    assert np.all(out <= matrix.max(axis=0))
    expected = np.median(matrix.astype(np.float64), axis=0)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=2e-45)  # one subnormal ulp


@pytest.mark.parametrize("device_name", TORCH_DEVICES)
@pytest.mark.parametrize(
    ("low", "high"),
    [
        (-1.0, 1.0 + 2.0**-23),  # the median is 2**-24; half the rounded gap gave 0
        (-(2.0**100), 2.0**100 + 2.0**80),
        (-3e38, 3.3e38),  # the gap overflows float32
        (3e38, 3.3e38),
        (-3.3e38, -3e38),
        (-(2.0**-149), 2.0**-148),  # subnormals
    ],
)
def test_median_of_an_even_count_keeps_the_small_difference_of_opposite_signs(
    device_name: str, low: float, high: float
) -> None:
    matrix = np.array([[-3.4e38], [low], [high], [3.4e38]], dtype=np.float32)
    out = _host(kernels.coordinate_median(torch.from_numpy(matrix), torch.device(device_name)))
    expected = (float(matrix[1, 0]) + float(matrix[2, 0])) / 2  # exact in float64
    np.testing.assert_allclose(out, [expected], rtol=1e-6, atol=2e-45)


@pytest.mark.parametrize("device_name", TORCH_DEVICES)
@settings(max_examples=60, deadline=None)
@given(
    matrix=arrays(np.float32, MATRIX_SHAPES, elements=finite32),
    fraction=st.floats(0, 0.49),
)
def test_trimmed_mean_property(device_name: str, matrix: F32, fraction: float) -> None:
    device = torch.device(device_name)
    n = matrix.shape[0]
    k = kernels.trim_count(n, fraction)
    out = _host(kernels.trimmed_mean(torch.from_numpy(matrix), k, device)).astype(np.float64)
    kept = np.sort(matrix.astype(np.float64), axis=0)[k : n - k]
    scale = np.abs(kept).max(axis=0) + 1e-30
    assert np.all(out >= kept[0] - 1e-6 * scale)
    assert np.all(out <= kept[-1] + 1e-6 * scale)
    np.testing.assert_allclose(out, kept.mean(axis=0), rtol=1e-5, atol=1e-6 * scale.max())


def test_krum_distances_survive_a_large_shared_part(device: torch.device) -> None:
    """Updates sharing a drift of 2.0 per coordinate: |a|² is 8e4, the distances 1e-3 to
    1e-2. Without centring, float32's Gram form rounded them to noise and Krum picked
    the farther (bad) updates."""
    d, f = 20_000, 2
    for seed in range(5):
        rng = np.random.default_rng(seed)
        common = np.full(d, 2.0, np.float32)
        honest = [common + 1e-4 * rng.standard_normal(d).astype(np.float32) for _ in range(7)]
        bad = [common + 1e-3 * rng.standard_normal(d).astype(np.float32) for _ in range(f)]
        rows = torch.from_numpy(np.stack(honest + bad)).to(device)
        x = np.stack(honest + bad).astype(np.float64)
        exact = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        got = _host(kernels.pairwise_sq_distances(rows, device))
        np.testing.assert_allclose(got, exact, rtol=1e-3, atol=1e-6)
        assert all(i < 7 for i in kernels.krum_select(rows, f, 7, device))
