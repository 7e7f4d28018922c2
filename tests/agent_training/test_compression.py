"""Delta compression: every scheme through the protocol decoder, top-k, error feedback, clipping."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from agent.compression import (
    CompressionError,
    Compressor,
    clip_by_norm,
    global_norm,
    topk_threshold,
)
from protocols import schema, wire
from protocols.tensors import WireTensor, decode_sparse, decode_tensor

Arrays = dict[str, npt.NDArray[np.float32]]


def _deltas(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {
        "0.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "0.bias": (rng.standard_normal(64) * 0.01).astype(np.float32),
        "2.weight": rng.standard_normal((10, 64)).astype(np.float32) * 3,
    }


def _through_the_wire(tensors: tuple[WireTensor, ...]) -> dict[str, np.ndarray]:
    """Pack as a receiver gets them, unpack, decode with the protocol's decoder."""
    packed = wire.pack_map({"tensors": [schema.to_map(t) for t in tensors]})
    items = wire.unpack_map(packed)["tensors"]
    return {
        t.name: np.asarray(decode_tensor(t))
        for t in (schema.from_map(WireTensor, item) for item in items)
    }


@pytest.mark.parametrize(
    ("scheme", "relative"),
    [("f32", 0.0), ("f16", 2.0**-11), ("bf16", 2.0**-8)],
)
def test_float_schemes_round_trip_within_their_precision(scheme: str, relative: float) -> None:
    deltas = _deltas()
    out = _through_the_wire(Compressor().compress(deltas, scheme))
    for name, delta in deltas.items():
        assert out[name].shape == delta.shape
        np.testing.assert_allclose(out[name], delta, rtol=relative, atol=0)


def test_int8_round_trips_within_half_a_step_per_tensor() -> None:
    deltas = _deltas()
    tensors = Compressor().compress(deltas, "int8")
    out = _through_the_wire(tensors)
    for tensor in tensors:
        delta = deltas[tensor.name]
        assert tensor.dtype == "i8"
        assert tensor.scale == pytest.approx(float(np.abs(delta).max()) / 127)
        assert np.abs(out[tensor.name] - delta).max() <= tensor.scale / 2 * 1.0001


def test_payload_sizes_follow_the_scheme() -> None:
    deltas = _deltas()
    elements = sum(a.size for a in deltas.values())
    sizes = {}
    for scheme in ("f32", "f16", "bf16", "int8"):
        compressor = Compressor()
        compressor.compress(deltas, scheme)
        stats = compressor.last_stats
        assert stats is not None
        assert stats.elements == stats.sent_elements == elements
        sizes[scheme] = stats.payload_bytes
    assert sizes == {
        "f32": 4 * elements,
        "f16": 2 * elements,
        "bf16": 2 * elements,
        "int8": elements,
    }


def test_topk_keeps_about_k_of_the_largest_elements() -> None:
    rng = np.random.default_rng(1)
    delta = rng.standard_normal(200_000).astype(np.float32)
    compressor = Compressor()
    (tensor,) = compressor.compress({"w": delta}, "topk", topk_fraction=0.01, rng=rng)
    assert tensor.is_sparse
    assert tensor.dtype == "i8"
    index, values = decode_sparse(tensor)
    assert 0.7 * 2000 <= index.size <= 1.3 * 2000
    kept = np.zeros(delta.size, dtype=bool)
    kept[index] = True
    # Everything kept is at least as large as everything dropped (a threshold, not a guess).
    assert np.abs(delta[kept]).min() >= np.abs(delta[~kept]).max()
    np.testing.assert_allclose(values, delta[index], atol=tensor.scale / 2 * 1.0001)
    stats = compressor.last_stats
    assert stats is not None
    assert stats.sent_elements == index.size
    assert stats.payload_bytes == tensor.nbytes
    assert stats.ratio > 100  # int8 values plus one- or two-byte index gaps


def test_topk_on_a_small_tensor_is_exact() -> None:
    delta = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05], dtype=np.float32)
    (tensor,) = Compressor().compress({"b": delta}, "topk", topk_fraction=0.25)
    index, _ = decode_sparse(tensor)
    assert index.tolist() == [1, 6]


