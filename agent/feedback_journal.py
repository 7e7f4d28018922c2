"""The append-only journal beside ``feedback.npz``: one small, self-checking record a label.

`agent.feedback.FeedbackLog` appends a record for each label (and each relabel) and fsyncs
it before the API answers, instead of rewriting the whole npz; now and then it folds the
journal into the npz (compaction). Readers (`agent.local_data.load_feedback`) replay the
journal on top of the npz, so they see exactly the rows a rewritten npz would hold.

File layout, little-endian. A 20-byte head: ``FEDGEFJ1``, the generation (u64), the CRC-32
of those 16 bytes. Then records, each a 12-byte head (the payload's length (u32), its
CRC-32 (u32), the CRC-32 of those 8 bytes (u32)) and the payload:

- add: ``A``, label (i64), max_rows (u64), ndim (u8), each dimension (u32), the row as
  float32: the row is appended and only the newest max_rows kept; a row of another shape
  than those kept starts afresh (a new model's input);
- relabel: ``R``, label (i64), the row's index among the rows kept then (u64).

Generations. ``feedback.npz`` holds a ``generation`` array (none, or no file: 0); a journal
applies only on top of the npz of its own generation. Compaction writes the npz of the
next generation (atomically), then a fresh journal of that generation: a crash between
the two leaves a journal older than the npz, whose rows the npz already holds, so it is
ignored, never counted twice. A journal newer than the npz (the npz deleted or set aside
as damaged) is ignored by readers and set aside by the writer.

Damage. A torn last record (a crash during its append: cut short, or zeros) is dropped;
it was never acknowledged. A record that fails its checks with more bytes after it is
damage in the middle: readers use the records before it; the writer folds those records
into the npz of the next generation, then sets the journal aside as
``feedback.journal.damaged-<time>`` (a crash between the two leaves it stale, to be set
aside at the next start), and takes no label until both are done.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.atomic_file import write_bytes_atomically
from agent.errors import AgentError

SUFFIX = ".journal"
_MAGIC = b"FEDGEFJ1"
_HEAD = struct.Struct("<8sQ")
_HEAD_SIZE = _HEAD.size + 4
_RECORD = struct.Struct("<II")
_RECORD_HEAD = _RECORD.size + 4
_ADD = struct.Struct("<cqQB")
_RELABEL = struct.Struct("<cqQ")


class JournalError(AgentError):
    """A feedback journal's head is unreadable: it cannot be applied at all."""


@dataclass(frozen=True, slots=True)
class Add:
    """A labelled row appended; only the newest `max_rows` are kept."""

    row: npt.NDArray[np.float32]
    label: int
    max_rows: int


@dataclass(frozen=True, slots=True)
class Relabel:
    """The kept row at `index` gets `label` instead."""

    index: int
    label: int


@dataclass(slots=True)
class Journal:
    """A journal as read: its records and the byte offset at which each ends."""

    generation: int
    records: list[Add | Relabel] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    torn: bool = False  # a last record cut short (dropped)
    damage: str | None = None  # what failed its checks before the end, if anything

    @property
    def end(self) -> int:
        """The offset just past the last good record."""
        return self.ends[-1] if self.ends else _HEAD_SIZE


def path_for(npz: Path) -> Path:
    """The journal beside a ``feedback.npz``: ``feedback.journal``."""
    return npz.with_suffix(SUFFIX)


def head(generation: int) -> bytes:
    """The head of an empty journal of `generation`."""
    packed = _HEAD.pack(_MAGIC, generation)
    return packed + struct.pack("<I", zlib.crc32(packed))


def create(path: Path, generation: int) -> int:
    """Replace `path` with an empty journal of `generation` (atomically); its size."""
    write_bytes_atomically(path, head(generation))
    return _HEAD_SIZE


def encode_add(row: npt.NDArray[Any], label: int, max_rows: int) -> bytes:
    """The record of `row` (float32, any shape) added with `label`."""
    dims = struct.pack(f"<{row.ndim}I", *row.shape)
    body = row.astype("<f4", copy=False).tobytes()
    return _frame(_ADD.pack(b"A", label, max_rows, row.ndim) + dims + body)


def encode_relabel(index: int, label: int) -> bytes:
    """The record of the kept row at `index` getting `label`."""
    return _frame(_RELABEL.pack(b"R", label, index))


def _frame(payload: bytes) -> bytes:
    packed = _RECORD.pack(len(payload), zlib.crc32(payload))
    return packed + struct.pack("<I", zlib.crc32(packed)) + payload


