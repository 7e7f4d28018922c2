"""The daemon's inference service: model store → runtime → local API, and rollbacks.

Wires `InferenceRuntime` (sessions and swaps), `RecentInputs` and `FeedbackLog` (labels
become training data), `InferenceMetrics` and the `ApiServer`. It is the learner's
`ModelListener`: a version made current is queued to the ``model-loader`` thread, which
reads the file the manifest names for serving (`ModelManifest.serving`: ``model.onnx``,
or ``model.int8.onnx`` when the coordinator chose its int8 variant) from the store,
loads and warms it, and swaps it in (so does a deployment, `agent.deployer`, which is
told the outcome). With offload on, low-confidence predictions go through
`agent.offload`. A version that fails is blocked in the store (never made current
again) and the pointers go back to what is served. `rollback` (HTTP, the MQTT
``rollback`` command) serves the previous version again, blocks the one it left, and
moves the store's pointers with it, so a restart serves the same version.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.api_codec import InputLimits
from agent.config import AgentConfig, parse_listen
from agent.errors import AgentError
from agent.feedback import FeedbackError, FeedbackLog, RecentInputs
from agent.http_api import ApiServer
from agent.inference_metrics import InferenceMetrics
from agent.micro_batching import MicroBatcher
from agent.model_store import ModelStore
from agent.native_memory import release_free_heap
from agent.predictions import ModelUnavailableError, Predictions
from agent.serving import InferenceRuntime
from protocols.messages import ModelManifest

if TYPE_CHECKING:
    from agent.deployer import DeployDone
    from agent.offload import Offloader
    from agent.trust import ManifestTrust

log = logging.getLogger(__name__)


class InferenceService:
    """Serves one model (``inference_model``, or the first one made current) on this device."""

    def __init__(self, config: AgentConfig, store: ModelStore, dataset_dir: Path) -> None:
        self.config = config
        self.store = store
        self.metrics = InferenceMetrics()
        self.recent = RecentInputs(config.inference_recent_inputs, config.inference_recent_mb << 20)
        self.runtime = InferenceRuntime(
            self.metrics,
            self.recent,
            threads=config.inference_threads,
            providers=config.providers,
            max_batch=config.inference_max_batch,
        )
        self.batcher: MicroBatcher | None = None  # micro-batching, when configured
        if config.inference_batch_wait_ms > 0:
            self.batcher = MicroBatcher(self.runtime, self.metrics,
                                        config.inference_batch_rows,
                                        config.inference_batch_wait_ms / 1000)  # fmt: skip
        self.feedback_log = FeedbackLog(dataset_dir, config.inference_feedback_max_rows)
        self.model_name: str | None = config.inference_model or None
        self.server: ApiServer | None = None
        self.trust: ManifestTrust | None = None  # its rejection counts go to /metrics
        self.offloader: Offloader | None = None  # set when offload is on
        self._queue: queue.Queue[tuple[ModelManifest, str, DeployDone | None] | None] = (
            queue.Queue()
        )
        self._lock = threading.Lock()
        self._point_lock = threading.Lock()
        self._limits: tuple[object, InputLimits] | None = None  # (of this served version)
        self._loader = threading.Thread(target=self._load_loop, name="model-loader", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Load the stored previous and current versions (in the background); open the API.

        The current version is the one served when the agent stopped (a deployed one too):
        a device that restarts offline serves at once, without waiting for the broker.
        """
        names = [self.model_name] if self.model_name else self.store.names()[:1]
        for name in names:
            current, previous = self.store.current(name), self.store.previous(name)
            if current is not None:
                with self._lock:
                    self.model_name = name
                self._queue.put((current, "install", None))
            if previous is not None and previous.version not in self.store.blocked(name):
                self._queue.put((previous, "standby", None))  # what `rollback` returns to
        self._loader.start()
        address = parse_listen(self.config.inference_listen, self.config.data_dir)
        try:
            self.server = ApiServer(self, address)
        except OSError as exc:
            log.error("inference API cannot listen on %s: %s; running without it", address, exc)
            return
        self.server.start()

    def stop(self) -> None:
        """Close the API and stop the loader thread (kept candidate rows are written)."""
        if self.server is not None:
            self.server.stop()
        if self.offloader is not None and self.offloader.candidates is not None:
            try:
                self.offloader.candidates.flush()
            except OSError as exc:
                log.warning("low-confidence inputs not written: %s", exc)
        self._queue.put(None)
        if self._loader.is_alive():
            self._loader.join(timeout=10)

    def wait_idle(self, timeout: float) -> bool:
        """Block until every queued version was tried (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # --- versions --------------------------------------------------------------------------
    def model_activated(self, manifest: ModelManifest) -> None:
        """Queue `manifest` for loading if it is the served model (ModelListener)."""
        with self._lock:
            if self.model_name is None:
                self.model_name = manifest.name
        if manifest.name == self.model_name and self.store.deployed(manifest.name) is None:
            self._queue.put((manifest, "install", None))

    def deploy(self, manifest: ModelManifest, done: DeployDone) -> str | None:
        """Queue a deployed version to be served (`done` is told how it went); the reason
        if this device cannot serve it at all."""
        with self._lock:
            if self.model_name is None:
                self.model_name = manifest.name
        if manifest.name != self.model_name:
            return f"this device serves model {self.model_name}, not {manifest.name}"
        self._queue.put((manifest, "deploy", done))
        return None

    def _load_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                manifest, kind, done = item
                if kind == "standby":
                    self._keep_standby(manifest)
                elif done is None:
                    self.install(manifest)
                else:
                    try:
                        ok = self.install(manifest)
                    except Exception as exc:  # answered all the same, then logged below
                        done.deploy_finished(manifest, False, f"internal error: {exc}")
                        raise
                    failure = self.runtime.last_failure
                    reason = "" if ok else f"{failure.get('reason')}: {failure.get('message')}"
                    done.deploy_finished(manifest, ok, reason)
                # What the load freed, back to the system (about 1 MB after the digits
                # model). glibc locks each arena while it trims it: a request allocating
                # meanwhile waits, for a few ms at most, once per load.
                release_free_heap()
            except Exception:  # supervisor of the loader thread: log with traceback, go on
                log.exception("loading model %s failed unexpectedly", item)
            finally:
                self._queue.task_done()

    def install(self, manifest: ModelManifest) -> bool:
        """Load `manifest`'s model from the store and swap it in; False if it failed."""
        try:
            data = self.store.file(manifest, manifest.serving)
        except AgentError as exc:  # not in the store, or damaged there (and removed)
            self.runtime.fail(manifest, "missing", str(exc))
            ok, missing = False, True
        else:
            ok, missing = self.runtime.install(manifest, data), False
        if not ok and not missing:  # (missing bytes are fetched again, not held against it)
            self.store.block(manifest.name, manifest.version)
        self._point_store()  # what a restart serves: what is served now
        return ok

    def _keep_standby(self, manifest: ModelManifest) -> None:
        try:
            data = self.store.file(manifest, manifest.serving)
        except AgentError as exc:
            log.warning("previous version %s not kept for rollback: %s", manifest.version, exc)
            return
        self.runtime.keep_standby(manifest, data)
        self._point_store()  # (it may be served now: what a restart serves then)

    def _point_store(self) -> None:
        # One writer at a time, each reading what is served once it may write: the loader
        # (after a standby load) and a rollback both point the store, and a write of what
        # was served just before the other's swap must not land last.
        with self._point_lock:
            serving, standby = self.runtime.serving, self.runtime.standby
            if serving is not None:
                name = serving.manifest.name
                self.store.point(name, serving.version, standby.version if standby else None)

    # --- the API (Backend) ----------------------------------------------------------------
    def predict(self, x: object) -> Predictions:
        """Predict with the serving version (see `InferenceRuntime.predict`); with offload on,
        low-confidence rows are answered by the cloud when it answers in time."""
        predictor = self.runtime if self.batcher is None else self.batcher
        if self.offloader is None:
            return predictor.predict(x)
        return self.offloader.refine(predictor.predict(x), self.recent)

    def count_invalid(self) -> None:
        """Count a predict request whose body could not be decoded."""
        self.metrics.count_request("invalid")

    def input_limits(self) -> InputLimits:
        """What a predict body for the serving version holds at most (its input's shape,
        ``inference_max_batch`` rows); ModelUnavailableError (counted) if none is loaded."""
        serving = self.runtime.serving
        if serving is None:
            self.metrics.count_request("unavailable")
            raise ModelUnavailableError("no model is loaded yet")
        cached = self._limits
        if cached is None or cached[0] is not serving:
            limits = InputLimits.of(serving.model.input_shape[1:], self.runtime.max_batch)
            self._limits = cached = (serving, limits)
        return cached[1]

    def describe(self) -> dict[str, Any]:
        """The serving version (and the file, fp32 or int8 variant, it runs), the previous
        one, recent version states."""
        described = self.runtime.describe()
        serving = self.runtime.serving
        if serving is not None and isinstance(described.get("serving"), dict):
            m = serving.manifest
            described["serving"]["file"] = m.serving
            described["serving"]["variant"] = str(m.variants.get("chosen", "")) or (
                "int8" if ".int8." in m.serving else "fp32"
            )
            described["serving"]["variants"] = dict(m.variants)
        return described

    def rollback(self) -> dict[str, Any]:
        """Serve the previous version again; ModelUnavailableError if there is none."""
        left = self.runtime.serving
        restored = self.runtime.rollback()
        if left is not None:
            self.store.block(left.manifest.name, left.version)
        self._point_store()
        log.info("rollback: serving %s again", restored.version)
        return self.describe()

    def feedback(self, prediction_id: str, label: str | int) -> dict[str, Any]:
        """Store `label` for an earlier prediction's input as training data; a prediction
        labelled again gets the new label in place of the earlier one (``replaced``)."""
        try:
            key, row, model, version = self.recent.find(prediction_id)
            labels = self._labels(model, version)
            if isinstance(label, str):
                if label not in labels:
                    raise FeedbackError(f"unknown label {label!r}; labels: {labels}", "invalid")
                index = labels.index(label)
            elif labels and not 0 <= label < len(labels):
                raise FeedbackError(f"class index {label} out of range 0-{len(labels) - 1}",
                                    "invalid")  # fmt: skip
            else:
                index = label
            rows, replaced = self.feedback_log.put(key, row, index)
        except FeedbackError as exc:
            self.metrics.feedback(exc.reason)
            raise
        self.metrics.feedback("stored" if rows else "not_kept")
        return {"stored": rows > 0, "rows": rows, "label_index": index, "replaced": replaced}

    def _labels(self, model: str, version: str) -> tuple[str, ...]:
        for served in (self.runtime.serving, self.runtime.standby):
            if served is not None and served.version == version:
                return served.labels
        manifest = self.store.manifest(model, version)
        return manifest.labels if manifest is not None else ()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Ready when a version is serving."""
        serving = self.runtime.serving
        if serving is None:
            return False, {"status": "no_model", "model": self.model_name}
        return True, {"status": "ok", "model": serving.manifest.name, "version": serving.version}

    def metrics_text(self) -> str:
        """Prometheus text (with manifest rejections and offload counts when they apply)."""
        text = self.metrics.render()
        extra = self.trust.metrics_lines() if self.trust is not None else []
        if self.offloader is not None:
            extra += self.offloader.metrics_lines()
        return text + "\n".join(extra) + "\n" if extra else text

    # --- telemetry -------------------------------------------------------------------------
    def served_versions(self) -> dict[str, str]:
        """{model: version} of what this device serves."""
        serving = self.runtime.serving
        return {serving.manifest.name: serving.version} if serving else {}

    def telemetry_extra(self) -> dict[str, float]:
        """Inference counters (and offload counts) for telemetry's ``extra``."""
        extra = self.metrics.snapshot()
        if self.offloader is not None:
            extra.update(self.offloader.telemetry_extra())
        return extra


__all__ = ["InferenceService", "ModelUnavailableError"]
