"""Device selection: eligibility, rotation away from last round's devices, fairness."""

from __future__ import annotations

from collections import Counter

import pytest

from cloud_coordinator.selection import Candidate, select_devices


def fleet(n: int) -> list[Candidate]:
    return [Candidate(f"dev-{i:02d}", online=True) for i in range(n)]


def test_only_online_and_idle_devices_are_picked() -> None:
    candidates = [
        Candidate("on-idle-1", online=True),
        Candidate("offline", online=False),
        Candidate("on-busy", online=True, busy=True),
        Candidate("offline-busy", online=False, busy=True),
        Candidate("on-idle-2", online=True),
    ]
    for seed in range(20):
        assert select_devices(candidates, 5, (), seed) == ["on-idle-1", "on-idle-2"]


def test_never_more_than_count_and_sorted_by_id() -> None:
    for count in range(0, 12):
        chosen = select_devices(fleet(8), count, (), seed=count)
        assert len(chosen) == min(count, 8)
        assert chosen == sorted(chosen)
        assert len(set(chosen)) == len(chosen)
    assert select_devices(fleet(8), -3, (), seed=0) == []
    assert select_devices([], 3, (), seed=0) == []


def test_devices_not_picked_last_round_are_preferred() -> None:
    last = {"dev-00", "dev-01", "dev-02"}
    for seed in range(50):
        chosen = select_devices(fleet(6), 3, last, seed)
        assert set(chosen) == {"dev-03", "dev-04", "dev-05"}


def test_repeats_only_fill_the_places_others_cannot() -> None:
    last = {"dev-00", "dev-01", "dev-02", "dev-03"}
    seen_repeats: set[str] = set()
    for seed in range(50):
        chosen = set(select_devices(fleet(6), 4, last, seed))
        assert {"dev-04", "dev-05"} <= chosen  # every fresh device is in
        repeats = chosen & last
        assert len(repeats) == 2
        seen_repeats |= repeats
    assert seen_repeats == last  # the filling repeats vary with the seed


def test_a_busy_fresh_device_is_not_picked_over_a_repeat() -> None:
    candidates = [
        Candidate("a", online=True),
        Candidate("b", online=True, busy=True),
        Candidate("c", online=False),
    ]
    assert select_devices(candidates, 2, {"a"}, seed=1) == ["a"]


def test_same_seed_same_choice_and_seeds_differ() -> None:
    devices = fleet(20)
    first = select_devices(devices, 5, {"dev-03"}, seed=42)
    assert all(select_devices(devices, 5, {"dev-03"}, seed=42) == first for _ in range(5))
    choices = {tuple(select_devices(devices, 5, (), seed=s)) for s in range(30)}
    assert len(choices) > 20  # the seed really drives the shuffle


@pytest.mark.parametrize(("n", "count"), [(10, 3), (10, 7), (7, 2), (5, 4)])
def test_fair_over_many_rounds(n: int, count: int) -> None:
    """Run selection the way the job runner does (seed per round, last round remembered)."""
    rounds = 3000
    devices = fleet(n)
    picks: Counter[str] = Counter()
    last: list[str] = []
    for round_no in range(1, rounds + 1):
        last = select_devices(devices, count, last, seed=7 * 100_003 + round_no)
        assert len(last) == count
        picks.update(last)
    expected = rounds * count / n
    assert set(picks) == {c.device_id for c in devices}
    for device, times in picks.items():
        assert abs(times - expected) < 0.1 * expected, (device, times, expected)


def test_rotation_when_exactly_half_the_fleet_is_picked() -> None:
    """With count = n/2 and fresh devices preferred, consecutive rounds never overlap."""
    last: list[str] = []
    for round_no in range(20):
        chosen = select_devices(fleet(6), 3, last, seed=round_no)
        assert not set(chosen) & set(last)
        last = chosen
