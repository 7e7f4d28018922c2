"""The inference API's Prometheus metrics: counters and histograms kept in memory, rendered
as Prometheus text (exposition format 0.0.4). No client library: the few kinds we need are
a dict of counts under one lock.

Metrics (all prefixed ``fedge_agent_``): ``predict_requests_total{outcome}``,
``predictions_total`` (rows), ``predict_latency_seconds`` (histogram, per request, in the
runtime: validation, session run, confidence), ``prediction_confidence`` (histogram, per
row: the top class's softmax probability), ``model_info{model,version,role}`` (1 for the
served and the standby version), ``model_swaps_total``, ``model_rollbacks_total``,
``model_load_failures_total{reason}``, ``feedback_total{outcome}``, and, with micro-batching
on, ``microbatches_total`` (runs that answered several requests) and
``microbatched_requests_total`` (requests answered by another request's run; each is
counted and timed as a request of its own, from its arrival to its batch's answer).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0
)  # fmt: skip
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
OUTCOMES = ("ok", "invalid", "unavailable", "error")
_CONF_EDGES = np.asarray(CONFIDENCE_BUCKETS, dtype=np.float64)
_LATENCY_EDGES = np.asarray(LATENCY_BUCKETS, dtype=np.float64)


_T = TypeVar("_T")


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, text: str) -> list[str]:
    """A metric family's ``# HELP`` and ``# TYPE`` lines."""
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


class _Histogram:
    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def render(self, name: str, text: str) -> list[str]:
        lines = _family(name, "histogram", text)
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total!r}")
        lines.append(f"{name}_count {self.count}")
        return lines


def _take(pending: list[_T]) -> list[_T]:
    """The items `pending` holds now, removed from it; items appended meanwhile stay."""
    n = len(pending)
    items = pending[:n]
    del pending[:n]  # appends by other threads land after index n: none is lost
    return items


def _fold_into(hist: _Histogram, edges: npt.NDArray[np.float64], values: npt.ArrayLike) -> None:
    """Count `values` into `hist`'s buckets (``le`` bounds: `bisect_left`'s side).

    One comparison pass per bound (a dozen), counting the values at or below it: about ten
    times faster than a binary search per value (`searchsorted`) on many values. NaN is at
    or below no bound, so it lands in +Inf, as `searchsorted` puts it.
    """
    array = np.asarray(values, dtype=np.float64)
    if not array.size:
        return
    counts = hist.counts
    below = 0  # values at or below the previous bound
    for k, bound in enumerate(edges.tolist()):
        at_or_below = int(np.count_nonzero(array <= bound))
        counts[k] += at_or_below - below
        below = at_or_below
    counts[-1] += len(array) - below
    hist.total += float(array.sum())
    hist.count += len(array)