def test_topk_of_zeros_sends_nothing() -> None:
    (tensor,) = Compressor().compress({"z": np.zeros(10_000, np.float32)}, "topk")
    assert decode_sparse(tensor)[0].size == 0


def test_threshold_is_estimated_from_a_sample() -> None:
    rng = np.random.default_rng(2)
    magnitudes = np.abs(rng.standard_normal(1_000_000)).astype(np.float32)
    threshold, exact = topk_threshold(magnitudes, 0.01, rng)
    assert not exact
    assert 0.8 < np.mean(magnitudes >= threshold) / 0.01 < 1.2


def test_residual_is_exactly_what_was_not_sent() -> None:
    deltas = _deltas()
    compressor = Compressor()
    rng = np.random.default_rng(3)
    first = _through_the_wire(compressor.compress(deltas, "topk", 0.05, rng))
    for name, delta in deltas.items():
        np.testing.assert_allclose(compressor.residuals[name] + first[name], delta, atol=1e-6)
    previous = {k: v.copy() for k, v in compressor.residuals.items()}
    second = _through_the_wire(compressor.compress(deltas, "int8"))
    for name, delta in deltas.items():
        total = delta + previous[name]
        np.testing.assert_allclose(compressor.residuals[name] + second[name], total, atol=1e-5)


def test_error_feedback_tracks_the_cumulative_sum() -> None:
    """Sending the same delta again and again, what arrived tracks what was meant."""
    deltas = _deltas()
    compressor = Compressor()
    rng = np.random.default_rng(4)
    received = {name: np.zeros_like(a) for name, a in deltas.items()}
    errors = {}
    for step in range(1, 401):
        for name, value in _through_the_wire(
            compressor.compress(deltas, "topk", topk_fraction=0.02, rng=rng)
        ).items():
            received[name] += value
        if step in (100, 200, 400):
            gap = {name: step * deltas[name] - received[name] for name in deltas}
            errors[step] = global_norm(gap) / (step * global_norm(deltas))
            stats = compressor.last_stats
            assert stats is not None
            assert stats.residual_norm == pytest.approx(global_norm(gap), rel=1e-3)
    # The absolute gap stays bounded, so the relative gap shrinks like 1/step.
    assert errors[400] < 0.6 * errors[200] < 0.36 * errors[100]
    assert errors[400] < 0.1


def test_residuals_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "residuals.npz"
    deltas = _deltas()
    first = Compressor(path)
    first.compress(deltas, "topk", topk_fraction=0.05)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["residuals.npz"]  # no temp files left
    second = Compressor(path)
    assert second.residuals.keys() == first.residuals.keys()
    for name in deltas:
        np.testing.assert_array_equal(second.residuals[name], first.residuals[name])
    # The restarted compressor continues exactly where the first would have.
    a = first.compress(deltas, "topk", topk_fraction=0.05, rng=np.random.default_rng(5))
    b = second.compress(deltas, "topk", topk_fraction=0.05, rng=np.random.default_rng(5))
    assert [bytes(t.data) for t in a] == [bytes(t.data) for t in b]


def test_without_autosave_only_save_writes(tmp_path: Path) -> None:
    path = tmp_path / "residuals.npz"
    compressor = Compressor(path, autosave=False)
    compressor.compress(_deltas(), "topk")
    assert not path.exists()
    compressor.save()
    assert Compressor(path).residuals.keys() == compressor.residuals.keys()


def test_a_corrupt_residual_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "residuals.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(CompressionError, match="delete it"):
        Compressor(path)


def test_reset_forgets_the_residuals(tmp_path: Path) -> None:
    path = tmp_path / "residuals.npz"
    compressor = Compressor(path)
    compressor.compress(_deltas(), "topk")
    compressor.reset()
    assert compressor.residuals == {}
    assert Compressor(path).residuals == {}


def test_a_tensor_whose_shape_changed_starts_over() -> None:
    compressor = Compressor()
    compressor.compress({"w": np.ones((4, 4), np.float32)}, "topk", topk_fraction=0.1)
    (tensor,) = compressor.compress({"w": np.ones(8, np.float32)}, "int8")
    assert tensor.shape == (8,)
    np.testing.assert_allclose(decode_tensor(tensor), np.ones(8))


