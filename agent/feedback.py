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

import contextlib
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent import feedback_journal
from agent.atomic_file import write_atomically
from agent.errors import AgentError
from agent.local_data import FEEDBACK_FILE, load_feedback_npz

log = logging.getLogger(__name__)

#: Compaction folds the journal into the npz once it holds this many records and as many
#: as the rows kept, or this many bytes and as many as the rows kept take: each label
#: costs O(1) amortised (the npz rewritten once per at least as many labels as it has rows).
COMPACT_RECORDS = 1024
COMPACT_BYTES = 1 << 20

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
    """Labelled inputs in ``<dataset_dir>/feedback.npz`` and its journal (thread-safe): a
    label is one record appended to ``feedback.journal`` and fsynced, folded into the npz
    once the journal outgrows `COMPACT_RECORDS` records and the rows kept (or
    `COMPACT_BYTES` bytes and the rows' bytes); a row labelled again under the same key
    (its prediction) gets the new label instead."""

    def __init__(self, dataset_dir: Path, max_rows: int) -> None:
        self.path = dataset_dir / FEEDBACK_FILE
        self.journal_path = feedback_journal.path_for(self.path)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._rows: feedback_journal.Rows | None = None  # None: not loaded yet
        self._generation = 0  # of the npz the journal applies to
        self._end: int | None = None  # the journal's size; None: to be created first
        self._records = 0  # in the journal
        self._added = 0  # rows ever added (loaded ones included): the next row's number
        self._keys: OrderedDict[Hashable, int] = OrderedDict()  # key → row number, oldest first
        self._damaged_journal = False  # a damaged journal waits to be folded and set aside
        self._fold_written = False  # its rows are in the npz already

    def rows(self) -> int:
        """How many labelled rows the file holds."""
        with self._lock:
            return len(self._load())

    def _load(self) -> feedback_journal.Rows:
        """The rows kept, read from the npz and the journal the first time."""
        if self._rows is None:
            base = load_feedback_npz(self.path)  # (a damaged file is set aside)
            self._generation = 0 if base is None else base[2]
            self._rows = (
                feedback_journal.Rows() if base is None else feedback_journal.Rows(*base[:2])
            )
            try:
                self._open_journal()
            except OSError:  # (a journal that could not be set aside: read again next time,
                self._rows = None  # never written over)
                raise
            self._added = len(self._rows)
        return self._rows

    def _open_journal(self) -> None:
        """Replay the journal onto the npz's rows; set aside or drop what cannot apply."""
        assert self._rows is not None
        try:
            journal = feedback_journal.read(self.journal_path)
        except feedback_journal.JournalError as exc:
            log.error(
                "%s; set aside as %s", exc, feedback_journal.set_aside(self.journal_path).name
            )
            return
        if journal is None:
            return
        if journal.generation < self._generation:  # (folded into the npz by a compaction
            if journal.damage is not None:  # cut short: a new one replaces it; a damaged
                with contextlib.suppress(OSError):  # one is kept to look into)
                    feedback_journal.set_aside(self.journal_path)
            return
        if journal.generation > self._generation:  # (its npz deleted, or set aside)
            aside = feedback_journal.set_aside(self.journal_path).name
            log.error("%s is of generation %d, %s of %d: set aside as %s", self.journal_path.name,
                      journal.generation, self.path.name, self._generation, aside)  # fmt: skip
            return
        applied = self._rows.replay(journal)
        if journal.damage is not None:
            # Its readable records go into the npz of the next generation first (a crash
            # before that leaves the journal as it was, to be read again), and only then
            # is it set aside; until that is done no label is taken (`_write`).
            log.error("%s: %s; the %d records before it are kept, the journal set aside",
                      self.journal_path.name, journal.damage, applied)  # fmt: skip
            self._damaged_journal = True
            try:
                self._compact()
            except OSError as exc:
                log.error("cannot fold %s into %s or set it aside: %s (labels are refused"
                          " until it can be)", self.journal_path.name, self.path.name,
                          exc)  # fmt: skip
            return
        if journal.torn:
            log.warning("%s: a record cut short at byte %d (never acknowledged) dropped",
                        self.journal_path.name, journal.end)  # fmt: skip
            os.truncate(self.journal_path, journal.end)
        self._end, self._records = journal.end, len(journal.records)

    def append(self, x: npt.NDArray[Any], label: int) -> int:
        """Add one row; return the number of rows now kept (0: `max_rows` is 0, none kept).
        FeedbackError if the row holds NaN or Inf (training could never read it again)."""
        return self.put(None, x, label)[0]

    def put(self, key: Hashable | None, x: npt.NDArray[Any], label: int) -> tuple[int, bool]:
        """`append`, except that a `key` put before whose row is still kept has that row's
        label replaced; (rows now kept, whether a label was replaced)."""
        row = np.array(x, dtype=np.float32)  # (a copy: not a view holding its whole batch)
        if not np.isfinite(row).all():
            raise FeedbackError("that prediction's input holds NaN or Inf: not kept", "invalid")
        if self.max_rows <= 0:
            return 0, False
        label = int(np.int64(label))  # (OverflowError beyond int64, as before)
        if label < 0:  # (training could never read it again: the whole file set aside)
            raise FeedbackError(f"label {label} is negative: not kept", "invalid")
        with self._lock:
            self._load()
            at = self._kept_at(key)
            if at is not None:
                return self._write(feedback_journal.Relabel(at, label)), True
            kept = self._write(feedback_journal.Add(row, label, self.max_rows))
            self._added += 1
            if key is not None:
                self._keys[key] = self._added - 1
            self._forget_dropped()
            return kept, False

    def _kept_at(self, key: Hashable | None) -> int | None:
        """The index in the kept rows of `key`'s row; None if never put or dropped since."""
        number = self._keys.get(key) if key is not None else None
        if number is None or self._rows is None:
            return None
        at = number - (self._added - len(self._rows))
        return at if 0 <= at < len(self._rows) else None

    def _forget_dropped(self) -> None:
        """Forget the keys of rows no longer kept (the oldest first)."""
        first = self._added - (0 if self._rows is None else len(self._rows))
        keys = self._keys
        while keys and next(iter(keys.values())) < first:
            keys.popitem(last=False)

    def _write(self, record: feedback_journal.Add | feedback_journal.Relabel) -> int:
        """Append `record` to the journal (fsynced), then apply it, compacting when due; the
        rows now kept."""
        assert self._rows is not None
        if isinstance(record, feedback_journal.Relabel):
            encoded = feedback_journal.encode_relabel(record.index, record.label)
        else:
            encoded = feedback_journal.encode_add(record.row, record.label, record.max_rows)
        if self._end is None:
            if self._damaged_journal or (
                self._generation == 0 and self.path.is_file() and len(self._rows)
            ):  # (a damaged journal's rows folded first; an npz from before journals
                self._compact()  # given a generation; OSError: this label is not taken)
            if self._end is None:
                self._end = feedback_journal.create(self.journal_path, self._generation)
        self._end = feedback_journal.append(self.journal_path, encoded, self._end)
        self._records += 1
        self._rows.apply(record)
        row_bytes = len(self._rows) * self._rows.x[-1].nbytes
        if self._records >= max(COMPACT_RECORDS, len(self._rows)) or self._end >= max(
            COMPACT_BYTES, row_bytes
        ):
            try:
                self._compact()
            except OSError as exc:  # (the label is in the journal: the next one tries again)
                log.error("cannot fold %s into %s: %s", self.journal_path.name, self.path.name, exc)
        return len(self._rows)

    def _compact(self) -> None:
        """Write the rows as the npz of the next generation, then start an empty journal."""
        assert self._rows is not None
        arrays = None if self._fold_written else self._rows.arrays()
        if arrays is not None:
            xs, ys = arrays
            generation = self._generation + 1
            write_atomically(
                self.path, lambda f: np.savez(f, x=xs, y=ys, generation=np.int64(generation))
            )
            self._generation = generation
            self._rows = feedback_journal.Rows(xs, ys)
        if self._damaged_journal:  # (its rows are in the npz now, or it had none)
            self._fold_written = True  # (if setting it aside fails: only that is tried again)
            aside = feedback_journal.set_aside(self.journal_path)
            log.error("%s set aside as %s", self.journal_path.name, aside.name)
            self._damaged_journal = self._fold_written = False
        self._end, self._records = None, 0  # (if creating it fails, the next label tries)
        self._end = feedback_journal.create(self.journal_path, self._generation)
