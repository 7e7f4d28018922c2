"""The device side of a model rollout: each served version's lifecycle as a state table.

A version is `loading` while its session is built and warmed up off the request path. It
starts `serving` only once that worked (else it is `failed` and never served); the version
it replaces becomes the `standby` (kept loaded, so `rollback` is instant). After a restart
the previous version is loaded straight into `standby` (`kept`). A newer version
retires the standby. `rollback` puts the standby back to `serving`, and the version it
replaced is `rolled_back`: never served again unless it is published anew.

| state | `ready` | `kept` | `fail` | `superseded` | `restore` | `roll_back` | `retire` |
|---|---|---|---|---|---|---|---|
| `loading` | `serving` | `standby` | `failed` | | | | |
| `serving` | | | | `standby` | | `rolled_back` | |
| `standby` | | | | | `serving` | | `retired` |
| `failed`, `rolled_back`, `retired` | | | | | | | |

An empty cell raises `IllegalTransitionError`. Pure: no I/O, no clocks, no threads.
"""

from __future__ import annotations

from enum import Enum

from agent.errors import IllegalTransitionError


class VersionState(Enum):
    """Where one model version stands on this device."""

    LOADING = "loading"
    SERVING = "serving"
    STANDBY = "standby"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    RETIRED = "retired"


class VersionEvent(Enum):
    """What can happen to a model version on this device."""

    READY = "ready"
    KEPT = "kept"
    FAIL = "fail"
    SUPERSEDED = "superseded"
    RESTORE = "restore"
    ROLL_BACK = "roll_back"
    RETIRE = "retire"


S, E = VersionState, VersionEvent
TRANSITIONS: dict[tuple[VersionState, VersionEvent], VersionState] = {
    (S.LOADING, E.READY): S.SERVING,
    (S.LOADING, E.KEPT): S.STANDBY,
    (S.LOADING, E.FAIL): S.FAILED,
    (S.SERVING, E.SUPERSEDED): S.STANDBY,
    (S.SERVING, E.ROLL_BACK): S.ROLLED_BACK,
    (S.STANDBY, E.RESTORE): S.SERVING,
    (S.STANDBY, E.RETIRE): S.RETIRED,
}


def next_state(state: VersionState, event: VersionEvent) -> VersionState:
    """The state after `event`; IllegalTransitionError if the table has no cell for it."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransitionError(
            f"model version: {event.value!r} is not allowed in state {state.value!r}"
        ) from None


_SETTLED = frozenset((S.FAILED, S.ROLLED_BACK, S.RETIRED))


class VersionLog:
    """The state of every version seen since start (a bounded record, newest last)."""

    def __init__(self, keep: int = 16) -> None:
        self._states: dict[str, VersionState] = {}
        self._keep = keep

    def begin(self, version: str) -> None:
        """Record that `version` starts loading (again, if it was seen before). Past `keep`
        records, the oldest settled ones (failed, rolled back, retired) are forgotten; the
        serving, standby and loading versions never are."""
        self._states.pop(version, None)
        self._states[version] = S.LOADING
        excess = len(self._states) - self._keep
        if excess > 0:
            settled = [v for v, state in self._states.items() if state in _SETTLED]
            for old in settled[:excess]:
                del self._states[old]

    def apply(self, version: str, event: VersionEvent) -> VersionState:
        """Apply `event` to `version`; IllegalTransitionError if not allowed or unknown."""
        state = self._states.get(version)
        if state is None:
            raise IllegalTransitionError(f"model version {version!r} was never loaded")
        self._states[version] = next_state(state, event)
        return self._states[version]

    def state(self, version: str) -> VersionState | None:
        """The version's state, or None if not seen."""
        return self._states.get(version)

    def as_dict(self) -> dict[str, str]:
        """Every recorded version and its state name (safe while another thread changes it)."""
        return {v: s.value for v, s in self._states.copy().items()}
