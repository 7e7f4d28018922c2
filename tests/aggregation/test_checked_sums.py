"""The one-pass checked fold: the C kernel against torch, and CheckedSums' exact restore."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch

from cloud_coordinator import checked_sums
from cloud_coordinator.checked_sums import CheckedSums, NotFiniteError, Part

pytestmark = pytest.mark.skipif(
    not checked_sums.kernel_built(), reason="the C kernel cloud_coordinator._fold is not built"
)
F32 = npt.NDArray[np.float32]
PARALLEL_MIN = 65536  # _fold.c: below this many elements one thread folds


def fold_f32(acc: object, update: object, scale: float, threads: int) -> bool:
    """The kernel itself (imported here: it may not be built)."""
    from cloud_coordinator import _fold

    return _fold.fold_f32(acc, update, scale, threads)  # type: ignore[arg-type]


def _payload(values: F32, offset: int) -> memoryview:
    """`values`' bytes at `offset` bytes into a bytes object, as a payload holds them."""
    return memoryview(b"\x00" * offset + values.tobytes())[offset:]


@pytest.mark.parametrize(
    "size", [0, 1, 7, 15, 16, 17, 33, PARALLEL_MIN - 1, PARALLEL_MIN, PARALLEL_MIN + 5, 300_007]
)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_the_kernel_adds_like_torch_at_any_size_and_alignment(size: int, offset: int) -> None:
    rng = np.random.default_rng(size + offset)
    start = rng.standard_normal(size, dtype=np.float32)
    update = rng.standard_normal(size, dtype=np.float32)
    results = []
    for threads in (1, 2):
        acc = start.copy()
        assert fold_f32(acc, _payload(update, offset), 0.37, threads)
        results.append(acc)
    np.testing.assert_array_equal(results[0], results[1])  # elementwise: threads don't matter
    expected = start.astype(np.float64) + np.float32(0.37) * update.astype(np.float64)
    np.testing.assert_allclose(results[0], expected, rtol=2e-7, atol=1e-7)
    reference = torch.from_numpy(start.copy()).add_(torch.from_numpy(update), alpha=0.37)
    np.testing.assert_allclose(results[0], reference.numpy(), rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("size", [1, 19, PARALLEL_MIN + 17])
def test_the_kernel_reports_nan_and_inf_anywhere(bad: float, size: int) -> None:
    half = ((size + 1) // 2 + 15) & ~15  # where the second thread's share starts
    edges = {0, size - 1, size // 2, half - 1, half}
    for position in sorted(p for p in edges if 0 <= p < size):
        update = np.ones(size, dtype=np.float32)
        update[position] = bad
        for threads in (1, 2):
            assert not fold_f32(np.zeros(size, dtype=np.float32), _payload(update, 1), 1.0, threads)


def test_the_kernel_reports_a_sum_that_overflows() -> None:
    acc = np.full(40, 3e38, dtype=np.float32)
    assert fold_f32(acc, np.full(40, -3e38, dtype=np.float32), 1.0, 2)  # finite: fine
    acc[:] = 3e38
    update = np.zeros(40, dtype=np.float32)
    update[37] = 3e38
    assert not fold_f32(acc, update, 1.0, 2)
    assert np.isinf(acc[37])
    assert np.all(acc[:37] == np.float32(3e38))


def test_the_kernel_refuses_what_it_cannot_fold() -> None:
    acc = np.zeros(8, dtype=np.float32)
    with pytest.raises(ValueError, match="32 accumulator bytes and 28 update bytes"):
        fold_f32(acc, np.zeros(7, dtype=np.float32), 1.0, 1)
    assert fold_f32(acc, bytes(32), 1.0, 1)  # an update may be read-only bytes...
    with pytest.raises((BufferError, TypeError)):
        fold_f32(bytes(32), acc, 1.0, 1)  # ...the sums may not
    misaligned = np.zeros(9, dtype=np.float32).view(np.uint8)[1:33]
    with pytest.raises(ValueError, match="aligned"):
        fold_f32(misaligned, b"\x00" * 32, 1.0, 1)


def _sums(sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(n) for name, n in sizes.items()}


def _dense(name: str, values: F32) -> Part:
    return (name, torch.from_numpy(values), None)


def test_a_refused_update_restores_the_sums_bit_for_bit_after_snapshots() -> None:
    rng = np.random.default_rng(0)
    sizes = {"w": 1000, "b": 10}
    # room for 3 updates of 4,040 bytes: a snapshot every 3 updates
    sums = CheckedSums(_sums(sizes), keep_bytes=3 * 4040 + 100)
    reference = _sums(sizes)
    for i in range(10):
        update = [_dense(n, rng.standard_normal(s, dtype=np.float32)) for n, s in sizes.items()]
        scale = float(rng.uniform(1, 100))
        sums.add(update, scale)
        for name, values, _ in update:
            reference[name].add_(values, alpha=scale)
        if i in (4, 9):  # a bad update refused after the snapshots: nothing changed
            before = {name: s.clone() for name, s in sums._sums.items()}
            good = rng.standard_normal(1000, dtype=np.float32)
            bad = rng.standard_normal(10, dtype=np.float32)
            bad[3] = np.nan
            with pytest.raises(NotFiniteError) as info:
                sums.add([_dense("w", good), _dense("b", bad)], 3.0)  # "w" was folded already
            assert info.value.name == "b"
            for name, s in sums._sums.items():
                assert torch.equal(s, before[name]), name
    assert (sums.snapshots, sums.restores) == (3, 2)
    for name, s in sums._sums.items():
        np.testing.assert_allclose(s.numpy(), reference[name].numpy(), rtol=1e-5, atol=1e-4)


def test_a_refused_first_update_leaves_zeros() -> None:
    sums = CheckedSums(_sums({"w": 64}))
    bad = np.ones(64, dtype=np.float32)
    bad[63] = np.inf
    with pytest.raises(NotFiniteError):
        sums.add([_dense("w", bad)], 1.0)
    assert torch.equal(sums._sums["w"], torch.zeros(64))


def test_sparse_parts_are_checked_and_restored() -> None:
    sums = CheckedSums(_sums({"w": 8}))
    sums.add([_dense("w", np.arange(8, dtype=np.float32))], 1.0)
    flat = torch.tensor([1, 6])
    sums.add([("w", torch.tensor([10.0, 20.0]), flat)], 0.5)
    expected = torch.tensor([0, 6, 2, 3, 4, 5, 16, 7], dtype=torch.float32)
    assert torch.equal(sums._sums["w"], expected)
    with pytest.raises(NotFiniteError):
        sums.add([("w", torch.tensor([1.0, float("nan")]), flat)], 1.0)
    assert torch.equal(sums._sums["w"], expected)


def test_parts_it_cannot_fold_are_refused_before_any_is_folded() -> None:
    sums = CheckedSums(_sums({"w": 4, "b": 2}))
    good = _dense("w", np.ones(4, dtype=np.float32))
    for bad in [
        ("b", torch.ones(2, dtype=torch.float64), None),
        ("b", torch.ones(4)[::2], None),
        ("c", torch.ones(2), None),
    ]:
        with pytest.raises(ValueError, match=r"'[bc]'"):
            sums.add([good, bad], 1.0)
        assert torch.equal(sums._sums["w"], torch.zeros(4))


def test_usable_only_for_cpu_float32_sums_with_room_to_replay() -> None:
    assert checked_sums.usable(_sums({"w": 100}), keep_bytes=800)
    assert not checked_sums.usable(_sums({"w": 100}), keep_bytes=799)  # not two updates
    assert not checked_sums.usable({"w": torch.zeros(4, dtype=torch.float64)})
    assert not checked_sums.usable({})
    with pytest.raises(ValueError, match="CheckedSums needs"):
        CheckedSums({"w": torch.zeros(4, dtype=torch.float64)})
