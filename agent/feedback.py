"""Labels from applications for earlier predictions, kept as local training data.

`RecentInputs` keeps the inputs of the most recent requests (a ring: one slot per request),
keyed by prediction id (a batch's row ``i`` is ``<id>.<i>``; the batch's own id names no
row). `FeedbackLog` appends a labelled input to ``feedback.npz`` in the device's dataset
directory (arrays ``x`` and ``y``, like ``train.npz``; written atomically, never pickled,
at most `max_rows`, oldest dropped first). A prediction labelled again has its row's label
replaced, not a second row: the last label given counts (a correction, or a retry).
`agent.local_data.load_local_data` adds those rows to the training split, so the learner
trains on them in its next round.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.atomic_file import write_atomically
from agent.errors import AgentError
from agent.local_data import FEEDBACK_FILE, load_feedback

#: A kept input: (request number, the batch, model, version).
_Kept = tuple[int, npt.NDArray[Any], str, str]
#: A labelled row's key: (request number, row).
RowKey = tuple[int, int]


class FeedbackError(AgentError):
    """A label cannot be attached: unknown or expired prediction id, or a bad label."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RecentInputs:
    """The inputs of recent requests, by prediction id, within a byte budget (thread-safe).

    Request ``n`` (counted from 1) gets the id ``<prefix><n>``, the prefix random per
    process, so ids of an earlier run never resolve to this run's inputs. Its input is kept
    in one of three places, each holding at most about `max_bytes`:

    - inputs of at most ``max_bytes / capacity`` bytes (single samples, small batches) in a
      ring of `capacity` slots: request ``n`` takes slot ``n % capacity``. Keeping one is a
      ``next`` on a counter and one list assignment, each atomic under the GIL: no lock;
    - inputs of at most ``max_bytes / (capacity // 4)`` bytes (about four times as many:
      batches of a few dozen samples) the same way, in a ring of ``capacity // 4`` slots;
    - larger inputs in a queue under a lock, the oldest dropped while the queue holds more
      than `max_bytes` (so fewer than ``capacity // 4`` inputs); one larger than that is not
      kept.
    """

    #: Digits a request number may have in an id (a longer one is unknown, not parsed).
    _MAX_DIGITS = 20

    def __init__(self, capacity: int, max_bytes: int = 4 << 20) -> None:
        if capacity < 1 or max_bytes < 1:
            raise ValueError(
                f"capacity and max_bytes must be at least 1, not {capacity}, {max_bytes}"
            )
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.prefix = f"{os.urandom(4).hex()}-"
        self._ring_limit = max_bytes // capacity  # the largest input the ring takes
        self._slots: list[_Kept | None] = [None] * capacity
        self._medium_capacity = max(1, capacity // 4)
        self._medium_limit = max_bytes // self._medium_capacity
        self._medium: list[_Kept | None] = [None] * self._medium_capacity
        self._ids = itertools.count(1)
        self._large: OrderedDict[int, _Kept] = OrderedDict()
        self._large_bytes = 0
        self._lock = threading.Lock()

    def keep(self, batch: npt.NDArray[Any], model: str, version: str) -> str:
        """Remember `batch` (not copied: nobody may change it afterwards); its new id."""
        n = next(self._ids)
        nbytes = batch.nbytes
        if nbytes <= self._ring_limit:
            self._slots[n % self.capacity] = (n, batch, model, version)
        elif nbytes <= self._medium_limit:
            self._medium[n % self._medium_capacity] = (n, batch, model, version)
        else:
            self._keep_large((n, batch, model, version))
        return f"{self.prefix}{n}"

    def _keep_large(self, entry: _Kept) -> None:
        if entry[1].nbytes > self.max_bytes:
            return  # never fits: keeping it would only push the others out
        with self._lock:
            self._large[entry[0]] = entry
            self._large_bytes += entry[1].nbytes
            while self._large_bytes > self.max_bytes:  # each is over max/capacity bytes:
                # so this also keeps fewer than `capacity` of them
                _, dropped = self._large.popitem(last=False)
                self._large_bytes -= dropped[1].nbytes

    def get(self, prediction_id: str) -> tuple[npt.NDArray[Any], str, str]:
        """(the one input row, model, version) of a prediction id; FeedbackError if unknown
        (404's ``unknown_id``) or if it is a batch's own id, which names no one row."""
        return self.find(prediction_id)[1:]

    def find(self, prediction_id: str) -> tuple[RowKey, npt.NDArray[Any], str, str]:
        """`get`, with the row's key first: the same for every spelling of its id."""
        head, dot, index = prediction_id.partition(".")
        number = head[len(self.prefix) :] if head.startswith(self.prefix) else ""
        if (
            number.isascii()
            and number.isdigit()
            and len(number) <= self._MAX_DIGITS
            and (not dot or (index.isascii() and index.isdigit() and len(index) <= 9))
        ):
            n = int(number)
            entry = self._slots[n % self.capacity]
            if entry is None or entry[0] != n:
                entry = self._medium[n % self._medium_capacity]
            if entry is None or entry[0] != n:
                with self._lock:
                    entry = self._large.get(n)
            row = int(index) if dot else 0
            if entry is not None and not dot and len(entry[1]) > 1:
                raise FeedbackError(
                    f"prediction id {prediction_id!r} names a batch of {len(entry[1])} rows, "
                    f"not one: label a row as {prediction_id}.<row> (each answer's "
                    "prediction_id)",
                    "invalid",
                )
            if entry is not None and row < len(entry[1]):
                _, batch, model, version = entry
                return (n, row), batch[row], model, version
        raise FeedbackError(
            f"unknown prediction id {prediction_id!r} (inputs are kept for the last "
            f"{self.capacity} requests, {self._medium_capacity} of larger batches, "
            f"{self.max_bytes / 2**20:g} MiB of the largest)",
            "unknown_id",
        )


class FeedbackLog:
    """Appends labelled inputs to ``<dataset_dir>/feedback.npz`` (thread-safe); a row
    labelled again under the same key (its prediction) gets the new label instead."""

    def __init__(self, dataset_dir: Path, max_rows: int) -> None:
        self.path = dataset_dir / FEEDBACK_FILE
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._x: npt.NDArray[Any] | None = None
        self._y: npt.NDArray[np.int64] | None = None
        self._added = 0  # rows ever added (loaded ones included): the next row's number
        self._keys: OrderedDict[Hashable, int] = OrderedDict()  # key → row number, oldest first

    def rows(self) -> int:
        """How many labelled rows the file holds."""
        with self._lock:
            self._load()
            return 0 if self._y is None else len(self._y)

    def _load(self) -> None:
        if self._x is None:
            loaded = load_feedback(self.path)  # (a damaged file is set aside)
            if loaded is not None:
                self._x, self._y = loaded
                self._added = len(self._y)

    def append(self, x: npt.NDArray[Any], label: int) -> int:
        """Add one row; return the number of rows now kept (0: `max_rows` is 0, none kept).
        FeedbackError if the row holds NaN or Inf (training could never read it again)."""
        return self.put(None, x, label)[0]

    def put(self, key: Hashable | None, x: npt.NDArray[Any], label: int) -> tuple[int, bool]:
        """`append`, except that a `key` put before whose row is still kept has that row's
        label replaced; (rows now kept, whether a label was replaced)."""
        row = np.asarray(x, dtype=np.float32)[None, ...]
        if not np.isfinite(row).all():
            raise FeedbackError("that prediction's input holds NaN or Inf: not kept", "invalid")
        if self.max_rows <= 0:
            return 0, False
        with self._lock:
            self._load()
            at = self._kept_at(key)
            if at is not None and self._x is not None and self._y is not None:
                ys = self._y.copy()
                ys[at] = label
                self._write(self._x, ys)
                return len(ys), True
            if self._x is None or self._y is None or self._x.shape[1:] != row.shape[1:]:
                if self._x is not None and self._x.shape[1:] != row.shape[1:]:
                    # A new model with another input shape: its feedback starts afresh.
                    self._x = self._y = None
                xs, ys = row, np.asarray([label], dtype=np.int64)
            else:  # (max_rows > 0: the slices keep the newest max_rows)
                xs = np.concatenate([self._x, row])[-self.max_rows :]
                ys = np.concatenate([self._y, np.asarray([label], np.int64)])[-self.max_rows :]
            self._write(xs, ys)
            self._added += 1
            if key is not None:
                self._keys[key] = self._added - 1
            self._forget_dropped()
            return len(ys), False

    def _kept_at(self, key: Hashable | None) -> int | None:
        """The index in the kept rows of `key`'s row; None if never put or dropped since."""
        number = self._keys.get(key) if key is not None else None
        if number is None or self._y is None:
            return None
        at = number - (self._added - len(self._y))
        return at if 0 <= at < len(self._y) else None

    def _forget_dropped(self) -> None:
        """Forget the keys of rows no longer kept (the oldest first)."""
        first = self._added - (0 if self._y is None else len(self._y))
        keys = self._keys
        while keys and next(iter(keys.values())) < first:
            keys.popitem(last=False)

    def _write(self, xs: npt.NDArray[Any], ys: npt.NDArray[np.int64]) -> None:
        """Write the file atomically, then keep `xs` and `ys` as its rows."""
        write_atomically(self.path, lambda f: np.savez(f, x=xs, y=ys))
        self._x, self._y = xs, ys
