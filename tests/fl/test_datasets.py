"""Data splits, fleet partitions and device files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud_coordinator import datasets
from cloud_coordinator.templates import get_template, template_names


def labels(n_classes: int = 10, per_class: int = 60) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def assert_partition(shards: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(shards)
    assert len(joined) == n, "every sample is placed exactly once"
    assert np.array_equal(np.sort(joined), np.arange(n))
    for shard in shards:
        assert shard.dtype == np.int64
        assert np.array_equal(shard, np.sort(shard))


def skew(y: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean total-variation distance of the devices' label mix from the global mix."""
    overall = np.bincount(y, minlength=y.max() + 1) / len(y)
    mixes = [np.bincount(y[s], minlength=y.max() + 1) / len(s) for s in shards]
    return float(np.mean([0.5 * np.abs(mix - overall).sum() for mix in mixes]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_disjoint_complete_and_seeded(scheme: str) -> None:
    y = labels()
    shards = datasets.partition(y, 7, scheme, alpha=0.5, seed=3, min_per_device=5)
    assert_partition(shards, len(y))
    assert min(len(s) for s in shards) >= 5
    again = datasets.partition(y, 7, scheme, alpha=0.5, seed=3, min_per_device=5)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = datasets.partition(y, 7, scheme, alpha=0.5, seed=4, min_per_device=5)
    assert any(not np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def test_iid_shares_are_equal_and_mixed() -> None:
    y = labels()
    shards = datasets.partition(y, 8, "iid", seed=0)
    assert {len(s) for s in shards} == {75}
    assert skew(y, shards) < 0.2


def test_dirichlet_skews_labels_more_as_alpha_shrinks() -> None:
    y = labels()
    iid = skew(y, datasets.partition(y, 10, "iid", seed=1))
    mild = skew(y, datasets.partition(y, 10, "dirichlet", alpha=10.0, seed=1))
    strong = skew(y, datasets.partition(y, 10, "dirichlet", alpha=0.1, seed=1))
    assert strong > 0.5 > iid
    assert strong > mild


def test_dirichlet_tops_up_small_devices_when_redrawing_does_not_help() -> None:
    y = labels(n_classes=3, per_class=40)
    shards = datasets.partition(y, 12, "dirichlet", alpha=0.01, seed=0, min_per_device=10)
    assert_partition(shards, len(y))
    assert {len(s) for s in shards} == {10}


def test_bad_partitions_are_refused() -> None:
    with pytest.raises(ValueError, match="iid, dirichlet"):
        datasets.partition(labels(), 3, "shards")
    with pytest.raises(ValueError, match="cannot give"):
        datasets.partition(labels(1, 10), 3, min_per_device=4)
    with pytest.raises(ValueError, match="alpha"):
        datasets.partition(labels(), 3, "dirichlet", alpha=0.0)


def test_split_holdout_is_stratified_disjoint_and_seeded() -> None:
    y = np.array([0] * 80 + [1] * 20)
    x = np.zeros((100, 2))
    kept, held = datasets.split_holdout(x, y, 0.25, seed=9)
    assert len(held) == 25
    assert len(kept) == 75
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(100))
    assert np.bincount(y[held]).tolist() == [20, 5]
    again = datasets.split_holdout(x, y, 0.25, seed=9)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(datasets.split_holdout(x, y, 0.25, seed=10)[1], held)


@pytest.mark.parametrize("name", template_names())
def test_server_data_never_overlaps_device_data(name: str) -> None:
    template = get_template(name)
    server = datasets.server_data(template, seed=2)
    pool = datasets.device_pool(template, seed=2)
    full = datasets.load_dataset(template)
    parts = [server.holdout.index, server.pretrain.index, pool.index]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) == len(full)
    assert len(server.holdout) == pytest.approx(0.2 * len(full), abs=1)
    assert len(server.pretrain) == pytest.approx(template.server_fraction * len(full), abs=1)
    for part in (server.holdout, server.pretrain, pool):
        assert np.array_equal(part.x, full.x[part.index])
        assert part.x.shape[1:] == template.input_shape
    again = datasets.server_data(template, seed=2)
    assert np.array_equal(again.holdout.index, server.holdout.index)
    other = datasets.server_data(template, seed=3)
    assert not np.array_equal(other.holdout.index, server.holdout.index)


def test_digits_are_scaled_to_the_unit_interval() -> None:
    full = datasets.load_dataset(get_template("digits_cnn"))
    assert full.x.dtype == np.float32
    assert full.y.dtype == np.int64
    assert full.x.shape == (1797, 1, 8, 8)
    assert full.x.min() == 0.0
    assert full.x.max() == 1.0


def test_device_files_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 1, 8, 8))
    y = rng.integers(0, 10, size=50)
    train, val = datasets.write_device_data(tmp_path / "dev", x, y, val_fraction=0.2, seed=1)
    assert (train.name, val.name) == ("train.npz", "val.npz")
    x_train, y_train = datasets.read_device_file(train)
    x_val, y_val = datasets.read_device_file(val)
    assert x_train.dtype == np.float32
    assert y_train.dtype == np.int64
    assert (len(x_train), len(x_val)) == (40, 10)
    assert x_train.shape[1:] == (1, 8, 8)
    rows = {(r.tobytes(), int(c)) for r, c in zip(x.astype(np.float32), y, strict=True)}
    written = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    assert {(r.tobytes(), int(c)) for r, c in zip(*written, strict=True)} == rows
    assert not list((tmp_path / "dev").glob(".*")), "no temporary files are left behind"


def test_a_two_sample_device_still_gets_a_validation_sample(tmp_path: Path) -> None:
    train, val = datasets.write_device_data(tmp_path, np.zeros((2, 3)), np.array([0, 1]), 0.1)
    assert len(datasets.read_device_file(train)[1]) == 1
    assert len(datasets.read_device_file(val)[1]) == 1


def test_prepare_fleet_writes_every_pool_sample_once(tmp_path: Path) -> None:
    template = get_template("machine_health")
    dirs = datasets.prepare_fleet(template, 10, "dirichlet", 0.5, 7, tmp_path)
    assert [d.name for d in dirs] == [f"agent-{i:02d}" for i in range(1, 11)]
    xs, ys = [], []
    for directory in dirs:
        for file in (datasets.TRAIN_FILE, datasets.VAL_FILE):
            x, y = datasets.read_device_file(directory / file)
            assert x.shape[1:] == template.input_shape
            xs.append(x)
            ys.append(y)
        assert (
            sum(len(datasets.read_device_file(directory / f)[1]) for f in ("train.npz", "val.npz"))
            >= 10
        )
    pool = datasets.device_pool(template, 7)
    device_rows = sorted(
        r.tobytes() + bytes([c])
        for r, c in zip(np.concatenate(xs), np.concatenate(ys), strict=True)
    )
    pool_rows = sorted(r.tobytes() + bytes([c]) for r, c in zip(pool.x, pool.y, strict=True))
    assert device_rows == pool_rows
    # Same seed, same files.
    again = datasets.prepare_fleet(template, 10, "dirichlet", 0.5, 7, tmp_path / "again")
    for a, b in zip(dirs, again, strict=True):
        assert (a / "train.npz").read_bytes() == (b / "train.npz").read_bytes()


def test_device_ids_grow_past_99() -> None:
    assert datasets.device_ids(3) == ["agent-01", "agent-02", "agent-03"]
    assert datasets.device_ids(100)[0] == "agent-001"
