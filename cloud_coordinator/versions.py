"""Turns a closed round's aggregate into a new model version: the server step, the new
bundle, its holdout score, the registry entry, the round record and the retained manifest.

Every step can be repeated after a crash: a version already registered under the round's id
is reused as it is (it was made from exactly the round's stored updates), and the server
optimiser always steps from the state committed with the previous version.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping

import numpy as np

from cloud_coordinator import bundles, datasets
from cloud_coordinator.blob_server import Publisher
from cloud_coordinator.errors import StoreError
from cloud_coordinator.job_state import ActiveJob, version_id
from cloud_coordinator.job_store import JobStore
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.strategies.server_opt import STEP_KEY, ServerOptimiser
from cloud_coordinator.update_tensors import AggregationError
from cloud_coordinator.variants import choose_serving
from protocols.messages import encode
from protocols.model_format import MODEL_FILE, pack_tensors, unpack_tensors
from protocols.signing import sign_manifest
from protocols.topics import ModelChannel, model_topic

log = logging.getLogger(__name__)

Head = dict[str, np.ndarray]


def _pack_state(state: Mapping[str, np.ndarray]) -> bytes:
    """The optimiser's state as a tensors file (integers, the step count, as float32)."""
    arrays = {k: np.atleast_1d(np.asarray(v, dtype=np.float32)) for k, v in state.items()}
    return pack_tensors(arrays)


def _unpack_state(data: bytes) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = dict(unpack_tensors(data))
    state[STEP_KEY] = np.asarray(state[STEP_KEY], dtype=np.int64).reshape(())
    return state


