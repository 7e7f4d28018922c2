"""The inference runtime: predictions on the served model version.

`InferenceRuntime` is `agent.version_slots.VersionSlots` (the serving version, its
standby, loads, atomic swaps and rollbacks) plus predictions. A request reads the serving
reference once, so it finishes on the version it started on, whatever is swapped in
meanwhile.

A prediction applies the manifest's preprocessing (``x * scale + offset``), runs the
model, and takes its first output as logits: the answer is the top class and its softmax
probability (the confidence). torch is never imported here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from math import exp
from time import perf_counter
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import InferenceError, InputError
from agent.feedback import RecentInputs
from agent.inference_metrics import InferenceMetrics
from agent.onnx_runtime import ORT_ERRORS, BoundRun
from agent.predictions import ModelUnavailableError, Predictions, new_predictions
from agent.served_model import ServedModel
from agent.version_slots import ModelLoadError, VersionSlots

log = logging.getLogger(__name__)
__all__ = ["InferenceRuntime", "ModelLoadError", "ModelUnavailableError", "Predictions"]
#: Batch sizes each thread keeps a bound run for (per version); other sizes run plainly.
BOUND_SIZES = 16
_multiply = np.multiply


class InferenceRuntime(VersionSlots):
    """The serving version, its standby, predictions and swaps (thread-safe)."""

    def __init__(
        self,
        metrics: InferenceMetrics,
        recent: RecentInputs,
        threads: int = 1,
        providers: Sequence[str] = ("cpu",),
        max_batch: int = 1024,
    ) -> None:
        super().__init__(metrics, threads, providers, max_batch)
        self.recent = recent

    # --- predictions ---------------------------------------------------------------------
    def predict(self, x: object) -> Predictions:
        """Predict one sample or a batch; InputError for a bad input, ModelUnavailableError."""
        start = perf_counter()
        served = self._serving  # read once: this request stays on this version
        if served is not None and type(x) is np.ndarray and x.dtype is served.input_dtype:
            # the hot path: a batch of exactly the shape of a bound run this thread holds
            # (so valid), whose session computes the answers itself
            try:
                run = served.local.answering[x.shape]
            except (AttributeError, KeyError):
                pass
            else:
                batch = run.input
                if served.scale_only:
                    _multiply(x, served.scale_value, batch)
                else:
                    served.prepare_into(x, batch)
                kept = batch.copy()  # (before the run, while the input is still in the cache)
                try:
                    run.launch()
                except ORT_ERRORS as exc:
                    self.metrics.count_request("error")
                    raise InferenceError(f"inference failed on input {x.shape}: {exc}") from exc
                conf, cls = run.extra
                confidences = conf.tolist()
                total = sum(confidences)  # (`_check_answered`, inline on the hot path)
                if total - total != 0.0:
                    self._check_answered(confidences)
                pid = self.recent.keep(kept, served.name, served.version)
                self.metrics.observe(perf_counter() - start, confidences, conf)
                return new_predictions(pid, served.name, served.version, cls.tolist(),
                                       confidences, served.labels, False)  # fmt: skip
        return self._predict(served, x, start)

    def sample_row(self, x: object) -> npt.NDArray[Any] | None:
        """`x` as a checked one-row batch if it is one sample, else None (a batch, or no
        model yet: `predict` answers those); InputError (counted) if it is bad."""
        served = self._serving
        if served is None or (type(x) is np.ndarray and x.ndim == served.rank):
            return None  # (a batch: `predict` checks it)
        batch, single = self._checked(served, x)
        if single and batch.dtype.kind == "f" and not np.isfinite(batch).all():
            # refused alone, before it joins a micro-batch it would fail for everyone
            self.metrics.count_request("invalid")
            raise InputError("the input holds NaN or Inf (or values too large for float32)")
        return batch if single else None

    def predict_rows(self, rows: npt.NDArray[Any], start: float) -> Predictions:
        """Predict checked `rows` (the samples of several requests), timed from `start`.

        The rows are apart: one whose answer is not finite (a finite input too large for
        the model) is counted as an invalid request and answered with confidence NaN, for
        the caller to fail that row's request alone; the others are answered as usual.
        """
        return self._predict(self._serving, rows, start, apart=True)

    def _predict(
        self, served: ServedModel | None, x: object, start: float, apart: bool = False
    ) -> Predictions:
        """`predict` for any input: checked and converted, run bound or plainly (`apart`:
        see `predict_rows`)."""
        if served is None:
            self.metrics.count_request("unavailable")
            raise ModelUnavailableError("no model is loaded yet")
        single = False
        if (
            type(x) is np.ndarray
            and x.dtype is served.input_dtype
            and x.shape[1:] == served.batch_tail
            and 0 < len(x) <= self.max_batch
        ):
            # already a batch of the input's dtype and shape: nothing to check or convert,
            # and preprocessing (or the copy) below makes the contiguous array kept for feedback
            batch = x
        else:
            batch, single = self._checked(served, x)
        try:
            run = served.local.runs[len(batch)]
        except (AttributeError, KeyError):
            run = self._bound_run(served, len(batch))
        try:
            if run is not None:
                # preprocessing straight into the bound input, then one copy kept for feedback
                served.prepare_into(batch, run.input)
                batch = run.input.copy()
                run()
                out = run.output
            else:
                batch = self._preprocessed(served, batch, x)
                out = served.model.run_checked(batch)
        except InferenceError:
            self.metrics.count_request("error")
            raise
        if run is not None and run.extra:  # the session computed the answers already
            conf, cls = run.extra
            confidences = conf.tolist()
            total = sum(confidences)
            if total - total != 0.0:  # (NaN or Inf)
                if apart and len(confidences) > 1:
                    return self._answered_apart(served, batch, cls, conf, start)
                self._check_answered(confidences)
            pid = self.recent.keep(batch, served.name, served.version)
            self.metrics.observe(perf_counter() - start, confidences, conf)
            return new_predictions(pid, served.name, served.version, cls.tolist(), confidences,
                                   served.labels, single)  # fmt: skip
        if len(out) != 1:
            return self._batch_answer(out, batch, served, start, apart)
        row: list[float] = out.tolist()[0] if out.ndim == 2 else out.reshape(-1).tolist()
        self._check_answered(row)
        top = max(row)
        if -600.0 < top < 600.0:  # exp cannot overflow (nor the sum of any number of classes)
            confidence = exp(top) / sum(map(exp, row))
        else:
            confidence = 1.0 / math.fsum([exp(v - top) for v in row])
        pid = self.recent.keep(batch, served.name, served.version)
        self.metrics.observe_one(perf_counter() - start, confidence)
        return new_predictions(pid, served.name, served.version, [row.index(top)], [confidence],
                               served.labels, single)  # fmt: skip

    @staticmethod
    def _preprocessed(served: ServedModel, batch: npt.NDArray[Any], x: object) -> npt.NDArray[Any]:
        """``batch * scale + offset`` as an array nobody else holds (kept for feedback)."""
        fresh = served.scale != 1.0
        if fresh:
            batch = batch * served.scale_value
        if served.offset != 0.0:
            batch = batch + served.offset_value
            fresh = True
        if not fresh and (batch is x or batch.base is not None):
            batch = batch.copy()  # the caller may reuse its array
        return batch

    def _bound_run(self, served: ServedModel, rows: int) -> BoundRun | None:
        """This thread's bound run for `rows` rows, or None: run plainly.

        A size gets its bound run on this thread's second batch of it (a thread that serves
        one request, an HTTP connection without keep-alive, never pays for making one), and
        each thread binds at most `BOUND_SIZES` sizes per version.
        """
        state = served.local.__dict__
        runs: dict[int, BoundRun | None] = state.setdefault("runs", {})
        if rows in runs:
            return runs[rows]
        seen: set[int] = state.setdefault("seen", set())
        if rows not in seen or not served.bindable or len(runs) >= BOUND_SIZES:
            seen.add(rows)
            return None
        try:
            run: BoundRun | None = served.model.bound(rows, served.answers)
            if run is not None and run.extra and run.output.ndim != 2:
                run = served.model.bound(rows)  # rows of logits only: answers over every axis
        except InferenceError as exc:
            log.warning("batches of %d rows run without I/O binding: %s", rows, exc)
            run = None
        runs[rows] = run
        if run is not None and run.extra:
            state.setdefault("answering", {})[run.input.shape] = run
        return run

    def _checked(self, served: ServedModel, x: object) -> tuple[npt.NDArray[Any], bool]:
        """(`x` as a checked batch, whether it was one sample); InputError (counted) if bad."""
        try:
            arr = x if isinstance(x, np.ndarray) else np.asarray(x)
            single = arr.ndim == served.rank - 1
            batch = served.model.check(arr[None] if single else arr)
            if len(batch) > self.max_batch:
                raise InputError(f"batch of {len(batch)} rows; at most {self.max_batch}")
        except (InputError, ValueError, TypeError) as exc:
            self.metrics.count_request("invalid")
            if isinstance(exc, InputError):
                raise
            raise InputError(f"input is not a numeric array: {exc}") from exc
        return batch, single

    def _check_answered(self, values: list[float]) -> None:
        """InputError (counted) unless every value is finite: an input holding NaN or Inf
        (or too large for float32) makes the model's answers NaN or infinite."""
        total = sum(values)
        if total - total != 0.0:  # (NaN or Inf; one C call over the whole list)
            self.metrics.count_request("invalid")
            raise InputError("the input holds NaN or Inf (or values too large for float32)")

    def _batch_answer(
        self,
        out: npt.NDArray[Any],
        batch: npt.NDArray[Any],
        served: ServedModel,
        start: float,
        apart: bool = False,
    ) -> Predictions:
        logits = out if out.ndim == 2 else out.reshape(len(out), -1)
        if logits.dtype.kind != "f":
            logits = logits.astype(np.float64)
        classes = logits.argmax(axis=1)
        top = logits[np.arange(len(logits)), classes]
        shifted = logits - top[:, None]
        np.exp(shifted, out=shifted)
        # row sums as a matrix-vector product: numpy's reductions over a short last axis
        # cost several times more than one BLAS call at these sizes (and OpenBLAS keeps
        # products of fewer than 9,216 elements on the calling thread)
        if shifted.size < 9216:
            sums = shifted @ np.ones(shifted.shape[1], dtype=shifted.dtype)
        else:
            sums = shifted.sum(axis=1)
        conf = np.reciprocal(sums, out=sums)
        confidences = conf.tolist()
        total = sum(confidences)
        if total - total != 0.0:  # (NaN or Inf)
            if apart:
                return self._answered_apart(served, batch, classes, conf, start)
            self._check_answered(confidences)
        pid = self.recent.keep(batch, served.name, served.version)
        self.metrics.observe_batch(perf_counter() - start, conf)
        return new_predictions(pid, served.name, served.version, classes.tolist(), confidences,
                               served.labels, False)  # fmt: skip

    def _answered_apart(
        self,
        served: ServedModel,
        batch: npt.NDArray[Any],
        classes: npt.NDArray[Any],
        conf: npt.NDArray[Any],
        start: float,
    ) -> Predictions:
        """The answers to the rows of several requests (`predict_rows`), some not finite:
        those count as invalid requests and answer confidence NaN; the others as usual."""
        finite = np.isfinite(conf)
        good = conf[finite]
        for _ in range(len(conf) - len(good)):
            self.metrics.count_request("invalid")
        pid = self.recent.keep(batch, served.name, served.version)
        if len(good):
            self.metrics.observe(perf_counter() - start, good.tolist(), good)
        confidences = np.where(finite, conf, math.nan).tolist()
        return new_predictions(pid, served.name, served.version, classes.tolist(), confidences,
                               served.labels, False)  # fmt: skip
