"""Which devices train in a round (pure).

Eligible: online and not busy (the coordinator has already left out devices that refuse
training, ``extra.train`` = 0 in their telemetry). Preferred: not picked in the previous
round; devices picked last round fill the remaining places only when too few others are
available. Ties are broken by a seeded shuffle, so selection is fair over rounds and
reproducible in tests.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """A device as selection sees it."""

    device_id: str
    online: bool
    busy: bool = False


def select_devices(
    candidates: Sequence[Candidate],
    count: int,
    picked_last_round: Collection[str],
    seed: int,
) -> list[str]:
    """Up to `count` eligible devices, preferring those not picked last round; sorted by id."""
    eligible = [c.device_id for c in candidates if c.online and not c.busy]
    rng = random.Random(seed)
    fresh = [d for d in eligible if d not in picked_last_round]
    repeat = [d for d in eligible if d in picked_last_round]
    rng.shuffle(fresh)
    rng.shuffle(repeat)
    return sorted((fresh + repeat)[: max(0, count)])
