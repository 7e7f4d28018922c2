"""One deployment's lifecycle on this device, as a state table (the device half of a
rollout: the coordinator publishes the signed manifest of the version to serve on the
retained ``dev/{id}/deploy`` topic).

A deployment is `fetching` until every blob of its version is cached, then `loading`
while the inference service loads and warms it up, and ends `served` (acknowledged ok)
or `failed` (acknowledged not ok with the reason; the previous version keeps serving).
A newer deployment that arrives while one is still fetching `supersedes` it.

| state | `blobs_ready` | `loaded` | `load_failed` | `supersede` |
|---|---|---|---|---|
| `fetching` | `loading` | | | `superseded` |
| `loading` | | `served` | `failed` | |
| `served`, `failed`, `superseded` | | | | |

An empty cell raises `IllegalTransitionError`. Pure: no I/O, no clocks, no threads.
"""

from __future__ import annotations

from enum import Enum

from agent.errors import IllegalTransitionError


class DeployState(Enum):
    """Where one deployment stands."""

    FETCHING = "fetching"
    LOADING = "loading"
    SERVED = "served"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class DeployEvent(Enum):
    """What can happen to a deployment."""

    BLOBS_READY = "blobs_ready"
    LOADED = "loaded"
    LOAD_FAILED = "load_failed"
    SUPERSEDE = "supersede"


S, E = DeployState, DeployEvent
TRANSITIONS: dict[tuple[DeployState, DeployEvent], DeployState] = {
    (S.FETCHING, E.BLOBS_READY): S.LOADING,
    (S.FETCHING, E.SUPERSEDE): S.SUPERSEDED,
    (S.LOADING, E.LOADED): S.SERVED,
    (S.LOADING, E.LOAD_FAILED): S.FAILED,
}
FINISHED = frozenset({S.SERVED, S.FAILED, S.SUPERSEDED})


def next_deploy_state(state: DeployState, event: DeployEvent) -> DeployState:
    """The state after `event`; IllegalTransitionError if the table has no cell for it."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransitionError(
            f"deployment: {event.value!r} is not allowed in state {state.value!r}"
        ) from None


def ack_ref(model: str, version: str) -> str:
    """The `Ack.ref` a deployment is acknowledged by: ``deploy/{model}/{version}``."""
    return f"deploy/{model}/{version}"
