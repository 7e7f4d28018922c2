"""The agent's durable outbox on a real SQLite file: resend, acks, caps, restarts."""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.outbox import Outbox, Pending


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "agent" / "outbox.db"


@pytest.fixture
def box(path: Path) -> Iterator[Outbox]:
    outbox = Outbox(path, max_bytes=1000, max_age_s=3600)
    yield outbox
    outbox.close()


def keys(pending: list[Pending]) -> list[str]:
    return [p.key for p in pending]


def test_put_then_due_returns_it_once_until_the_resend_time(box: Outbox) -> None:
    assert box.put("k1", "fedge/v1/dev/a/update", b"payload-1") is True
    now = time.time()
    first = box.due(resend_after_s=10, now=now)
    assert first == [Pending("k1", "fedge/v1/dev/a/update", b"payload-1", 1)]
    assert box.due(resend_after_s=10, now=now + 5) == []  # sent 5 s ago: not yet
    again = box.due(resend_after_s=10, now=now + 10)
    assert keys(again) == ["k1"]
    assert again[0].attempts == 2
    assert box.depth() == 1


def test_due_lists_oldest_first(box: Outbox) -> None:
    for key in ("c", "a", "b"):
        box.put(key, "t", key.encode())
    assert keys(box.due(0)) == ["c", "a", "b"]


def test_ack_forgets_the_message(box: Outbox) -> None:
    box.put("k1", "t", b"1")
    box.put("k2", "t", b"2")
    assert box.ack("k1") is True
    assert box.ack("k1") is False
    assert box.ack("never") is False
    assert keys(box.due(0)) == ["k2"]
    assert box.depth() == 1


def test_mark_sent_delays_the_resend(box: Outbox) -> None:
    box.put("k1", "t", b"1")
    box.put("k2", "t", b"2")
    box.mark_sent("k1")  # published right after put, as the learner does
    now = time.time()
    assert keys(box.due(resend_after_s=60, now=now)) == ["k2"]
    later = box.due(resend_after_s=60, now=now + 61)
    assert [(p.key, p.attempts) for p in later] == [("k1", 2), ("k2", 2)]


def test_reset_sent_makes_everything_due_at_once(box: Outbox) -> None:
    box.put("k1", "t", b"1")
    now = time.time()
    box.due(resend_after_s=60, now=now)
    assert box.due(resend_after_s=60, now=now + 1) == []
    box.reset_sent()  # a reconnect
    assert keys(box.due(resend_after_s=60, now=now + 1)) == ["k1"]


def test_put_is_idempotent_per_key(box: Outbox) -> None:
    assert box.put("k1", "t", b"first")
    box.due(0)
    assert box.put("k1", "t2", b"second")
    assert box.depth() == 1
    pending = box.due(0)
    assert pending == [Pending("k1", "t", b"first", 2)]  # first kept, attempts not reset
    assert box.dropped == 0


def test_byte_cap_drops_oldest_first_and_counts(box: Outbox) -> None:
    for n in range(4):
        assert box.put(f"k{n}", "t", bytes([n]) * 300)  # 1200 > 1000 after the 4th
    assert box.dropped == 1
    assert keys(box.due(0)) == ["k1", "k2", "k3"]
    assert box.put("big", "t", b"x" * 700)  # needs two more out
    assert box.dropped == 3
    assert keys(box.due(0)) == ["k3", "big"]


def test_a_message_filling_the_whole_outbox_evicts_everything(box: Outbox) -> None:
    box.put("a", "t", b"a" * 10)
    box.put("b", "t", b"b" * 10)
    assert box.put("full", "t", b"f" * 1000)
    assert keys(box.due(0)) == ["full"]
    assert box.dropped == 2


def test_a_message_larger_than_the_outbox_is_refused_and_counted(box: Outbox) -> None:
    box.put("keep", "t", b"k" * 500)
    assert box.put("huge", "t", b"h" * 1001) is False
    assert box.dropped == 1
    assert keys(box.due(0)) == ["keep"]  # nothing evicted for it


def test_age_cap_drops_expired_messages_and_counts(path: Path) -> None:
    box = Outbox(path, max_bytes=1000, max_age_s=100)
    try:
        box.put("a", "t", b"1")
        box.put("b", "t", b"2")
        now = time.time()
        assert keys(box.due(0, now=now + 50)) == ["a", "b"]
        assert box.dropped == 0
        assert box.due(0, now=now + 101) == []
        assert box.dropped == 2
        assert box.depth() == 0
    finally:
        box.close()


def test_survives_a_restart(path: Path) -> None:
    first = Outbox(path, max_bytes=1000)
    first.put("k1", "fedge/v1/dev/a/update", b"\x00update-1")
    first.put("k2", "fedge/v1/dev/a/update", b"\x00update-2")
    now = time.time()
    first.due(resend_after_s=30, now=now)
    first.ack("k2")
    first.close()  # the agent stops (or dies) with k1 unacknowledged

    second = Outbox(path, max_bytes=1000)
    try:
        assert second.depth() == 1
        assert second.due(resend_after_s=30, now=now + 1) == []  # last_sent survived
        second.reset_sent()  # what the learner does on (re)connect
        assert second.due(resend_after_s=30, now=now + 1) == [
            Pending("k1", "fedge/v1/dev/a/update", b"\x00update-1", 2)
        ]
        assert second.put("k1", "t", b"again")  # still idempotent after the restart
        assert second.depth() == 1
    finally:
        second.close()


