"""A training round's lifecycle as an explicit state table (pure; no I/O).

    selecting ──tasks_sent──▶ collecting ──close──▶ aggregating ──published──▶ done
        │                        │                       │
        └───────fail─────────────┴──────fail─────────────┴──▶ failed

`close` is allowed once the quorum is in and either every selected device answered or
the deadline passed (`should_close`); a round past its deadline without a quorum fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cloud_coordinator.errors import CoordinatorError


class IllegalRoundTransitionError(CoordinatorError):
    """An event arrived in a round state where it is not allowed."""


class RoundState(StrEnum):
    """Where a round stands."""

    SELECTING = "selecting"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    DONE = "done"
    FAILED = "failed"


class RoundEvent(StrEnum):
    """What can happen to a round."""

    TASKS_SENT = "tasks_sent"
    CLOSE = "close"
    PUBLISHED = "published"
    FAIL = "fail"


TRANSITIONS: dict[tuple[RoundState, RoundEvent], RoundState] = {
    (RoundState.SELECTING, RoundEvent.TASKS_SENT): RoundState.COLLECTING,
    (RoundState.SELECTING, RoundEvent.FAIL): RoundState.FAILED,
    (RoundState.COLLECTING, RoundEvent.CLOSE): RoundState.AGGREGATING,
    (RoundState.COLLECTING, RoundEvent.FAIL): RoundState.FAILED,
    (RoundState.AGGREGATING, RoundEvent.PUBLISHED): RoundState.DONE,
    (RoundState.AGGREGATING, RoundEvent.FAIL): RoundState.FAILED,
}


def next_round_state(state: RoundState, event: RoundEvent) -> RoundState:
    """The state after `event`; IllegalRoundTransitionError if the table does not allow it."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalRoundTransitionError(
            f"round event {event.value!r} is not allowed in state {state.value!r}"
        ) from None


class Verdict(StrEnum):
    """What to do with a collecting round now."""

    WAIT = "wait"
    CLOSE = "close"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a collecting round has got."""

    selected: int
    received: int
    quorum: int
    deadline_passed: bool


def should_close(progress: Progress) -> Verdict:
    """Close once the quorum is in and everyone answered or the deadline passed; fail if the
    deadline passed short of the quorum; else wait."""
    if progress.received >= progress.quorum and (
        progress.received >= progress.selected or progress.deadline_passed
    ):
        return Verdict.CLOSE
    if progress.deadline_passed:
        return Verdict.FAIL
    return Verdict.WAIT
