"""The device's own training data: ``train.npz`` and ``val.npz`` in one directory.

Each file holds two arrays: ``x`` (float32, one row per sample, any trailing shape the
backbone takes) and ``y`` (int64 class labels, one per row). Files are read with
``allow_pickle=False``: an object array is refused, never unpickled.

``feedback.npz`` (optional, same arrays) holds inputs that applications labelled through
the inference API (`agent.feedback`); its rows are appended to the training split when
their shape matches, and ignored otherwise (they belong to a model with another input).

    AgentError (agent.errors)
    └── LocalDataError   a data file is missing, unreadable or inconsistent
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.errors import AgentError

log = logging.getLogger(__name__)

TRAIN_FILE = "train.npz"
VAL_FILE = "val.npz"
FEEDBACK_FILE = "feedback.npz"


class LocalDataError(AgentError):
    """The local data directory does not hold usable ``train.npz`` / ``val.npz`` files."""


@dataclass(frozen=True, slots=True)
class LocalData:
    """Training and validation splits of one device."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_val: npt.NDArray[np.float32]
    y_val: npt.NDArray[np.int64]

    @property
    def train_samples(self) -> int:
        """Number of training samples (the FedAvg weight of this device)."""
        return int(self.y_train.shape[0])


def _read_split(
    path: Path,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    if not path.is_file():
        raise LocalDataError(f"missing data file {path.name} in {path.parent}")
    import zipfile  # here, not at the top: an agent that never trains never loads it

    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise LocalDataError(f"{path}: no array named {' or '.join(missing)}")
            x = archive["x"]
            y = archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise LocalDataError(f"cannot read {path}: {exc}") from exc
    if not np.issubdtype(x.dtype, np.floating) or x.ndim < 1:
        raise LocalDataError(f"{path}: x must be a float array, got {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise LocalDataError(f"{path}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise LocalDataError(f"{path}: {x.shape[0]} rows of x but {y.shape[0]} labels")
    if y.size and int(y.min()) < 0:
        raise LocalDataError(f"{path}: negative label {int(y.min())}")
    if not np.isfinite(x).all():
        raise LocalDataError(f"{path}: x holds NaN or Inf")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def read_feedback(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The labelled rows of a ``feedback.npz``; LocalDataError if it is malformed."""
    return _read_split(path)


def load_feedback(
    path: Path,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None:
    """The rows of the agent's own ``feedback.npz``, or None if there is none. A damaged
    one is set aside as ``feedback.npz.damaged-<time>`` (logged) and None returned: it
    would otherwise fail every training task and every feedback until deleted by hand."""
    if not path.is_file():
        return None
    try:
        return _read_split(path)
    except LocalDataError as exc:
        aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
        try:
            path.replace(aside)
        except OSError:
            raise exc from None
        log.error("%s; set aside as %s, feedback starts afresh", exc, aside.name)
        return None


def load_local_data(directory: Path | str) -> LocalData:
    """Both splits from `directory` (feedback rows added to train); LocalDataError if bad."""
    root = Path(directory)
    train_x, train_y = _read_split(root / TRAIN_FILE)
    feedback = load_feedback(root / FEEDBACK_FILE)
    if feedback is not None:
        fb_x, fb_y = feedback
        if fb_x.shape[1:] == train_x.shape[1:]:
            train_x = np.concatenate([train_x, fb_x])
            train_y = np.concatenate([train_y, fb_y])
    val_x, val_y = _read_split(root / VAL_FILE)
    if train_y.size == 0:
        raise LocalDataError(f"{root / TRAIN_FILE}: no training samples")
    if train_x.shape[1:] != val_x.shape[1:]:
        raise LocalDataError(
            f"{root}: train rows have shape {train_x.shape[1:]} but val rows {val_x.shape[1:]}"
        )
    return LocalData(train_x, train_y, val_x, val_y)