@pytest.mark.parametrize("scheme", ["f32", "f16", "int8", "topk"])
def test_nan_is_refused_and_its_residual_dropped(scheme: str) -> None:
    compressor = Compressor()
    compressor.compress({"w": np.ones(100, np.float32)}, "topk", topk_fraction=0.1)
    bad = np.ones(100, np.float32)
    bad[7] = np.nan
    with pytest.raises(CompressionError, match="NaN"):
        compressor.compress({"w": bad}, scheme)
    assert "w" not in compressor.residuals


def test_f16_overflow_is_refused() -> None:
    with pytest.raises(CompressionError):
        Compressor().compress({"w": np.full(4, 1e6, np.float32)}, "f16")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(CompressionError, match="unknown compression scheme"):
        Compressor().compress(_deltas(), "zip")
    with pytest.raises(CompressionError, match="topk_fraction"):
        Compressor().compress(_deltas(), "topk", topk_fraction=0.0)


def test_the_callers_arrays_are_not_modified() -> None:
    deltas = _deltas()
    copies = {k: v.copy() for k, v in deltas.items()}
    compressor = Compressor()
    for scheme in ("topk", "f32", "int8", "topk"):
        compressor.compress(deltas, scheme)
    for name in deltas:
        np.testing.assert_array_equal(deltas[name], copies[name])


def test_clip_by_norm_scales_everything_together() -> None:
    deltas = {"a": np.full(4, 3.0, np.float32), "b": np.full(9, 4.0 / 3.0, np.float32)}
    norm = math.sqrt(4 * 9 + 9 * 16 / 9)  # = sqrt(52)
    clipped, before = clip_by_norm(deltas, 1.0)
    assert before == pytest.approx(norm)
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"] / deltas["a"], 1.0 / norm, rtol=1e-6)
    np.testing.assert_allclose(clipped["b"] / deltas["b"], 1.0 / norm, rtol=1e-6)
    assert deltas["a"][0] == 3.0  # inputs untouched


def test_clip_by_norm_leaves_small_deltas_alone() -> None:
    deltas = _deltas()
    clipped, before = clip_by_norm(deltas, 1e6)
    assert before == pytest.approx(global_norm(deltas))
    for name in deltas:
        np.testing.assert_array_equal(clipped[name], deltas[name])


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf, math.nan])
def test_clip_by_norm_needs_a_positive_bound(max_norm: float) -> None:
    with pytest.raises(CompressionError, match="max_norm"):
        clip_by_norm(_deltas(), max_norm)


def test_clip_by_norm_refuses_nan() -> None:
    with pytest.raises(CompressionError, match="NaN"):
        clip_by_norm({"w": np.array([np.nan], np.float32)}, 1.0)


def test_topk_selects_across_the_whole_update() -> None:
    """One threshold for all tensors: the budget goes where the largest values are."""
    rng = np.random.default_rng(6)
    deltas = {
        "big": (rng.standard_normal(50_000) * 10).astype(np.float32),
        "small": (rng.standard_normal(50_000) * 0.1).astype(np.float32),
        "bias": np.full(10, 0.01, np.float32),
    }
    compressor = Compressor()
    tensors = compressor.compress(deltas, "topk", topk_fraction=0.01, rng=rng)
    counts = {t.name: decode_sparse(t)[0].size for t in tensors}
    assert counts["small"] == counts["bias"] == 0
    assert 0.7 * 1000 <= counts["big"] <= 1.3 * 1000  # 1 % of all 100,010 elements
    stats = compressor.last_stats
    assert stats is not None
    assert stats.elements == 100_010
    assert stats.sent_elements == counts["big"]
    # Nothing is lost: what was not sent stays in the residual.
    np.testing.assert_array_equal(compressor.residuals["small"], deltas["small"])
    np.testing.assert_array_equal(compressor.residuals["bias"], deltas["bias"])


def test_exact_topk_over_a_small_update_spans_tensors() -> None:
    deltas = {
        "a": np.array([0.1, -5.0, 0.2, 3.0], np.float32),
        "b": np.array([-0.3, 0.0, 4.0, 0.05], np.float32),
    }
    tensors = Compressor().compress(deltas, "topk", topk_fraction=0.25)
    assert [decode_sparse(t)[0].tolist() for t in tensors] == [[1], [2]]