class InferenceMetrics:
    """Counts and histograms of one agent's inference; safe to update from any thread.

    A successful request only appends its latency and its confidences to pending lists
    (``list.append`` is atomic: no lock, no bucket search on the request's path); they are
    folded into the buckets (one ``searchsorted`` over many) when `FOLD` requests are
    waiting and whenever the metrics are read, so readers always see every request. The
    successful request and row counts are the two histograms' counts.
    """

    #: Requests whose observations wait at most before being folded into the buckets.
    FOLD = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter({o: 0 for o in OUTCOMES if o != "ok"})
        self._latency = _Histogram(LATENCY_BUCKETS)
        self._confidence = _Histogram(CONFIDENCE_BUCKETS)
        self._seconds: list[float] = []  # pending: one latency per request
        self._rows: list[float] = []  # pending: confidences as lists (`observe`, `observe_one`)
        self._batches: list[npt.NDArray[Any]] = []  # pending: confidences of batches
        self._load_failures: Counter[str] = Counter()
        self._feedback: Counter[str] = Counter()
        self._swaps = 0
        self._rollbacks = 0
        self._microbatches = 0  # runs that answered more than one request
        self._merged = 0  # requests answered by another request's run
        self._models: list[tuple[str, str, str]] = []

    def observe_one(self, seconds: float, confidence: float) -> None:
        """One successful single-row request."""
        pending = self._seconds
        pending.append(seconds)
        self._rows.append(confidence)
        if len(pending) >= self.FOLD:
            with self._lock:
                self._fold()

    def observe(
        self, seconds: float, confidences: list[float], array: npt.NDArray[Any] | None = None
    ) -> None:
        """One successful request of any number of rows, their confidences as a list and,
        when the caller has it, as an array (only read here): several rows fold as a copy
        of the array, which the fold takes without turning each float back into numpy."""
        pending = self._seconds
        pending.append(seconds)
        if array is None or len(confidences) == 1:
            self._rows.extend(confidences)
        else:
            self._batches.append(array.copy())
        if len(pending) >= self.FOLD:
            with self._lock:
                self._fold()

    def observe_batch(self, seconds: float, confidences: npt.NDArray[Any]) -> None:
        """One successful request of several rows (`confidences` is kept: not modified later)."""
        pending = self._seconds
        pending.append(seconds)
        self._batches.append(confidences)
        if len(pending) >= self.FOLD:
            with self._lock:
                self._fold()

    def observe_merged(self, seconds: list[float]) -> None:
        """Requests answered by another request's micro-batch (their rows are counted)."""
        with self._lock:
            self._seconds.extend(seconds)
            self._merged += len(seconds)
            self._microbatches += 1
            if len(self._seconds) >= self.FOLD:
                self._fold()

    def _fold(self) -> None:
        """Move the pending observations into their buckets (the lock is held)."""
        _fold_into(self._latency, _LATENCY_EDGES, _take(self._seconds))
        rows = _take(self._rows)
        batches = _take(self._batches)
        conf = np.concatenate([np.asarray(rows, dtype=np.float64), *batches]) if batches else rows
        _fold_into(self._confidence, _CONF_EDGES, conf)

    def _outcomes(self) -> list[tuple[str, int]]:
        """Requests by outcome, ``ok`` included (the lock is held)."""
        return [("ok", self._latency.count), *self._requests.items()]

    def count_request(self, outcome: str) -> None:
        """One request that did not succeed (`outcome`: invalid, unavailable, error)."""
        with self._lock:
            self._requests[outcome] += 1

    def model_loaded(self, swapped: bool) -> None:
        """A version was swapped in (`swapped`) or restored by a rollback."""
        with self._lock:
            if swapped:
                self._swaps += 1
            else:
                self._rollbacks += 1

    def load_failed(self, reason: str) -> None:
        """A version could not be loaded or warmed up."""
        with self._lock:
            self._load_failures[reason] += 1

    def feedback(self, outcome: str) -> None:
        """A feedback request (`outcome`: stored, not_kept (max rows 0), unknown_id, invalid)."""
        with self._lock:
            self._feedback[outcome] += 1

    def set_models(self, models: list[tuple[str, str, str]]) -> None:
        """The loaded versions as (model, version, role) for the ``model_info`` gauge."""
        with self._lock:
            self._models = list(models)

    def snapshot(self) -> dict[str, float]:
        """Counters as flat numbers (for telemetry's ``extra``)."""
        with self._lock:
            self._fold()
            out = {f"inference_{k}": float(v) for k, v in self._outcomes()}
            out["inference_rows"] = float(self._confidence.count)
            out["inference_microbatches"] = float(self._microbatches)
            out["model_swaps"] = float(self._swaps)
            out["model_rollbacks"] = float(self._rollbacks)
            out["model_load_failures"] = float(sum(self._load_failures.values()))
            if self._latency.count:
                out["inference_latency_mean_ms"] = 1000 * self._latency.total / self._latency.count
            if self._confidence.count:
                out["inference_confidence_mean"] = self._confidence.total / self._confidence.count
            return out

    def render(self) -> str:
        """Everything in the Prometheus text format."""
        p = "fedge_agent_"
        with self._lock:
            self._fold()
            rows = self._confidence.count
            lines = _family(
                f"{p}predict_requests_total",
                "counter",
                "Predict requests by outcome (ok, invalid, unavailable, error).",
            )
            lines += [f'{p}predict_requests_total{{outcome="{o}"}} {n}' for o, n in
                      sorted(self._outcomes())]  # fmt: skip
            lines += _family(f"{p}predictions_total", "counter", "Rows answered.")
            lines.append(f"{p}predictions_total {rows}")
            lines += self._latency.render(
                f"{p}predict_latency_seconds",
                "Time of a successful predict request in the runtime, in seconds.",
            )
            lines += self._confidence.render(
                f"{p}prediction_confidence", "Softmax probability of each answered row's top class."
            )
            lines += _family(f"{p}model_info", "gauge",
                             "1 for each loaded version: role serving or standby.")  # fmt: skip
            for model, version, role in self._models:
                lines.append(
                    f'{p}model_info{{model="{_label_value(model)}",'
                    f'version="{_label_value(version)}",role="{role}"}} 1'
                )
            lines += _family(f"{p}model_swaps_total", "counter", "Versions swapped in to serve.")
            lines.append(f"{p}model_swaps_total {self._swaps}")
            lines += _family(f"{p}model_rollbacks_total", "counter",
                             "Rollbacks to the previous version.")  # fmt: skip
            lines.append(f"{p}model_rollbacks_total {self._rollbacks}")
            lines += _family(f"{p}model_load_failures_total", "counter",
                             "Versions that failed to load or warm up, by reason.")  # fmt: skip
            lines += [f'{p}model_load_failures_total{{reason="{_label_value(r)}"}} {n}'
                      for r, n in sorted(self._load_failures.items())]  # fmt: skip
            lines += _family(f"{p}microbatches_total", "counter",
                             "Micro-batch runs that answered several requests.")  # fmt: skip
            lines.append(f"{p}microbatches_total {self._microbatches}")
            lines += _family(f"{p}microbatched_requests_total", "counter",
                             "Requests answered by another request's micro-batch run.")  # fmt: skip
            lines.append(f"{p}microbatched_requests_total {self._merged}")
            lines += _family(f"{p}feedback_total", "counter",
                             "Feedback requests by outcome (stored, not_kept, unknown_id, "
                             "invalid).")  # fmt: skip
            lines += [f'{p}feedback_total{{outcome="{o}"}} {n}'
                      for o, n in sorted(self._feedback.items())]  # fmt: skip
        return "\n".join(lines) + "\n"
