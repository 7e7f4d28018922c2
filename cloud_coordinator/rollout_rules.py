"""When a canary is promoted or rolled back: the rollout's state table and its rule (pure).

    canary ──promote──▶ promoted
       └────roll_back──▶ rolled_back

A rollout sends a version to its canary devices first. Their health since the deploy is a
`Window` (differences of the counters devices report in telemetry); the reference is the
rest of the target devices over the same time, or, when they served too little, the
canaries' own counters from before the deploy (the version they ran until then). `judge`
applies the stated rule, in order:

1. a canary failed to load or warm the version up -> roll back;
2. fewer than ``min_requests`` canary predictions: wait, or roll back once ``max_wait_s``
   has passed (too little traffic to vouch for the version);
3. before ``min_duration_s``: wait;
4. canary error rate above the reference's by more than ``max_error_rate_increase``
   (with no reference: above ``max_error_rate_increase`` itself) -> roll back;
5. canary mean latency above ``max_latency_ratio`` x the reference's and more than
   ``min_latency_increase_ms`` above it -> roll back (sub-millisecond jitter is not a
   regression);
6. canary mean confidence below the reference's by more than ``max_confidence_drop``
   -> roll back;
7. otherwise promote.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from cloud_coordinator.errors import CoordinatorError


class IllegalRolloutTransitionError(CoordinatorError):
    """An event arrived in a rollout state where it is not allowed."""


class RolloutState(StrEnum):
    """Where a rollout stands."""

    CANARY = "canary"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


class RolloutEvent(StrEnum):
    """What can happen to a rollout."""

    PROMOTE = "promote"
    ROLL_BACK = "roll_back"


TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (RolloutState.CANARY, RolloutEvent.PROMOTE): RolloutState.PROMOTED,
    (RolloutState.CANARY, RolloutEvent.ROLL_BACK): RolloutState.ROLLED_BACK,
}


def next_rollout_state(state: RolloutState, event: RolloutEvent) -> RolloutState:
    """The state after `event`; IllegalRolloutTransitionError if the table has no cell."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalRolloutTransitionError(
            f"rollout event {event.value!r} is not allowed in state {state.value!r}"
        ) from None


#: A device counts for at most this many times the median device's requests in a window.
MAX_SHARE = 3.0
#: Telemetry ``extra`` counters a window is made of (cumulative on each device).
COUNTERS = ("requests", "errors", "load_failures", "latency_ms_sum", "confidence_sum")


def _product(a: float, b: float) -> float:
    """a * b, or 0.0 where two finite (but absurd) reports multiply past float's range."""
    value = a * b
    return value if math.isfinite(value) else 0.0


def counters(extra: Mapping[str, object]) -> dict[str, float]:
    """A device's cumulative inference counters from its telemetry (``extra.*`` keys)."""

    def get(name: str) -> float:
        value = extra.get(f"extra.{name}", 0.0)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0

    ok = get("inference_ok")
    errors = get("inference_error") + get("inference_unavailable")  # not the callers' "invalid"
    return {
        "requests": ok + errors,
        "errors": errors,
        "load_failures": get("model_load_failures"),
        "latency_ms_sum": _product(get("inference_latency_mean_ms"), ok),
        "confidence_sum": _product(get("inference_confidence_mean"), get("inference_rows")),
        "confidence_count": get("inference_rows"),
        "latency_count": ok,
    }


