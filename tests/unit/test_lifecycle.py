"""agent.lifecycle: the connection state table, driven without I/O."""

from __future__ import annotations

import itertools

import pytest

from agent.errors import AgentError, IllegalTransitionError
from agent.lifecycle import TRANSITIONS, Event, Lifecycle, State, next_state

EXPECTED = {
    (State.STARTING, Event.CONNECT): State.CONNECTING,
    (State.STARTING, Event.STOP): State.STOPPING,
    (State.CONNECTING, Event.UP): State.ONLINE,
    (State.CONNECTING, Event.DOWN): State.CONNECTING,
    (State.CONNECTING, Event.STOP): State.STOPPING,
    (State.ONLINE, Event.DOWN): State.RECONNECTING,
    (State.ONLINE, Event.STOP): State.STOPPING,
    (State.RECONNECTING, Event.UP): State.ONLINE,
    (State.RECONNECTING, Event.DOWN): State.RECONNECTING,
    (State.RECONNECTING, Event.STOP): State.STOPPING,
    (State.STOPPING, Event.UP): State.STOPPING,  # a reconnect done while stopping
    (State.STOPPING, Event.DOWN): State.STOPPING,
    (State.STOPPING, Event.STOP): State.STOPPING,
    (State.STOPPING, Event.DONE): State.STOPPED,
}
ILLEGAL = [pair for pair in itertools.product(State, Event) if pair not in EXPECTED]


def test_the_table_is_the_documented_one() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize(("pair", "after"), list(EXPECTED.items()), ids=str)
def test_allowed_transition(pair: tuple[State, Event], after: State) -> None:
    state, event = pair
    assert next_state(state, event) is after


@pytest.mark.parametrize("pair", ILLEGAL, ids=str)
def test_every_other_pair_raises(pair: tuple[State, Event]) -> None:
    state, event = pair
    with pytest.raises(IllegalTransitionError) as err:
        next_state(state, event)
    assert str(err.value) == f"event {event.value!r} is not allowed in state {state.value!r}"
    assert isinstance(err.value, AgentError)


def test_stopped_is_terminal() -> None:
    assert all((State.STOPPED, event) in ILLEGAL for event in Event)


@pytest.mark.parametrize("state", [s for s in State if s is not State.STOPPED])
def test_stop_then_done_ends_in_stopped_from_every_live_state(state: State) -> None:
    assert next_state(next_state(state, Event.STOP), Event.DONE) is State.STOPPED


def test_every_state_is_reachable_from_starting() -> None:
    seen = {State.STARTING}
    frontier = [State.STARTING]
    while frontier:
        state = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == set(State)


def test_lifecycle_follows_a_session_with_a_reconnect() -> None:
    life = Lifecycle()
    assert life.state is State.STARTING
    path = [Event.CONNECT, Event.DOWN, Event.UP, Event.DOWN, Event.DOWN, Event.UP, Event.STOP]
    states = [life.apply(event) for event in path]
    assert states == [
        State.CONNECTING,
        State.CONNECTING,
        State.ONLINE,
        State.RECONNECTING,
        State.RECONNECTING,
        State.ONLINE,
        State.STOPPING,
    ]
    assert life.apply(Event.DONE) is State.STOPPED


def test_an_illegal_event_leaves_the_state_unchanged() -> None:
    life = Lifecycle()
    life.apply(Event.CONNECT)
    with pytest.raises(IllegalTransitionError):
        life.apply(Event.DONE)
    assert life.state is State.CONNECTING