def append(path: Path, record: bytes, end: int) -> int:
    """Write `record` at offset `end` of the journal and fsync it; the new end. OSError
    leaves the file cut back to `end` where it can (an append cut short is not kept)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        new_end = end + len(record)
        try:
            view, at = memoryview(record), end
            while view:
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
            if os.fstat(fd).st_size > new_end:  # (left by an append that failed before)
                os.ftruncate(fd, new_end)
            os.fdatasync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # (else readers drop it: torn, or damage)
                os.ftruncate(fd, end)
            raise
        return new_end
    finally:
        os.close(fd)


def read(path: Path) -> Journal | None:
    """The journal at `path`, None if there is none; JournalError if its head is damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc}") from exc
    if len(data) < _HEAD_SIZE:
        raise JournalError(f"{path}: {len(data)} bytes, too short for a journal's head")
    magic, generation = _HEAD.unpack_from(data)
    if magic != _MAGIC or _crc_at(data, 0, _HEAD.size) != zlib.crc32(data[: _HEAD.size]):
        raise JournalError(f"{path}: not a feedback journal, or its head is damaged")
    journal = Journal(generation)
    at = _HEAD_SIZE
    while at < len(data):
        rest = memoryview(data)[at:]
        if len(rest) < _RECORD_HEAD or not any(rest):
            journal.torn = True  # (cut short in its head, or zeros where it was to be)
            break
        length, crc = _RECORD.unpack_from(data, at)
        end = at + _RECORD_HEAD + length
        if _crc_at(data, at, _RECORD.size) != zlib.crc32(rest[: _RECORD.size]):
            journal.damage = f"the head of the record at byte {at} is damaged"
            break
        if end > len(data):
            journal.torn = True
            break
        payload = rest[_RECORD_HEAD : _RECORD_HEAD + length]
        if zlib.crc32(payload) != crc:
            if end == len(data):
                journal.torn = True
            else:
                journal.damage = f"the record at byte {at} fails its checksum"
            break
        try:
            record = _decode(bytes(payload))
        except (ValueError, struct.error) as exc:
            journal.damage = f"the record at byte {at} is malformed: {exc}"
            break
        journal.records.append(record)
        journal.ends.append(end)
        at = end
    return journal


def _crc_at(data: bytes, at: int, size: int) -> int:
    return int(struct.unpack_from("<I", data, at + size)[0])


def _decode(payload: bytes) -> Add | Relabel:
    kind = payload[:1]
    if kind == b"R" and len(payload) == _RELABEL.size:
        _, label, index = _RELABEL.unpack(payload)
        if label < 0:
            raise ValueError(f"negative label {label}")
        return Relabel(index, label)
    if kind != b"A":
        raise ValueError(f"unknown kind {kind!r} of {len(payload)} bytes")
    _, label, max_rows, ndim = _ADD.unpack_from(payload)
    shape = struct.unpack_from(f"<{ndim}I", payload, _ADD.size)
    body = _ADD.size + 4 * ndim
    if len(payload) != body + 4 * int(np.prod(shape)):
        raise ValueError(f"{len(payload)} bytes do not hold a row of shape {shape}")
    row = np.frombuffer(payload, "<f4", offset=body).reshape(shape)
    if label < 0 or max_rows < 1 or not np.isfinite(row).all():
        raise ValueError("a negative label, max_rows under 1, or NaN or Inf in the row")
    return Add(row.astype(np.float32, copy=False), label, max_rows)


class Rows:
    """Labelled rows as the records leave them: what ``feedback.npz`` would hold."""

    def __init__(
        self, x: npt.NDArray[np.float32] | None = None, y: npt.NDArray[np.int64] | None = None
    ) -> None:
        self.x: list[npt.NDArray[np.float32]] = [] if x is None else list(x)
        self.y: list[int] = [] if y is None else [int(v) for v in y]

    def __len__(self) -> int:
        return len(self.y)

    def apply(self, record: Add | Relabel) -> None:
        """Apply one record; ValueError if a relabel names no kept row."""
        if isinstance(record, Relabel):
            if not 0 <= record.index < len(self.y):
                raise ValueError(f"relabel of row {record.index} of {len(self.y)}")
            self.y[record.index] = record.label
            return
        if self.x and self.x[0].shape != record.row.shape:
            self.x, self.y = [], []  # a new model with another input shape: afresh
        self.x.append(record.row)
        self.y.append(record.label)
        if len(self.y) > record.max_rows:
            del self.x[: len(self.x) - record.max_rows]
            del self.y[: len(self.y) - record.max_rows]

    def replay(self, journal: Journal) -> int:
        """Apply the journal's records in order; how many (fewer: the next names no row)."""
        for done, record in enumerate(journal.records):
            try:
                self.apply(record)
            except ValueError as exc:
                journal.damage = f"record {done + 1}: {exc}"
                return done
        return len(journal.records)

    def arrays(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None:
        """The rows as ``x`` and ``y`` arrays; None if there are none."""
        if not self.y:
            return None
        return np.stack(self.x), np.asarray(self.y, dtype=np.int64)


def set_aside(path: Path) -> Path:
    """Rename a damaged `path` to ``<name>.damaged-<time>`` (``-2``, ``-3``... after it if
    that is taken: never over an earlier one); the new path (OSError if not)."""
    stem = f"{path.name}.damaged-{int(time.time())}"
    for n in range(1, 1000):
        aside = path.with_name(stem if n == 1 else f"{stem}-{n}")
        try:  # the name reserved first (fails where it exists: nothing is overwritten), then
            os.close(os.open(aside, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:  # taken by a rename (no hard links: vfat on an SD card)
            continue
        try:
            path.replace(aside)
        except OSError:
            aside.unlink(missing_ok=True)
            raise
        return aside
    raise OSError(f"cannot set {path} aside: {stem} and 998 more names are taken")