def test_re_putting_a_stored_key_near_the_cap_loses_nothing(box: Outbox) -> None:
    """put() used to make room before INSERT OR IGNORE, evicting k1 for nothing."""
    box.put("k1", "t", b"1" * 400)
    box.put("k2", "t", b"2" * 400)
    assert box.put("k2", "t", b"2" * 400)  # a retry of the same update: a no-op
    assert keys(box.due(0)) == ["k1", "k2"]
    assert box.dropped == 0


def test_resends_back_off_to_the_cap(path: Path) -> None:
    box = Outbox(path, max_bytes=1000, max_resend_s=50)
    try:
        box.put("k", "t", b"1")
        now = time.time()
        sends = []
        for second in range(0, 400):  # a coordinator away for minutes: asked every second
            if box.due(10, now=now + second):
                sends.append(second)
        # after 10 s, then 20, 40, then every 50 at most (jitter: up to a tenth sooner)
        gaps = [b - a for a, b in itertools.pairwise(sends)]
        assert sends[0] == 0
        assert 9 <= gaps[0] <= 10
        assert 18 <= gaps[1] <= 20
        assert 36 <= gaps[2] <= 40
        assert all(45 <= gap <= 50 for gap in gaps[3:]), gaps
        assert len(sends) <= 12  # not 40 (one every 10 s)
    finally:
        box.close()


def test_due_leaves_out_skipped_keys_unmarked(box: Outbox) -> None:
    box.put("a", "t", b"1")
    box.put("b", "t", b"2")
    now = time.time()
    assert keys(box.due(10, now=now, skip={"a"})) == ["b"]
    assert keys(box.due(10, now=now)) == ["a"]  # still never sent: due at once


def test_drops_are_logged_and_their_count_survives_a_restart(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(path, max_bytes=1000)
    with caplog.at_level("WARNING", logger="agent.outbox"):
        for n in range(4):
            box.put(f"k{n}", "t", bytes(300))
        box.put("huge", "t", bytes(2000))
    box.close()
    assert "dropped 1 unacknowledged message(s) (the oldest, to make room): k0" in caplog.text
    assert "huge" in caplog.text
    again = Outbox(path, max_bytes=1000)
    try:
        assert again.dropped == 2
    finally:
        again.close()


@pytest.mark.parametrize("damage", ["header", "garbage"])
def test_a_damaged_database_is_set_aside_and_a_new_one_started(
    path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = Outbox(path)
    first.put("k1", "t", b"x" * 5000)
    first.close()
    raw = bytearray(path.read_bytes())
    if damage == "header":
        raw[:16] = bytes(16)
    else:
        raw[:] = b"not a database at all" * 100
    path.write_bytes(bytes(raw))
    with caplog.at_level("ERROR", logger="agent.outbox"):
        box = Outbox(path)
    try:
        assert box.set_aside is not None
        assert box.set_aside.read_bytes() == bytes(raw)  # kept for a person to look at
        assert box.set_aside.name.startswith("outbox.db.corrupt-")
        assert "is damaged" in caplog.text
        assert box.depth() == 0
        assert box.put("k2", "t", b"y")
        assert keys(box.due(0)) == ["k2"]
    finally:
        box.close()
    reopened = Outbox(path)
    try:
        assert reopened.set_aside is None
        assert reopened.depth() == 1
    finally:
        reopened.close()


def test_a_busy_database_is_not_mistaken_for_a_damaged_one(path: Path) -> None:
    # Locked by another process (a second agent on the same data directory, say): the
    # updates it holds must not be set aside as if the file were damaged.
    first = Outbox(path)
    first.put("k1", "t", b"x")
    first.close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('held', 1)")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            Outbox(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not list(path.parent.glob("outbox.db.corrupt-*"))
    again = Outbox(path)
    try:
        assert again.depth() == 1
    finally:
        again.close()


def test_hurry_forgets_the_back_off(path: Path) -> None:
    box = Outbox(path, max_bytes=1000, max_resend_s=600)
    try:
        box.put("k", "t", b"1")
        now = time.time()
        for second in range(0, 2000, 5):  # backed off to its 10-minute cap
            box.due(10, now=now + second)
        assert box.due(10, now=now + 2005) == []
        box.hurry(10, now=now + 2005)  # an ack or a task: the coordinator is back
        assert keys(box.due(10, now=now + 2005)) == ["k"]
        box.hurry(10, now=now + 2006)  # another, a second later: that copy is left alone
        assert box.due(10, now=now + 2010) == []
        assert keys(box.due(10, now=now + 2016)) == ["k"]  # 10 s, as for a new message
    finally:
        box.close()
