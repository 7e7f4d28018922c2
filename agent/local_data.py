"""The device's own training data: ``train.npz`` and ``val.npz`` in one directory.

Each file holds two arrays: ``x`` (float32, one row per sample, any trailing shape the
backbone takes) and ``y`` (int64 class labels, one per row). Files are read with
``allow_pickle=False``: an object array is refused, never unpickled.

``feedback.npz`` (optional, same arrays) holds inputs that applications labelled through
the inference API (`agent.feedback`), and ``feedback.journal`` beside it the labels since
it was last rewritten (`agent.feedback_journal`): read as one, they are appended to the
training split when their shape matches, and ignored otherwise (they belong to a model
with another input).

    AgentError (agent.errors)
    └── LocalDataError   a data file is missing, unreadable or inconsistent
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent import feedback_journal
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
    x, y, _ = _read_npz(path)
    return x, y


def _read_npz(
    path: Path,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], int]:
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
            generation = archive["generation"] if "generation" in archive.files else 0
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
    if np.ndim(generation) != 0 or not np.issubdtype(np.asarray(generation).dtype, np.integer):
        raise LocalDataError(f"{path}: generation must be one integer")
    if int(generation) < 0:
        raise LocalDataError(f"{path}: negative generation {int(generation)}")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False), int(generation)


def read_feedback(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The labelled rows of a ``feedback.npz`` and its journal; LocalDataError if either is
    malformed, or if neither exists."""
    rows = _feedback(path, strict=True)
    if rows is None:
        raise LocalDataError(f"missing data file {path.name} in {path.parent}")
    return rows


def load_feedback(
    path: Path,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None:
    """The rows of the agent's own ``feedback.npz`` and journal, or None if there are none.
    A damaged npz is set aside as ``feedback.npz.damaged-<time>`` (logged) and read as
    none: it would otherwise fail every training task and every feedback until deleted by
    hand. Of a damaged journal, the records before the damage are used (logged)."""
    return _feedback(path, strict=False)


def load_feedback_npz(
    path: Path,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], int] | None:
    """``feedback.npz``'s rows and generation; None if there is none, or it is damaged
    (then set aside, as `load_feedback` does)."""
    if not path.is_file():
        return None
    try:
        return _read_npz(path)
    except LocalDataError as exc:
        try:
            aside = feedback_journal.set_aside(path)
        except OSError:
            raise exc from None
        log.error("%s; set aside as %s, feedback starts afresh", exc, aside.name)
        return None


def _feedback(
    path: Path, strict: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None:
    journal_path = feedback_journal.path_for(path)
    try:  # The journal first: a compaction after this read leaves the journal read older
        # than the npz read next (ignored: the npz holds its rows), never newer.
        journal = feedback_journal.read(journal_path)
    except feedback_journal.JournalError as exc:
        if strict:
            raise LocalDataError(str(exc)) from exc
        log.warning("%s: ignored", exc)
        journal = None
    base = _read_npz(path) if strict and path.is_file() else load_feedback_npz(path)
    generation = 0 if base is None else base[2]
    if journal is None or journal.generation != generation:
        if journal is not None and journal.generation > generation:
            log.warning("%s is of generation %d, %s of %d: ignored", journal_path.name,
                        journal.generation, path.name, generation)  # fmt: skip
        return None if base is None else base[:2]
    rows = feedback_journal.Rows() if base is None else feedback_journal.Rows(*base[:2])
    applied = rows.replay(journal)
    if journal.damage is not None:
        if strict:
            raise LocalDataError(f"{journal_path}: {journal.damage}")
        log.warning("%s: %s; the %d records before it used", journal_path.name,
                    journal.damage, applied)  # fmt: skip
    if applied == 0:
        return None if base is None else base[:2]
    return rows.arrays()


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
