"""The inference runtime: the served model version, predictions, and atomic hot swaps.

One onnxruntime session per loaded version (`agent.onnx_runtime`). `InferenceRuntime`
holds a reference to the serving version and one to the standby (the version it replaced,
kept loaded for `rollback`). `install` builds and warms the new session first, on the
caller's thread (the service's loader thread, never a request), and only then swaps the
reference: a request reads the reference once, so requests in flight finish on the old
session while new ones get the new one. A version that fails to load, does not match its
manifest's input schema, or fails its warm-up is never swapped in; the old one keeps
serving and the failure is counted with its reason. Version states: `agent.rollout`.

A prediction applies the manifest's preprocessing (``x * scale + offset``), runs the
model, and takes its first output as logits: the answer is the top class and its softmax
probability (the confidence). torch is never imported here.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from math import exp
from time import perf_counter
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.answer_graph import ANSWER_OUTPUTS, with_answer_outputs
from agent.errors import InferenceError, InputError
from agent.feedback import RecentInputs
from agent.inference_metrics import InferenceMetrics
from agent.onnx_runtime import ORT_ERRORS, BoundRun, OnnxModel, choose_providers
from agent.predictions import ModelUnavailableError, Predictions, new_predictions
from agent.rollout import VersionEvent, VersionLog, VersionState
from agent.served_model import ServedModel, check_schema
from protocols.messages import ModelManifest

log = logging.getLogger(__name__)
__all__ = ["InferenceRuntime", "ModelLoadError", "ModelUnavailableError", "Predictions"]
#: Batch sizes each thread keeps a bound run for (per version); other sizes run plainly.
BOUND_SIZES = 16
_multiply = np.multiply


class ModelLoadError(InferenceError):
    """A version could not be loaded; `reason` is ``load``, ``schema`` or ``warmup``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InferenceRuntime:
    """The serving version, its standby, predictions and swaps (thread-safe)."""

    def __init__(
        self,
        metrics: InferenceMetrics,
        recent: RecentInputs,
        threads: int = 1,
        providers: Sequence[str] = ("cpu",),
        max_batch: int = 1024,
    ) -> None:
        self.metrics = metrics
        self.recent = recent
        self.threads = threads
        self.providers, missing = choose_providers(providers)
        if missing:
            log.warning(
                "execution providers %s are not available in this onnxruntime build; using %s",
                ", ".join(missing),
                ", ".join(self.providers),
            )
        self.max_batch = max_batch
        self.versions = VersionLog()
        self.last_failure: dict[str, str] = {}
        self._serving: ServedModel | None = None
        self._standby: ServedModel | None = None
        self._swap_lock = threading.Lock()

    @property
    def serving(self) -> ServedModel | None:
        """The version answering new requests, or None before the first load."""
        return self._serving

    @property
    def standby(self) -> ServedModel | None:
        """The version `rollback` returns to, or None."""
        return self._standby

    # --- loading and swapping -------------------------------------------------------------
    def load(self, manifest: ModelManifest, model_bytes: bytes) -> ServedModel:
        """A new, warmed-up session for `manifest`; InferenceError with ``reason`` if bad."""
        stage = "load"
        answered = with_answer_outputs(model_bytes)
        model: OnnxModel | None = None
        answers: tuple[str, ...] = ANSWER_OUTPUTS
        if answered is not None:
            try:
                model = OnnxModel.from_bytes(answered, self.threads, self.providers, False)
            except InferenceError as exc:
                log.info("%s %s: answers computed in numpy (%s)", manifest.name,
                         manifest.version, exc)  # fmt: skip
        try:
            if model is None:
                answers = ()
                model = OnnxModel.from_bytes(model_bytes, self.threads, self.providers, False)
            stage = "schema"
            check_schema(manifest, model)
            stage = "warmup"
            model.warm_up((1, min(8, self.max_batch)))
        except InferenceError as exc:
            raise ModelLoadError(str(exc), stage) from exc
        return ServedModel(manifest, model, answers)

    def install(self, manifest: ModelManifest, model_bytes: bytes) -> bool:
        """Load and warm `manifest`'s model, then swap it in; False (old one kept) if it fails."""
        with self._swap_lock:
            current = self._serving
            if current is not None and current.version == manifest.version:
                return True
            standby = self._standby
            if current is not None and standby is not None and standby.version == manifest.version:
                # the version it replaced comes back: its warm session swaps in again
                self.versions.apply(current.version, VersionEvent.SUPERSEDED)
                self.versions.apply(standby.version, VersionEvent.RESTORE)
                self._serving, self._standby = standby, current
                self.metrics.model_loaded(swapped=True)
                self._publish_models()
                return True
            served = self._load_or_fail(manifest, model_bytes)
            if served is None:
                return False
            self._swap_in(served)
        log.info("model %s: serving version %s", manifest.name, manifest.version)
        return True

    def _swap_in(self, served: ServedModel) -> None:
        """Serve `served` (loaded and warm); the version it replaces becomes the standby."""
        current = self._serving
        if current is not None:
            self.versions.apply(current.version, VersionEvent.SUPERSEDED)
        if self._standby is not None:
            self.versions.apply(self._standby.version, VersionEvent.RETIRE)
        self._standby = current
        self._serving = served  # the swap: one reference assignment
        self.versions.apply(served.version, VersionEvent.READY)
        self.metrics.model_loaded(swapped=True)
        self._publish_models()

    def _load_or_fail(self, manifest: ModelManifest, model_bytes: bytes) -> ServedModel | None:
        """`load`, its version's lifecycle begun; None (the failure recorded) if it fails."""
        self.versions.begin(manifest.version)
        try:
            return self.load(manifest, model_bytes)
        except ModelLoadError as exc:
            self.fail(manifest, exc.reason, str(exc))
            return None

    def keep_standby(self, manifest: ModelManifest, model_bytes: bytes) -> bool:
        """Load `manifest` as the standby (after a restart) if there is none; False if it
        fails. With nothing served (the current version failed to load), it is served."""
        with self._swap_lock:
            serving = self._serving
            if self._standby is not None or (serving and serving.version == manifest.version):
                return True
            served = self._load_or_fail(manifest, model_bytes)
            if served is None:
                return False
            if self._serving is None:  # better the previous version than none
                self._swap_in(served)
                log.warning("model %s: serving the previous version %s (the current one"
                            " failed to load)", manifest.name, manifest.version)  # fmt: skip
                return True
            self._standby = served
            self.versions.apply(served.version, VersionEvent.KEPT)
            self._publish_models()
        return True

    def fail(self, manifest: ModelManifest, reason: str, message: str) -> None:
        """Record that `manifest` could not be loaded (logged, counted, kept for /v1/model)."""
        if self.versions.state(manifest.version) is not VersionState.LOADING:
            self.versions.begin(manifest.version)  # (a load that failed before it began)
        self.versions.apply(manifest.version, VersionEvent.FAIL)
        self.metrics.load_failed(reason)
        self.last_failure = {"version": manifest.version, "reason": reason, "message": message}
        kept = self._serving.version if self._serving else "nothing"
        log.error("model %s %s not swapped in (%s): %s; still serving %s",
                  manifest.name, manifest.version, reason, message, kept)  # fmt: skip

    def rollback(self) -> ServedModel:
        """Serve the standby version again; ModelUnavailableError if there is none."""
        with self._swap_lock:
            current, standby = self._serving, self._standby
            if current is None or standby is None:
                raise ModelUnavailableError("no previous version to roll back to")
            self.versions.apply(current.version, VersionEvent.ROLL_BACK)
            self.versions.apply(standby.version, VersionEvent.RESTORE)
            self._serving, self._standby = standby, None
            self.metrics.model_loaded(swapped=False)
            self._publish_models()
        log.warning("model %s: rolled back from %s to %s",
                    standby.manifest.name, current.version, standby.version)  # fmt: skip
        return standby

    def _publish_models(self) -> None:
        models = []
        for served, role in ((self._serving, "serving"), (self._standby, "standby")):
            if served is not None:
                models.append((served.manifest.name, served.version, role))
        self.metrics.set_models(models)

    def describe(self) -> dict[str, Any]:
        """The serving and standby versions, recent version states, the last load failure."""
        serving, standby = self._serving, self._standby
        return {
            "model": serving.manifest.name if serving else None,
            "version": serving.version if serving else None,
            "previous_version": standby.version if standby else None,
            "serving": serving.describe() if serving else None,
            "versions": self.versions.as_dict(),
            "last_failure": self.last_failure or None,
        }

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
        """Predict checked `rows` (the samples of several requests), timed from `start`."""
        return self._predict(self._serving, rows, start)

    def _predict(self, served: ServedModel | None, x: object, start: float) -> Predictions:
        """`predict` for any input: checked and converted, run bound or plainly."""
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
            self._check_answered(confidences)
            pid = self.recent.keep(batch, served.name, served.version)
            self.metrics.observe(perf_counter() - start, confidences, conf)
            return new_predictions(pid, served.name, served.version, cls.tolist(), confidences,
                                   served.labels, single)  # fmt: skip
        if len(out) != 1:
            return self._batch_answer(out, batch, served, start)
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
        self, out: npt.NDArray[Any], batch: npt.NDArray[Any], served: ServedModel, start: float
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
        self._check_answered(confidences)
        pid = self.recent.keep(batch, served.name, served.version)
        self.metrics.observe_batch(perf_counter() - start, conf)
        return new_predictions(pid, served.name, served.version, classes.tolist(), confidences,
                               served.labels, False)  # fmt: skip
