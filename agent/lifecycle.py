"""The agent's connection lifecycle as an explicit state table (pure; no I/O).

starting ──connect──▶ connecting ──up──▶ online ──down──▶ reconnecting ──up──▶ online
    │                     │                 │                  │
    └───────stop──────────┴──────stop───────┴──────stop────────┴──▶ stopping ──done──▶ stopped
"""

from __future__ import annotations

from enum import StrEnum

from agent.errors import IllegalTransitionError


class State(StrEnum):
    """Where the agent's broker session stands."""

    STARTING = "starting"
    CONNECTING = "connecting"
    ONLINE = "online"
    RECONNECTING = "reconnecting"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Event(StrEnum):
    """What can happen to the session."""

    CONNECT = "connect"
    UP = "up"
    DOWN = "down"
    STOP = "stop"
    DONE = "done"


TRANSITIONS: dict[tuple[State, Event], State] = {
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


def next_state(state: State, event: Event) -> State:
    """The state after `event`; IllegalTransitionError if the table does not allow it."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransitionError(
            f"event {event.value!r} is not allowed in state {state.value!r}"
        ) from None


class Lifecycle:
    """Holds the current state and applies events through the table."""

    def __init__(self) -> None:
        self.state = State.STARTING

    def apply(self, event: Event) -> State:
        """Apply `event` and return the new state."""
        self.state = next_state(self.state, event)
        return self.state
