"""Micro-batching: single-sample predict calls that arrive together run as one batch.

Off by default (``inference_batch_wait_ms = 0``). When on, the first single-sample request
to arrive opens a batch and waits up to ``inference_batch_wait_ms`` for others (fewer when
``inference_batch_rows`` samples have arrived); then it runs them all in one
``session.run`` and every request gets its own row back, with a prediction id that
feedback takes as usual. Requests that send a batch of their own, and requests arriving
while a batch runs, are not held: the first run as they are, the second open the next
batch. A run that fails fails every request in it, with the same error; a row whose answer
is not finite (a finite input too large for the model) fails only its own request.

This trades latency for throughput: each request may wait up to the window, and a model
run over many rows costs much less per row than as many single runs. Whether it pays
depends on the model and the request rate: ``python -m bench.micro_batching`` measures it.
On the digits models, whose runs cost tens of microseconds, it lowers throughput (the
hand-offs between threads cost more than the runs they save), hence off by default.
"""

from __future__ import annotations

import math
import threading
from time import perf_counter
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.errors import AgentError, InferenceError, InputError
from agent.predictions import ModelUnavailableError, Predictions, new_predictions


class RowPredictor(Protocol):
    """What the batcher needs of `agent.serving.InferenceRuntime`."""

    def predict(self, x: object) -> Predictions:
        """Predict one sample or a batch."""
        ...

    def sample_row(self, x: object) -> npt.NDArray[Any] | None:
        """`x` as a checked one-row batch if it is one sample, else None."""
        ...

    def predict_rows(self, rows: npt.NDArray[Any], start: float) -> Predictions:
        """Predict checked `rows`, timed from `start`; a row whose answer is not finite
        has confidence NaN (and was counted as an invalid request)."""
        ...


class MergeCounter(Protocol):
    """What the batcher tells `agent.inference_metrics.InferenceMetrics`."""

    def observe_merged(self, seconds: list[float]) -> None:
        """Latencies of the requests a micro-batch answered besides its first."""
        ...

    def count_request(self, outcome: str) -> None:
        """One request that did not succeed (invalid, unavailable, error)."""
        ...


class _Batch:
    __slots__ = ("answer", "done", "error", "rows", "starts")

    def __init__(self) -> None:
        self.rows: list[npt.NDArray[Any]] = []
        self.starts: list[float] = []
        self.done = threading.Event()
        self.answer: Predictions | None = None
        self.error: BaseException | None = None


class MicroBatcher:
    """Runs single-sample predict calls that arrive within `wait_s` of each other together."""

    def __init__(
        self, runtime: RowPredictor, metrics: MergeCounter, max_rows: int, wait_s: float
    ) -> None:
        if max_rows < 1 or not wait_s > 0:
            raise ValueError(f"max_rows must be >= 1 and wait_s > 0, got {max_rows}, {wait_s}")
        self.runtime = runtime
        self.metrics = metrics
        self.max_rows = max_rows
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._open: _Batch | None = None  # the batch new samples join

    def predict(self, x: object) -> Predictions:
        """Predict `x`; one sample may wait up to `wait_s` to share a run with others."""
        start = perf_counter()
        row = self.runtime.sample_row(x)
        if row is None:
            return self.runtime.predict(x)
        with self._cond:
            batch = self._open
            leader = batch is None
            if batch is None:
                batch = self._open = _Batch()
            index = len(batch.rows)
            batch.rows.append(row)
            batch.starts.append(start)
            if len(batch.rows) >= self.max_rows:
                self._open = None  # full: the next sample opens another
                self._cond.notify_all()
            if leader:
                deadline = start + self.wait_s
                while self._open is batch:
                    left = deadline - perf_counter()
                    if left <= 0:
                        self._open = None
                        break
                    self._cond.wait(left)
        if leader:
            self._run(batch)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error  # (as concurrent.futures does: one error object for all waiters)
        if batch.answer is None:  # the leader's run raised something unexpected (a bug)
            raise InferenceError("the micro-batch this request was in did not run")
        if not math.isfinite(batch.answer.confidences[index]):  # (counted by the runtime)
            raise InputError("the input holds NaN or Inf (or values too large for float32)")
        return _row(batch.answer, index)

    def _run(self, batch: _Batch) -> None:
        rows = batch.rows
        try:
            batch.answer = self.runtime.predict_rows(
                rows[0] if len(rows) == 1 else np.concatenate(rows), batch.starts[0]
            )
        except AgentError as exc:  # every request in the batch gets it
            batch.error = exc
            # the runtime counted the run's outcome once; the others failed with it
            outcome = ("unavailable" if isinstance(exc, ModelUnavailableError) else
                       "invalid" if isinstance(exc, InputError) else "error")  # fmt: skip
            for _ in rows[1:]:
                self.metrics.count_request(outcome)
        finally:
            answer = batch.answer
            if len(rows) > 1 and answer is not None:
                # the runtime timed the first request it answered; these are the others
                now = perf_counter()
                answered = batch.starts
                total = sum(answer.confidences)
                if total - total != 0.0:  # rows not answered: their requests failed
                    answered = [s for s, c in zip(answered, answer.confidences, strict=True)
                                if math.isfinite(c)]  # fmt: skip
                if len(answered) > 1:
                    self.metrics.observe_merged([now - s for s in answered[1:]])
            batch.done.set()


def _row(answer: Predictions, i: int) -> Predictions:
    """Row `i` of a micro-batch's answer, as the answer to the one sample it was."""
    return new_predictions(
        f"{answer.prediction_id}.{i}",
        answer.model,
        answer.version,
        [answer.classes[i]],
        [answer.confidences[i]],
        answer.label_names,
        True,
    )


__all__ = ["MergeCounter", "MicroBatcher", "RowPredictor"]
