"""The round state table and the close/fail/wait verdict, driven without I/O."""

from __future__ import annotations

import itertools

import pytest

from cloud_coordinator.errors import CoordinatorError
from cloud_coordinator.rounds import (
    TRANSITIONS,
    IllegalRoundTransitionError,
    Progress,
    RoundEvent,
    RoundState,
    Verdict,
    next_round_state,
    should_close,
)

S, E = RoundState, RoundEvent

# Written out independently of the module's table, from the diagram in its docstring.
ALLOWED: dict[tuple[RoundState, RoundEvent], RoundState] = {
    (S.SELECTING, E.TASKS_SENT): S.COLLECTING,
    (S.SELECTING, E.FAIL): S.FAILED,
    (S.COLLECTING, E.CLOSE): S.AGGREGATING,
    (S.COLLECTING, E.FAIL): S.FAILED,
    (S.AGGREGATING, E.PUBLISHED): S.DONE,
    (S.AGGREGATING, E.FAIL): S.FAILED,
}
DISALLOWED = [pair for pair in itertools.product(S, E) if pair not in ALLOWED]


def test_the_table_is_exactly_the_documented_one() -> None:
    assert TRANSITIONS == ALLOWED
    assert len(DISALLOWED) == len(S) * len(E) - 6


@pytest.mark.parametrize(("state", "event"), list(ALLOWED), ids=lambda v: str(v))
def test_every_allowed_transition(state: RoundState, event: RoundEvent) -> None:
    assert next_round_state(state, event) is ALLOWED[(state, event)]


@pytest.mark.parametrize(("state", "event"), DISALLOWED, ids=lambda v: str(v))
def test_every_other_pair_is_illegal(state: RoundState, event: RoundEvent) -> None:
    with pytest.raises(IllegalRoundTransitionError) as info:
        next_round_state(state, event)
    assert isinstance(info.value, CoordinatorError)
    assert repr(state.value) in str(info.value)
    assert repr(event.value) in str(info.value)


@pytest.mark.parametrize("terminal", [S.DONE, S.FAILED])
def test_terminal_states_accept_nothing(terminal: RoundState) -> None:
    for event in E:
        with pytest.raises(IllegalRoundTransitionError):
            next_round_state(terminal, event)


def test_happy_path_and_failure_from_every_live_state() -> None:
    state = S.SELECTING
    for event in (E.TASKS_SENT, E.CLOSE, E.PUBLISHED):
        state = next_round_state(state, event)
    assert state is S.DONE
    for live in (S.SELECTING, S.COLLECTING, S.AGGREGATING):
        assert next_round_state(live, E.FAIL) is S.FAILED


# (selected, received, quorum, deadline_passed) -> verdict
TRUTH_TABLE = [
    # everyone answered: close at once, deadline or not
    ((3, 3, 3, False), Verdict.CLOSE),
    ((3, 3, 2, False), Verdict.CLOSE),
    ((3, 3, 3, True), Verdict.CLOSE),
    # quorum in but someone still out: wait for them until the deadline, then close
    ((3, 2, 2, False), Verdict.WAIT),
    ((3, 2, 2, True), Verdict.CLOSE),
    ((5, 4, 2, True), Verdict.CLOSE),
    # short of the quorum: wait, then fail at the deadline
    ((3, 1, 2, False), Verdict.WAIT),
    ((3, 1, 2, True), Verdict.FAIL),
    ((3, 0, 1, True), Verdict.FAIL),
    ((3, 0, 3, False), Verdict.WAIT),
    # more received than the quorum asks (quorum below selected)
    ((4, 3, 1, False), Verdict.WAIT),
    ((4, 3, 1, True), Verdict.CLOSE),
]


@pytest.mark.parametrize(("fields", "verdict"), TRUTH_TABLE, ids=str)
def test_should_close_truth_table(fields: tuple[int, int, int, bool], verdict: Verdict) -> None:
    assert should_close(Progress(*fields)) is verdict
