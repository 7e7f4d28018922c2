"""The feedback journal on real files: labels and relabels survive reopening and a real
``kill -9``; a torn last record loses only itself; compaction, and a crash at each of its
steps, neither loses nor duplicates a row; a label no longer rewrites ``feedback.npz``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import feedback, feedback_journal
from agent.feedback import FeedbackError, FeedbackLog
from agent.local_data import load_feedback, load_local_data, read_feedback

ROOT = Path(__file__).resolve().parents[2]


class Model:
    """What the feedback file held when every label rewrote it whole (the oracle)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.x: list[list[float]] = []
        self.y: list[int] = []
        self.keys: dict[Hashable, int] = {}
        self.added = 0

    def put(self, key: Hashable | None, row: list[float], label: int) -> tuple[int, bool]:
        number = self.keys.get(key) if key is not None else None
        at = None if number is None else number - (self.added - len(self.y))
        if at is not None and 0 <= at < len(self.y):
            self.y[at] = label
            return len(self.y), True
        if self.x and len(self.x[0]) != len(row):
            self.x, self.y = [], []
        self.x.append(row)
        self.y.append(label)
        del self.x[: -self.max_rows], self.y[: -self.max_rows]
        self.added += 1
        if key is not None:
            self.keys[key] = self.added - 1
        return len(self.y), False


def _label(i: int) -> tuple[Hashable | None, list[float], int]:
    """The i-th label of a fixed sequence: new rows, relabels of recent ones, anonymous
    rows, and from the 60th on rows of another shape (a new model's input)."""
    width = 3 if i < 60 else 5
    if i % 4 == 3:
        return (i - 2, 0), [float(i - 2)] * width, i % 7  # a relabel (or, if dropped, anew)
    return ((i, 0) if i % 5 else None), [float(i)] * width, i % 7


def _stored(path: Path) -> tuple[list[list[float]], list[int]]:
    x, y = read_feedback(path)
    return x.tolist(), y.tolist()


def test_labels_and_relabels_survive_reopening_and_reach_training(tmp_path: Path) -> None:
    log, model = FeedbackLog(tmp_path, max_rows=10), Model(10)
    for i in range(30):
        key, row, label = _label(i)
        assert log.put(key, np.asarray(row), label) == model.put(key, row, label)
    assert not log.path.exists()  # (all of it in the journal: under the bound)
    assert _stored(log.path) == (model.x, model.y)
    assert FeedbackLog(tmp_path, max_rows=10).rows() == len(model.y)
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 3), np.float32), y=np.array([0, 1]))
    np.savez(tmp_path / "val.npz", x=np.zeros((1, 3), np.float32), y=np.array([0]))
    data = load_local_data(tmp_path)
    assert data.y_train.tolist() == [0, 1, *model.y]
    reopened = FeedbackLog(tmp_path, max_rows=10)
    assert reopened.put((99, 0), np.ones(3), 2) == model.put((99, 0), [1.0] * 3, 2)
    assert reopened.put((99, 0), np.ones(3), 4) == (len(model.y), True)
    model.put((99, 0), [1.0] * 3, 4)
    assert _stored(log.path) == (model.x, model.y)


def test_every_label_matches_the_whole_file_rewrite_across_compactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feedback, "COMPACT_RECORDS", 8)
    log, model = FeedbackLog(tmp_path, max_rows=6), Model(6)
    generations = set()
    for i in range(100):
        key, row, label = _label(i)
        assert log.put(key, np.asarray(row), label) == model.put(key, row, label)
        assert _stored(log.path) == (model.x, model.y), f"after label {i}"
        journal = feedback_journal.read(log.journal_path)
        assert journal is not None
        assert len(journal.records) < 8
        generations.add(journal.generation)
    assert len(generations) > 10  # (compacted every 8 labels)
    with np.load(log.path) as npz:  # the npz a journal of its generation applies to
        assert int(npz["generation"]) == max(generations)


