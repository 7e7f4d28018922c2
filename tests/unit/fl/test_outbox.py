"""The agent's durable outbox on a real SQLite file: resend, acks, caps, restarts."""

from __future__ import annotations

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