@dataclass(frozen=True, slots=True)
class Window:
    """Inference health of a set of devices over a stretch of time (sums, not means)."""

    requests: float = 0.0
    errors: float = 0.0
    load_failures: float = 0.0
    latency_ms_sum: float = 0.0
    latency_count: float = 0.0
    confidence_sum: float = 0.0
    confidence_count: float = 0.0

    @classmethod
    def between(cls, before: Mapping[str, float], after: Mapping[str, float]) -> Window:
        """What one device's counters grew by (a restart resets them: then `after` itself)."""
        fields = [f.name for f in dataclasses.fields(cls)]
        if any(after.get(k, 0.0) < before.get(k, 0.0) for k in fields):
            return cls(**{k: after.get(k, 0.0) for k in fields})
        return cls(**{k: after.get(k, 0.0) - before.get(k, 0.0) for k in fields})

    @classmethod
    def robust(cls, windows: Sequence[Window]) -> Window:
        """Several devices' windows as one that no single device can swing (its telemetry is
        its own word): each rate is the median over the devices that served requests, and
        each device counts for at most `MAX_SHARE` times the median device's requests."""
        active = [w for w in windows if w.requests > 0]
        failures = sum(w.load_failures for w in windows)
        if not active:
            return cls(load_failures=failures)

        def capped(counts: list[float]) -> float:
            cap = MAX_SHARE * statistics.median(counts)
            return sum(min(c, cap) for c in counts)

        requests = capped([w.requests for w in active])
        error_rate = statistics.median(w.error_rate for w in active)
        timed = [w for w in active if w.latency_count > 0]
        latency_count = capped([w.latency_count for w in timed]) if timed else 0.0
        latency = (
            statistics.median(w.latency_ms_sum / w.latency_count for w in timed) if timed else 0.0
        )
        rated = [w for w in active if w.confidence_count > 0]
        confidence_count = capped([w.confidence_count for w in rated]) if rated else 0.0
        confidence = (
            statistics.median(w.confidence_sum / w.confidence_count for w in rated)
            if rated
            else 0.0
        )
        return cls(
            requests=requests, errors=error_rate * requests, load_failures=failures,
            latency_ms_sum=latency * latency_count, latency_count=latency_count,
            confidence_sum=confidence * confidence_count, confidence_count=confidence_count,
        )  # fmt: skip

    def __add__(self, other: Window) -> Window:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return Window(*(a + b for a, b in pairs))

    @property
    def error_rate(self) -> float:
        """Errors per request (0 with no requests)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def latency_ms(self) -> float | None:
        """Mean latency, or None with no successful request."""
        return self.latency_ms_sum / self.latency_count if self.latency_count else None

    @property
    def confidence(self) -> float | None:
        """Mean confidence of the predictions, or None with none."""
        return self.confidence_sum / self.confidence_count if self.confidence_count else None


@dataclass(frozen=True, slots=True)
class Rule:
    """The thresholds `judge` applies; every one can be set per rollout."""

    min_duration_s: float = 60.0
    max_wait_s: float = 3600.0
    min_requests: float = 100.0
    max_error_rate_increase: float = 0.01
    max_latency_ratio: float = 1.5
    min_latency_increase_ms: float = 0.5
    max_confidence_drop: float = 0.05

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"rollout rule {f.name!r} must be a finite number >= 0")
        if self.max_wait_s < self.min_duration_s:
            raise ValueError("rollout rule 'max_wait_s' must be >= 'min_duration_s'")


class Verdict(StrEnum):
    """What to do with a canary now."""

    WAIT = "wait"
    PROMOTE = "promote"
    ROLL_BACK = "roll_back"


def judge(
    canary: Window, reference: Window | None, rule: Rule, elapsed_s: float, load_failed: str = ""
) -> tuple[Verdict, str]:
    """The verdict on a canary and the reason, by the rule in this module's docstring."""
    if load_failed or canary.load_failures > 0:
        return (
            Verdict.ROLL_BACK,
            f"a canary could not load the version: {load_failed or 'load failure'}",
        )
    if canary.requests < rule.min_requests:
        if elapsed_s >= rule.max_wait_s:
            return Verdict.ROLL_BACK, (
                f"only {canary.requests:.0f} canary predictions in {elapsed_s:.0f}s"
                f" (min_requests {rule.min_requests:g}): too little traffic to vouch for it"
            )
        return Verdict.WAIT, f"{canary.requests:.0f} of {rule.min_requests:g} canary predictions"
    if elapsed_s < rule.min_duration_s:
        return Verdict.WAIT, f"{elapsed_s:.0f}s of {rule.min_duration_s:.0f}s"
    base_errors = reference.error_rate if reference is not None else 0.0
    if canary.error_rate > base_errors + rule.max_error_rate_increase:
        return Verdict.ROLL_BACK, (
            f"canary error rate {canary.error_rate:.2%} vs {base_errors:.2%}"
            f" (allowed +{rule.max_error_rate_increase:.2%})"
        )
    ref_latency = reference.latency_ms if reference is not None else None
    latency = canary.latency_ms
    if (
        latency is not None
        and ref_latency
        and latency > rule.max_latency_ratio * ref_latency
        and latency - ref_latency > rule.min_latency_increase_ms
    ):
        return Verdict.ROLL_BACK, (
            f"canary latency {latency:.2f} ms vs {ref_latency:.2f} ms"
            f" (allowed x{rule.max_latency_ratio:g} or +{rule.min_latency_increase_ms:g} ms)"
        )
    ref_confidence = reference.confidence if reference is not None else None
    confidence = canary.confidence
    drop = rule.max_confidence_drop
    if confidence is not None and ref_confidence and confidence < ref_confidence - drop:
        return Verdict.ROLL_BACK, (
            f"canary mean confidence {confidence:.3f} vs {ref_confidence:.3f} (allowed -{drop:g})"
        )
    return Verdict.PROMOTE, (
        f"canary healthy over {canary.requests:.0f} predictions:"
        f" error rate {canary.error_rate:.2%} (reference {base_errors:.2%})"
    )
