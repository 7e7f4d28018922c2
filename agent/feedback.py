"""Labels from applications for earlier predictions, kept as local training data.

`RecentInputs` is a bounded LRU of recent prediction inputs: one entry per request, keyed
by its prediction id (a batch's row ``i`` is ``<id>.<i>``). `FeedbackLog` appends a
labelled input to ``feedback.npz`` in the device's dataset directory (arrays ``x`` and
``y``, like ``train.npz``; written atomically, never pickled, at most `max_rows`, oldest
dropped first). `agent.local_data.load_local_data` adds those rows to the training split,
so the learner trains on them in its next round.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import AgentError
from agent.local_data import FEEDBACK_FILE, read_feedback


class FeedbackError(AgentError):
    """A label cannot be attached: unknown or expired prediction id, or a bad label."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RecentInputs:
    """The inputs of the last `capacity` requests, by prediction id (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[npt.NDArray[Any], str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, prediction_id: str, batch: npt.NDArray[Any], model: str, version: str) -> None:
        """Remember `batch` (not copied: callers pass an array nobody changes afterwards)."""
        with self._lock:
            self._entries[prediction_id] = (batch, model, version)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, prediction_id: str) -> tuple[npt.NDArray[Any], str, str]:
        """(the one input row, model, version) of a prediction id; FeedbackError if unknown."""
        with self._lock:
            entry = self._entries.get(prediction_id)
            row = 0
            if entry is None:
                request, _, index = prediction_id.rpartition(".")
                entry = self._entries.get(request)
                if entry is None or not index.isdigit() or int(index) >= len(entry[0]):
                    raise FeedbackError(
                        f"unknown prediction id {prediction_id!r} (only the last "
                        f"{self.capacity} requests are kept)",
                        "unknown_id",
                    )
                row = int(index)
        batch, model, version = entry
        return batch[row], model, version


class FeedbackLog:
    """Appends labelled inputs to ``<dataset_dir>/feedback.npz`` (thread-safe)."""

    def __init__(self, dataset_dir: Path, max_rows: int) -> None:
        self.path = dataset_dir / FEEDBACK_FILE
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._x: npt.NDArray[Any] | None = None
        self._y: npt.NDArray[np.int64] | None = None

    def rows(self) -> int:
        """How many labelled rows the file holds."""
        with self._lock:
            self._load()
            return 0 if self._y is None else len(self._y)

    def _load(self) -> None:
        if self._x is None and self.path.is_file():
            self._x, self._y = read_feedback(self.path)

    def append(self, x: npt.NDArray[Any], label: int) -> int:
        """Add one row; return the number of rows now kept. FeedbackError if shapes differ."""
        row = np.asarray(x, dtype=np.float32)[None, ...]
        with self._lock:
            self._load()
            if self._x is None or self._y is None or self._x.shape[1:] != row.shape[1:]:
                if self._x is not None and self._x.shape[1:] != row.shape[1:]:
                    # A new model with another input shape: its feedback starts afresh.
                    self._x = self._y = None
                xs, ys = row, np.asarray([label], dtype=np.int64)
            else:
                xs = np.concatenate([self._x, row])[-self.max_rows :]
                ys = np.concatenate([self._y, np.asarray([label], np.int64)])[-self.max_rows :]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, x=xs, y=ys)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._x, self._y = xs, ys
            return len(ys)
