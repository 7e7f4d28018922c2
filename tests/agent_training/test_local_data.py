"""Loading a device's train.npz / val.npz, and the errors that name what is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from agent.errors import AgentError
from agent.local_data import LocalDataError, load_local_data


def _write(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savez(path, x=x, y=y)


def _good(directory: Path) -> None:
    _write(directory / "train.npz", np.ones((6, 4), np.float32), np.arange(6) % 3)
    _write(directory / "val.npz", np.zeros((2, 4), np.float32), np.array([0, 2]))


def test_loads_both_splits(tmp_path: Path) -> None:
    _good(tmp_path)
    data = load_local_data(tmp_path)
    assert data.x_train.shape == (6, 4)
    assert data.x_train.dtype == np.float32
    assert data.y_train.dtype == np.int64
    assert data.x_val.shape == (2, 4)
    assert data.y_val.tolist() == [0, 2]
    assert data.train_samples == 6


@pytest.mark.parametrize("missing", ["train.npz", "val.npz"])
def test_a_missing_file_is_named(tmp_path: Path, missing: str) -> None:
    _good(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(LocalDataError, match=re.escape(missing)) as info:
        load_local_data(tmp_path)
    assert isinstance(info.value, AgentError)


def test_a_missing_directory_names_the_train_file(tmp_path: Path) -> None:
    with pytest.raises(LocalDataError, match=r"train\.npz"):
        load_local_data(tmp_path / "nowhere")


def test_a_missing_array_is_named(tmp_path: Path) -> None:
    _good(tmp_path)
    np.savez(tmp_path / "val.npz", x=np.zeros((2, 4), np.float32))
    with pytest.raises(LocalDataError, match="no array named y"):
        load_local_data(tmp_path)


def test_garbage_is_refused(tmp_path: Path) -> None:
    _good(tmp_path)
    (tmp_path / "train.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(LocalDataError, match="cannot read"):
        load_local_data(tmp_path)


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    _good(tmp_path)
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, None]
    np.savez(tmp_path / "val.npz", x=objects, y=np.array([0, 1]))
    with pytest.raises(LocalDataError, match="cannot read"):
        load_local_data(tmp_path)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.ones((3, 2), np.float32), np.array([0, 1]), "3 rows of x but 2 labels"),
        (np.ones((2, 2), np.float32), np.array([0.5, 1.0]), "integer"),
        (np.ones((2, 2), np.float32), np.array([0, -1]), "negative label"),
        (np.array([[np.nan, 0.0]], np.float32), np.array([0]), "NaN"),
        (np.ones((2, 2), np.int32), np.array([0, 1]), "float"),
    ],
)
def test_inconsistent_arrays_are_refused(
    tmp_path: Path, x: np.ndarray, y: np.ndarray, message: str
) -> None:
    _good(tmp_path)
    _write(tmp_path / "train.npz", x, y)
    with pytest.raises(LocalDataError, match=message):
        load_local_data(tmp_path)


def test_splits_must_have_the_same_row_shape(tmp_path: Path) -> None:
    _good(tmp_path)
    _write(tmp_path / "val.npz", np.zeros((2, 5), np.float32), np.array([0, 1]))
    with pytest.raises(LocalDataError, match="shape"):
        load_local_data(tmp_path)
