"""RecentInputs: the ring of recent prediction inputs that feedback labels refer to."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.feedback import FeedbackError, RecentInputs


def _rows(n: int, value: float) -> np.ndarray:
    return np.full((n, 3), value, dtype=np.float32)


def test_an_id_gives_back_its_row_model_and_version() -> None:
    recent = RecentInputs(8)
    single = recent.keep(_rows(1, 1.0), "m", "v1")
    batch = recent.keep(np.arange(12, dtype=np.float32).reshape(4, 3), "m", "v2")
    row, model, version = recent.get(single)
    assert row.tolist() == [1.0, 1.0, 1.0]
    assert (model, version) == ("m", "v1")
    row, _, version = recent.get(f"{batch}.2")
    assert row.tolist() == [6.0, 7.0, 8.0]
    assert version == "v2"
    with pytest.raises(FeedbackError, match=r"names a batch of 4 rows") as refused:
        recent.get(batch)  # a batch's own id names no one row
    assert refused.value.reason == "invalid"
    assert recent.get(f"{single}.0")[0].tolist() == [1.0, 1.0, 1.0]  # (a sample's one row)


def test_ids_are_unique_and_carry_a_per_process_prefix() -> None:
    a, b = RecentInputs(4), RecentInputs(4)
    ids = [a.keep(_rows(1, i), "m", "v") for i in range(10)]
    assert len(set(ids)) == 10
    assert all(i.startswith(a.prefix) for i in ids)
    assert a.prefix != b.prefix
    with pytest.raises(FeedbackError):  # another runtime's id never resolves here
        b.get(ids[-1])


def test_the_oldest_request_is_forgotten_when_the_ring_is_full() -> None:
    recent = RecentInputs(3)
    ids = [recent.keep(_rows(2, i), "m", "v") for i in range(5)]
    for old in ids[:2]:
        with pytest.raises(FeedbackError) as caught:
            recent.get(old)
        assert caught.value.reason == "unknown_id"
        assert "last 3 requests" in str(caught.value)
    assert [recent.get(f"{i}.1")[0][0] for i in ids[2:]] == [2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "suffix",
    ["", "x", "1.", "1.2", "1.-1", "1.1.1", "-1", "\u0661", "1." + "9" * 40, "9" * 5000, " 1"],
)
def test_malformed_or_out_of_range_ids_are_unknown(suffix: str) -> None:
    recent = RecentInputs(4)
    recent.keep(_rows(2, 0.0), "m", "v")  # id <prefix>1 with rows 0 and 1
    with pytest.raises(FeedbackError) as caught:
        recent.get(recent.prefix + suffix)
    assert caught.value.reason == "unknown_id"


def test_a_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RecentInputs(0)


def test_concurrent_requests_each_keep_their_own_input() -> None:
    recent = RecentInputs(4 * 500)
    kept: dict[str, float] = {}
    lock = threading.Lock()

    def worker(base: int) -> None:
        for i in range(500):
            value = float(base * 1000 + i)
            pid = recent.keep(_rows(1, value), "m", "v")
            with lock:
                kept[pid] = value

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kept) == 2000
    assert all(recent.get(pid)[0][0] == value for pid, value in kept.items())


def test_large_inputs_are_kept_within_the_byte_budget() -> None:
    # the small ring takes inputs up to 100 bytes (40 slots), the medium one up to 400 (10)
    recent = RecentInputs(capacity=40, max_bytes=4000)
    small = [recent.keep(_rows(1, -i), "m", "v") for i in range(3)]  # 12 bytes each: small
    large = [recent.keep(_rows(40, i), "m", "v") for i in range(12)]  # 480 bytes: 8 fit
    for old in large[:4]:
        with pytest.raises(FeedbackError):
            recent.get(old)
    assert [recent.get(f"{i}.39")[0][0] for i in large[4:]] == [float(i) for i in range(4, 12)]
    assert [recent.get(i)[0][0] for i in small] == [0.0, -1.0, -2.0]
    huge = recent.keep(_rows(334, 9.0), "m", "v")  # 4008 bytes: more than the whole budget
    with pytest.raises(FeedbackError):
        recent.get(huge)
    assert recent.get(f"{large[4]}.0")[0][0] == 4.0  # and it pushed nothing out


def test_medium_inputs_take_a_ring_of_a_quarter_of_the_slots() -> None:
    recent = RecentInputs(capacity=12, max_bytes=1200)  # small ≤ 100 bytes; medium ≤ 400 (3)
    small = recent.keep(_rows(1, -1.0), "m", "v")
    medium = [recent.keep(_rows(10, i), "m", f"v{i}") for i in range(5)]  # 120 bytes each
    large = recent.keep(_rows(40, 9.0), "m", "v")  # 480 bytes: the queue
    for old in medium[:2]:
        with pytest.raises(FeedbackError, match="3 of larger batches"):
            recent.get(old)
    for i, pid in enumerate(medium[2:], start=2):
        row, _, version = recent.get(f"{pid}.9")
        assert (row[0], version) == (float(i), f"v{i}")
    assert recent.get(small)[0][0] == -1.0
    assert recent.get(f"{large}.39")[0][0] == 9.0