class VersionMaker:
    """Makes, records and announces new versions."""

    def __init__(
        self,
        store: JobStore,
        models: ModelRegistry,
        publisher: Publisher,
        signing_key: bytes | None = None,
    ) -> None:
        self.store = store
        self.models = models
        self.publisher = publisher
        self.signing_key = signing_key

    def signed(self, bundle: bundles.Bundle) -> bundles.Bundle:
        """`bundle` with its manifest signed by the coordinator's key (as is without one)."""
        if self.signing_key is None:
            return bundle
        return bundles.Bundle(bundle.files, sign_manifest(bundle.manifest, self.signing_key))

    def registered(self, name: str, version: str) -> bundles.Bundle | None:
        """The bundle of a registered version, or None."""
        try:
            manifest = self.models.manifest(name, version)
        except StoreError:
            return None
        return bundles.Bundle(
            {f.name: self.models.blob(f.sha256) for f in manifest.files}, manifest
        )

    def scored(self, bundle: bundles.Bundle, holdout: datasets.Samples) -> tuple[float, float]:
        """``(accuracy, loss)`` of the bundle's fp32 model on the holdout."""
        return bundles.evaluate(bundle.files[MODEL_FILE], holdout.x, holdout.y)

    def finished(
        self, bundle: bundles.Bundle, holdout: datasets.Samples, accuracy: float, int8: bool
    ) -> bundles.Bundle:
        """A new version ready to register: its int8 variant chosen or not, then signed."""
        return self.signed(choose_serving(bundle, holdout.x, holdout.y, accuracy, enabled=int8))

    def publish_manifest(self, bundle: bundles.Bundle) -> None:
        """Announce `bundle` to the fleet (retained)."""
        topic = model_topic(bundle.manifest.name, ModelChannel.MANIFEST)
        self.publisher.publish(topic, encode(bundle.manifest), qos=1, retain=True)

    def server_step(self, active: ActiveJob, delta: Head) -> tuple[Head, bytes | None]:
        """The new head from the aggregated `delta`, and the optimiser state after it;
        AggregationError (``non_finite``) if the head would hold a NaN or Inf."""
        optimiser: ServerOptimiser | None = active.new_optimiser()
        if optimiser is None:
            with np.errstate(over="ignore", invalid="ignore"):  # (checked just below)
                head = {n: (active.head[n] + delta[n]).astype(np.float32) for n in delta}
            _check_finite(head)
            return head, None
        if active.optimiser_state is not None:
            optimiser.load_state(_unpack_state(active.optimiser_state))
        head = optimiser.step(active.head, delta)
        _check_finite(head)
        return head, _pack_state(optimiser.state())

    def make(self, active: ActiveJob) -> dict[str, object]:
        """Aggregate, register, record and announce round `active.round_no`; its metrics.

        Raises AggregationError, StoreError or ValueError; the caller decides to retry."""
        spec = active.spec
        assert active.aggregate is not None
        version = version_id(spec.job_id, active.round_no)
        recorded = self.store.round(spec.job_id, active.round_no)
        registered = self.registered(spec.model, version)
        if recorded is not None and recorded.state == "done" and registered is not None:
            # Recorded before announcing it failed: announce only. Stepping again would
            # apply this round's delta to the server optimiser's state a second time.
            active.bundle, active.head, active.version = (
                registered, registered.head_state(), version,
            )  # fmt: skip
            active.optimiser_state = self.store.optimiser_state(spec.job_id)
            self.publish_manifest(registered)
            return dict(recorded.metrics)
        delta = active.aggregate.result()
        head, optimiser_state = self.server_step(active, delta)
        bundle = registered  # made before a crash, from these updates (or None)
        accuracy = loss = 0.0
        if bundle is None:
            bundle = bundles.next_bundle(active.bundle, head, version, active.version)
            accuracy, loss = self.scored(bundle, active.holdout)
            bundle = self.finished(bundle, active.holdout, accuracy, spec.int8_variant)
        else:
            head = bundle.head_state()
            accuracy, loss = self.scored(bundle, active.holdout)
        total = sum(n for _, n in active.device_val)
        metrics: dict[str, object] = {
            "accuracy": accuracy,
            "loss": loss,
            "participants": len(active.received),
            "selected": len(active.selected),
            "uplink_bytes": active.uplink,
            "dense_bytes": active.dense_bytes * len(active.received),
            "wall_s": time.time() - active.started,
            "device_val_acc_base": (
                sum(a * n for a, n in active.device_val) / total if total else None
            ),
            "serving": str(bundle.manifest.variants.get("chosen", "fp32")),
            "int8_accuracy": bundle.manifest.variants.get("int8_accuracy"),
            "strategy": spec.strategy,
            "mode": spec.mode,
            **active.aggregate.report(),
        }
        if active.is_async:
            metrics["updates"] = active.aggregate.count
            metrics["contributors"] = sorted(active.received)
            metrics["staleness_mean"] = statistics.fmean(active.staleness or [0])
            metrics["staleness_max"] = max(active.staleness or [0])
        numeric = {
            k: float(v) for k, v in metrics.items() if isinstance(v, int | float)
            and not isinstance(v, bool)
        }  # fmt: skip
        if registered is None:
            self.models.put(bundle, job_id=spec.job_id, round=active.round_no,
                            devices=tuple(sorted(active.received)), metrics=numeric)  # fmt: skip
        self.store.finish_round(spec.job_id, active.round_no, version, metrics, optimiser_state)
        active.bundle, active.head, active.version = bundle, head, version
        if optimiser_state is not None:
            active.optimiser_state = optimiser_state
        self.publish_manifest(bundle)
        log.info("job %s %s %d: accuracy %.4f, %d updates, %.0f kB up, %.2fs",
                 spec.job_id, "version" if active.is_async else "round", active.round_no,
                 accuracy, len(active.received) if not active.is_async else
                 active.aggregate.count, active.uplink / 1e3, metrics["wall_s"])  # fmt: skip
        return metrics


def _check_finite(head: Head) -> None:
    """AggregationError unless every parameter of `head` is finite (huge but finite updates
    can still overflow float32 when added): such a version is never registered."""
    for name, values in head.items():
        if not np.isfinite(values).all():
            raise AggregationError(
                f"the new {name!r} would hold NaN or Inf (updates too large): round retried",
                reason="non_finite",
            )