def test_a_torn_last_record_loses_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log, model = FeedbackLog(tmp_path, max_rows=50), Model(50)
    for i in range(9):
        key, row, label = _label(i)
        log.put(key, np.asarray(row), label)
        if i < 8:
            model.put(key, row, label)
    whole = log.journal_path.stat().st_size
    for cut in (whole - 3, whole - 20):  # in its payload, in its head
        os.truncate(log.journal_path, cut)
        assert _stored(log.path) == (model.x, model.y)  # (a reader drops it too)
        with caplog.at_level(logging.WARNING):
            assert FeedbackLog(tmp_path, max_rows=50).rows() == len(model.y)
        assert "cut short" in caplog.text
        assert _stored(log.path) == (model.x, model.y)
    with open(log.journal_path, "ab") as f:
        f.write(bytes(40))  # zeros where a record was to be (a power cut)
    reopened = FeedbackLog(tmp_path, max_rows=50)
    assert reopened.put(None, np.full(3, 7.0), 1) == model.put(None, [7.0] * 3, 1)
    assert _stored(log.path) == (model.x, model.y)
    assert not list(tmp_path.glob("*.damaged-*"))


def test_a_damaged_record_in_the_middle_sets_the_journal_aside_keeping_those_before(
    tmp_path: Path,
) -> None:
    model = _damaged_after_three(tmp_path)
    log = FeedbackLog(tmp_path, max_rows=50)  # (not read yet: nothing set aside)
    assert load_feedback(log.path) is not None
    assert _stored_lenient(log.path) == (model.x, model.y)  # readers: those before it
    with pytest.raises(Exception, match="checksum"):
        read_feedback(log.path)
    reopened = FeedbackLog(tmp_path, max_rows=50)  # the writer sets it aside
    assert reopened.rows() == 3
    assert len(list(tmp_path.glob("feedback.journal.damaged-*"))) == 1
    assert _stored(log.path) == (model.x, model.y)
    assert reopened.put(None, np.full(3, 9.0), 2) == model.put(None, [9.0] * 3, 2)
    assert _stored(log.path) == (model.x, model.y)


def _stored_lenient(path: Path) -> tuple[list[list[float]], list[int]]:
    rows = load_feedback(path)
    assert rows is not None
    return rows[0].tolist(), rows[1].tolist()


class Crash(BaseException):
    """The process dying at this point (nothing after it runs)."""


def _crash_after(real: Callable[..., Any]) -> Callable[..., Any]:
    def step(*args: Any) -> Any:
        real(*args)
        raise Crash

    return step


def _crash_before(real: Callable[..., Any]) -> Callable[..., Any]:
    def step(*args: Any) -> Any:
        raise Crash

    return step


