"""The model versions a runtime holds: the serving one, its standby, loads and swaps.

One onnxruntime session per loaded version (`agent.onnx_runtime`). `VersionSlots` holds a
reference to the serving version and one to the standby (the version it replaced, kept
loaded for `rollback`). `install` builds and warms the new session first, on the caller's
thread (the service's loader thread, never a request) and outside the swap lock, and only
then swaps the reference: a request reads the reference once, so requests in flight finish
on the old session while new ones get the new one. A version that fails to load, does not
match its manifest's input schema, or fails its warm-up is never swapped in; the old one
keeps serving and the failure is counted with its reason. Version states: `agent.rollout`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from agent.answer_graph import ANSWER_OUTPUTS, with_answer_outputs
from agent.errors import InferenceError
from agent.inference_metrics import InferenceMetrics
from agent.onnx_runtime import OnnxModel, choose_providers
from agent.predictions import ModelUnavailableError
from agent.rollout import VersionEvent, VersionLog, VersionState
from agent.served_model import ServedModel, check_schema
from protocols.messages import ModelManifest

log = logging.getLogger(__name__)
__all__ = ["ModelLoadError", "VersionSlots"]


class ModelLoadError(InferenceError):
    """A version could not be loaded; `reason` is ``load``, ``schema`` or ``warmup``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class VersionSlots:
    """The serving version and its standby; loads, swaps and rollbacks (thread-safe)."""

    def __init__(
        self,
        metrics: InferenceMetrics,
        threads: int = 1,
        providers: Sequence[str] = ("cpu",),
        max_batch: int = 1024,
    ) -> None:
        self.metrics = metrics
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
        """Load and warm `manifest`'s model, then swap it in; False (old one kept) if it fails.

        Called by one thread at a time (the service's loader). The load runs outside the
        swap lock: a rollback meanwhile (an MQTT command, on the client's network thread)
        does not wait for it, and cannot touch the version loading."""
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
        with self._swap_lock:
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
        with self._swap_lock:
            self.versions.begin(manifest.version)
        try:
            return self.load(manifest, model_bytes)
        except ModelLoadError as exc:
            self.fail(manifest, exc.reason, str(exc))
            return None

    def keep_standby(self, manifest: ModelManifest, model_bytes: bytes) -> bool:
        """Load `manifest` as the standby (after a restart) if there is none; False if it
        fails. With nothing served (the current version failed to load), it is served.
        Loaded outside the swap lock, as in `install`."""
        with self._swap_lock:
            if self._needs_no_standby(manifest):
                return True
        served = self._load_or_fail(manifest, model_bytes)
        if served is None:
            return False
        with self._swap_lock:
            if self._serving is None:  # better the previous version than none
                self._swap_in(served)
                log.warning("model %s: serving the previous version %s (the current one"
                            " failed to load)", manifest.name, manifest.version)  # fmt: skip
                return True
            self._standby = served
            self.versions.apply(served.version, VersionEvent.KEPT)
            self._publish_models()
        return True

    def _needs_no_standby(self, manifest: ModelManifest) -> bool:
        serving = self._serving
        return self._standby is not None or (
            serving is not None and serving.version == manifest.version
        )

    def fail(self, manifest: ModelManifest, reason: str, message: str) -> None:
        """Record that `manifest` could not be loaded (logged, counted, kept for /v1/model)."""
        with self._swap_lock:
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