@pytest.mark.parametrize(
    ("target", "crash"),
    [
        ("write_atomically", _crash_before),  # the npz not written yet
        ("write_atomically", _crash_after),  # the npz written, the journal not yet emptied
        ("create", _crash_after),  # the journal emptied
    ],
)
def test_a_crash_at_each_step_of_compaction_neither_loses_nor_duplicates_rows(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    crash: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> None:
    monkeypatch.setattr(feedback, "COMPACT_RECORDS", 8)
    log, model = FeedbackLog(tmp_path, max_rows=40), Model(40)  # (none dropped: a row
    for i in range(20):  # counted twice would show) compactions at 8 and 18 labels
        key, row, label = _label(i)
        log.put(key, np.asarray(row), label)
        model.put(key, row, label)
    assert log.path.exists()
    module = feedback if target == "write_atomically" else feedback_journal
    real = getattr(module, target)
    monkeypatch.setattr(module, target, crash(real))
    crashed = None
    for i in range(20, 60):  # up to the next compaction, which crashes
        key, row, label = _label(i)
        try:
            log.put(key, np.asarray(row), label)
        except Crash:
            crashed = i
        model.put(key, row, label)  # (appended and fsynced before compaction began)
        if crashed is not None:
            break
    assert crashed is not None
    monkeypatch.setattr(module, target, real)
    assert _stored(log.path) == (model.x, model.y)  # readers, before the writer reopens
    reopened = FeedbackLog(tmp_path, max_rows=40)
    assert reopened.rows() == len(model.y)
    model.keys.clear()  # (a new process: the earlier ids name nothing)
    for i in range(crashed + 1, crashed + 30):
        key, row, label = _label(i)
        assert reopened.put(key, np.asarray(row), label)[0] == model.put(key, row, label)[0]
        assert _stored(log.path) == (model.x, model.y), f"after label {i}"


def test_a_journal_without_its_npz_is_not_applied(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, max_rows=50)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(feedback, "COMPACT_RECORDS", 4)
        for i in range(6):
            log.put(None, np.full(3, float(i)), 1)
    log.path.unlink()  # (deleted by hand: its journal's relabels name rows no longer there)
    assert load_feedback(log.path) is None
    assert FeedbackLog(tmp_path, max_rows=50).rows() == 0
    assert len(list(tmp_path.glob("feedback.journal.damaged-*"))) == 1


def test_a_negative_label_is_refused_not_stored(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, max_rows=5)
    with pytest.raises(FeedbackError, match="negative") as refused:
        log.put(None, np.ones(3), -1)
    assert refused.value.reason == "invalid"
    assert log.rows() == 0


def test_a_label_appends_one_record_and_leaves_the_npz_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = np.random.default_rng(0).random((2000, 64), dtype=np.float32)
    np.savez(tmp_path / "feedback.npz", x=rows, y=np.zeros(2000, np.int64))  # (no generation)
    log = FeedbackLog(tmp_path, max_rows=10_000)
    log.put((0, 0), rows[0], 1)  # (first: the old file is given a generation, once)
    npz = os.stat(log.path)
    size = log.journal_path.stat().st_size
    for i in range(1, 101):
        key = (i % 10, 0) if i % 2 else None  # half of them relabels
        log.put(key, rows[i], i % 10)
        grown = log.journal_path.stat().st_size - size
        size += grown
        expect = feedback_journal.encode_add(rows[i], i % 10, 10_000)
        assert grown <= len(expect), f"label {i} wrote {grown} bytes"
    after = os.stat(log.path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        npz.st_ino,
        npz.st_mtime_ns,
        npz.st_size,
    )
    assert read_feedback(log.path)[1].shape == (2056,)  # (5 keys new, the rest relabels)


_CHILD = """
import sys
from pathlib import Path
import numpy as np
from agent import feedback
feedback.COMPACT_RECORDS = 16  # (compacting often: a kill may land inside one)
log = feedback.FeedbackLog(Path(sys.argv[1]), max_rows=100_000)
i = 0
while True:
    key = (i - 2, 0) if i % 4 == 3 else (i, 0)
    log.put(key, np.full(3, float(key[0])), i % 7)
    i += 1
    print(i, flush=True)
"""


def test_every_label_acknowledged_before_a_kill_9_is_there(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(tmp_path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
    )
    assert child.stdout is not None
    acknowledged = 0
    try:
        while acknowledged < 300:
            line = child.stdout.readline()
            assert line, "the child died"
            acknowledged = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    x, y = _stored(tmp_path / "feedback.npz")
    assert FeedbackLog(tmp_path, max_rows=100_000).rows() == len(y)
    # Exactly what the first n labels leave, for some n at or past the last acknowledged
    # (the child may have stored more before it died, never fewer).
    model, matches = Model(100_000), []
    for i in range(acknowledged + 100_000):
        if len(model.y) > len(y):
            break
        if i >= acknowledged and len(model.y) == len(y) and (model.x, model.y) == (x, y):
            matches.append(i)
        key = (i - 2, 0) if i % 4 == 3 else (i, 0)
        model.put(key, [float(key[0])] * 3, i % 7)
    assert matches, f"{len(y)} rows stored are not what {acknowledged} or more labels leave"


def _damaged_after_three(tmp_path: Path) -> Model:
    """Six labels, the fourth record damaged: the oracle of the three before it."""
    log, model = FeedbackLog(tmp_path, max_rows=50), Model(50)
    ends = []
    for i in range(6):
        key, row, label = _label(i)
        log.put(key, np.asarray(row), label)
        if i < 3:
            model.put(key, row, label)
        ends.append(log.journal_path.stat().st_size)
    data = bytearray(log.journal_path.read_bytes())
    data[ends[2] + 14] ^= 0xFF  # the fourth record's payload
    log.journal_path.write_bytes(bytes(data))
    return model


@pytest.mark.parametrize("crash", [_crash_before, _crash_after])
def test_a_crash_while_a_damaged_journal_is_folded_loses_none_of_its_readable_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: Callable[..., Any]
) -> None:
    # It was set aside first and folded after: a crash between the two lost the rows.
    model = _damaged_after_three(tmp_path)
    real = feedback.write_atomically
    monkeypatch.setattr(feedback, "write_atomically", crash(real))
    with pytest.raises(Crash):
        FeedbackLog(tmp_path, max_rows=50).rows()
    monkeypatch.setattr(feedback, "write_atomically", real)
    reopened = FeedbackLog(tmp_path, max_rows=50)
    assert reopened.rows() == 3
    assert _stored(reopened.path) == (model.x, model.y)
    assert reopened.put(None, np.full(3, 9.0), 2) == model.put(None, [9.0] * 3, 2)
    assert _stored(reopened.path) == (model.x, model.y)
    assert len(list(tmp_path.glob("feedback.journal.damaged-*"))) == 1


def test_no_label_is_taken_while_a_damaged_journal_cannot_be_folded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed fold left the npz without the journal's rows, and the next label started a
    # new journal of the same generation: labels and relabels lost, or put on other rows.
    model = _damaged_after_three(tmp_path)
    real = feedback.write_atomically

    def disk_full(*args: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feedback, "write_atomically", disk_full)
    log = FeedbackLog(tmp_path, max_rows=50)
    assert log.rows() == 3
    with pytest.raises(OSError, match="No space"):
        log.put(None, np.full(3, 7.0), 1)  # not acknowledged
    monkeypatch.setattr(feedback, "write_atomically", real)
    for i in (10, 11):
        assert log.put((i, 0), np.full(3, float(i)), 4) == model.put((i, 0), [float(i)] * 3, 4)
    assert log.put((10, 0), np.full(3, 10.0), 6) == model.put((10, 0), [10.0] * 3, 6)
    assert _stored(log.path) == (model.x, model.y)
    assert FeedbackLog(tmp_path, max_rows=50).rows() == len(model.y)


def test_a_second_journal_set_aside_in_the_same_second_keeps_the_first(tmp_path: Path) -> None:
    path = tmp_path / "feedback.journal"
    asides = []
    for text in (b"first", b"second"):
        path.write_bytes(text)
        asides.append(feedback_journal.set_aside(path))
    assert len(set(asides)) == 2
    assert sorted(p.read_bytes() for p in asides) == [b"first", b"second"]
    assert not path.exists()


def test_a_damaged_journal_that_cannot_be_set_aside_is_folded_once_and_set_aside_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each refused label wrote the npz again under a new generation; now only the
    # set-aside is tried again. (`set_aside` itself needs no hard links: vfat has none.)
    model = _damaged_after_three(tmp_path)
    real = feedback_journal.set_aside
    monkeypatch.setattr(os, "link", None)  # (none used: an SD card's vfat has no links)
    failing = [OSError(30, "Read-only file system")] * 2

    def flaky(path: Path) -> Path:
        if failing:
            raise failing.pop()
        return real(path)

    monkeypatch.setattr(feedback_journal, "set_aside", flaky)
    log = FeedbackLog(tmp_path, max_rows=50)
    assert log.rows() == 3
    generation = int(np.load(log.path)["generation"])
    with pytest.raises(OSError, match="Read-only"):
        log.put(None, np.full(3, 7.0), 1)  # not acknowledged
    assert int(np.load(log.path)["generation"]) == generation  # the fold is not redone
    assert log.put(None, np.full(3, 8.0), 1) == model.put(None, [8.0] * 3, 1)
    assert int(np.load(log.path)["generation"]) == generation
    assert _stored(log.path) == (model.x, model.y)
    assert len(list(tmp_path.glob("feedback.journal.damaged-*"))) == 1
