"""Runs federated training jobs: rounds of tasks out, updates in, new model versions out.

One `JobRunner` per coordinator. Its thread drives every running job's current round
through the table in `rounds.py`; the ingest thread hands it updates (`on_update`) and
blob requests (`on_blob_request`). Each update is checked, folded into the round's
streaming aggregate, written to SQLite and only then acknowledged; after a restart the
stored updates are folded in again and the round carries on where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cloud_coordinator import baseline, bundles, datasets, job_views
from cloud_coordinator.aggregation import AggregationError, StreamingFedAvg, pick_device
from cloud_coordinator.blob_server import Publisher, serve_blob_request
from cloud_coordinator.errors import CoordinatorError, StoreError
from cloud_coordinator.job_spec import JobSpec, JobSpecError
from cloud_coordinator.job_store import JobRecord, JobStore
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.rounds import (
    Progress,
    RoundEvent,
    RoundState,
    Verdict,
    next_round_state,
    should_close,
)
from cloud_coordinator.selection import Candidate, select_devices
from cloud_coordinator.templates import get_template
from protocols.chunks import DEFAULT_CHUNK_SIZE
from protocols.errors import DecodeError
from protocols.messages import Ack, ModelUpdate, TrainTask, decode_as, encode
from protocols.model_format import HEAD_FILE, head_shapes, unpack_tensors
from protocols.topics import DeviceChannel, ModelChannel, device_topic, model_topic

log = logging.getLogger(__name__)
TICK_S = 0.02


def update_key(update: ModelUpdate) -> str:
    """The acknowledgement reference of an update (`ModelUpdate.ack_ref`)."""
    return update.ack_ref


def version_id(job_id: str, round_no: int) -> str:
    """The model version a job's round produces (round 0: the initial model)."""
    return f"{job_id}.r{round_no}"


class _Active:
    """A running job's in-memory state."""

    def __init__(self, record: JobRecord, models: ModelRegistry) -> None:
        spec = record.spec
        self.spec = spec
        self.template = get_template(spec.template)
        self.holdout = datasets.server_data(self.template, spec.data_seed).holdout
        manifest = models.manifest(spec.model, record.current_version)  # StoreError if missing
        self.version = record.current_version
        self.bundle = bundles.Bundle(
            {f.name: models.blob(f.sha256) for f in manifest.files}, manifest
        )
        self.head = unpack_tensors(self.bundle.files[HEAD_FILE])
        self.shapes = head_shapes(self.template.head_layers)
        self.dense_bytes = 4 * sum(int(a.size) for a in self.head.values())
        self.round_no = record.current_round
        self.state = RoundState.DONE
        self.selected: tuple[str, ...] = ()
        self.received: set[str] = set()
        self.deadline = 0.0
        self.started = 0.0
        self.uplink = 0
        self.device_val: list[tuple[float, int]] = []
        self.aggregate: StreamingFedAvg | None = None


class JobRunner:
    """Creates jobs and drives their rounds."""

    def __init__(
        self,
        store: JobStore,
        models: ModelRegistry,
        publisher: Publisher,
        candidates: Callable[[], list[Candidate]],
        device: str = "auto",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.store = store
        self.models = models
        self.publisher = publisher
        self.candidates = candidates
        self.device = pick_device(device)
        self.chunk_size = chunk_size
        self._active: dict[str, _Active] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jobs", daemon=True)
        self._picked_last: dict[str, tuple[str, ...]] = {}

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Resume running jobs from the store and start driving rounds."""
        for record in self.store.jobs("running"):
            try:
                self._resume(record)
            except (CoordinatorError, JobSpecError, ValueError) as exc:
                log.error("cannot resume job %s: %s", record.spec.job_id, exc)
                self.store.set_job(record.spec.job_id, state="failed", message=str(exc))
        self._thread.start()

    def stop(self) -> None:
        """Stop driving rounds (state stays in the store)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # supervisor of the job loop: log with traceback, keep going
                log.exception("job loop failed; retrying")

    # --- jobs ----------------------------------------------------------------------------
    def create(self, spec: JobSpec) -> JobRecord:
        """Validate `spec`, publish its initial model version and start it."""
        template = get_template(spec.template)  # ValueError lists the valid names
        if self.store.job(spec.job_id) is not None:
            raise JobSpecError(f"a job named {spec.job_id!r} already exists")
        version = version_id(spec.job_id, 0)
        backbone = baseline.server_backbone(template, spec.data_seed)
        bundle, _ = bundles.initial_bundle(
            template, spec.model, version, spec.seed, backbone=backbone
        )
        holdout = datasets.server_data(template, spec.data_seed).holdout
        accuracy, loss = bundles.evaluate(bundle.files["model.onnx"], holdout.x, holdout.y)
        metrics = {"accuracy": accuracy, "loss": loss}
        self.models.put(bundle, job_id=spec.job_id, round=0, devices=(), metrics=metrics)
        self._publish_manifest(bundle)
        if not self.store.create_job(spec, version):
            raise JobSpecError(f"a job named {spec.job_id!r} already exists")
        record = self.store.job(spec.job_id)
        assert record is not None
        with self._lock:
            self._active[spec.job_id] = _Active(record, self.models)
        log.info("job %s started: %s, %d rounds, initial accuracy %.3f",
                 spec.job_id, spec.template, spec.rounds, accuracy)  # fmt: skip
        return record

    def create_json(self, body: object) -> dict[str, object]:
        """Start a job from a JSON spec and return it; ValueError naming what is wrong."""
        record = self.create(JobSpec.from_json(body))
        job = self.job_json(record.spec.job_id)
        assert job is not None
        return job

    def _resume(self, record: JobRecord) -> None:
        active = _Active(record, self.models)
        current = self.store.round(record.spec.job_id, record.current_round)
        if current is not None and current.state == "failed":
            active.round_no, active.state = current.round, RoundState.FAILED  # retried next tick
        elif current is not None and current.state in ("collecting", "aggregating", "selecting"):
            active.round_no = current.round
            active.selected = current.selected
            active.deadline = max(current.deadline, time.time() + 5.0)
            active.started = current.started
            active.state = RoundState.COLLECTING
            active.aggregate = StreamingFedAvg(active.shapes, self.device)
            for stored in self.store.updates(record.spec.job_id, current.round):
                update = decode_as(ModelUpdate, stored.payload, 1 << 30)
                active.aggregate.add(update.tensors, float(update.num_samples))
                self._count_update(active, update, len(stored.payload))
            log.info("job %s: resumed round %d with %d stored updates",
                     record.spec.job_id, current.round, len(active.received))  # fmt: skip
            self._send_tasks(active, [d for d in active.selected if d not in active.received])
        with self._lock:
            self._active[record.spec.job_id] = active

    def _registered(self, name: str, version: str) -> bundles.Bundle | None:
        try:
            manifest = self.models.manifest(name, version)
        except StoreError:
            return None
        return bundles.Bundle(
            {f.name: self.models.blob(f.sha256) for f in manifest.files}, manifest
        )

    def _publish_manifest(self, bundle: bundles.Bundle) -> None:
        topic = model_topic(bundle.manifest.name, ModelChannel.MANIFEST)
        self.publisher.publish(topic, encode(bundle.manifest), qos=1, retain=True)

    # --- rounds ----------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every running job by one step."""
        with self._lock:
            actives = list(self._active.values())
        for active in actives:
            if active.state in (RoundState.DONE, RoundState.FAILED):
                self._maybe_start_round(active)
            elif active.state is RoundState.COLLECTING:
                self._maybe_close(active)
            elif active.state is RoundState.AGGREGATING:
                self._publish_round(active)  # an earlier attempt stopped half-way; finish it

    def _busy(self) -> set[str]:
        with self._lock:
            return {
                d
                for a in self._active.values()
                if a.state is RoundState.COLLECTING
                for d in a.selected
                if d not in a.received
            }

    def _maybe_start_round(self, active: _Active) -> None:
        spec = active.spec
        next_round = active.round_no + 1 if active.state is RoundState.DONE else active.round_no
        if active.state is RoundState.DONE and active.round_no >= spec.rounds:
            self.store.set_job(spec.job_id, state="done", message="all rounds done")
            with self._lock:
                del self._active[spec.job_id]
            log.info("job %s finished: version %s", spec.job_id, active.version)
            return
        busy = self._busy()
        candidates = [
            Candidate(c.device_id, c.online, c.busy or c.device_id in busy)
            for c in self.candidates()
        ]
        chosen = select_devices(
            candidates, spec.devices_per_round, self._picked_last.get(spec.job_id, ()),
            seed=spec.seed * 100_003 + next_round,
        )  # fmt: skip
        if len(chosen) < spec.effective_quorum:
            return  # wait for enough devices to be online
        active.round_no = next_round
        active.selected = tuple(chosen)
        active.received = set()
        active.uplink = 0
        active.device_val = []
        active.started = time.time()
        active.deadline = active.started + spec.round_deadline_s
        active.aggregate = StreamingFedAvg(active.shapes, self.device)
        active.state = RoundState.SELECTING
        self.store.start_round(spec.job_id, next_round, active.version, chosen, active.deadline)
        # Open for updates before the tasks leave, so even an instant answer finds it open.
        with self._lock:
            active.state = next_round_state(active.state, RoundEvent.TASKS_SENT)
        self.store.set_round(spec.job_id, next_round, active.state.value)
        self._send_tasks(active, chosen)
        self._picked_last[spec.job_id] = tuple(chosen)

    def _send_tasks(self, active: _Active, devices: list[str]) -> None:
        spec = active.spec
        for device_id in devices:
            task = TrainTask(
                task_id=f"{spec.job_id}.{active.round_no}.{device_id}",
                job_id=spec.job_id,
                round=active.round_no,
                model_name=spec.model,
                base_version=active.version,
                deadline=active.deadline,
                compression=spec.compression,
                hyperparams=spec.hyperparams(),
            )
            self.publisher.publish(device_topic(device_id, DeviceChannel.TASK), encode(task), qos=1)

    def _maybe_close(self, active: _Active) -> None:
        with self._lock:
            progress = Progress(
                len(active.selected),
                len(active.received),
                min(active.spec.effective_quorum, len(active.selected)),
                time.time() >= active.deadline,
            )
            verdict = should_close(progress)
            if verdict is Verdict.WAIT:
                return
            active.state = next_round_state(
                active.state, RoundEvent.CLOSE if verdict is Verdict.CLOSE else RoundEvent.FAIL
            )
        if verdict is Verdict.FAIL:
            log.warning("job %s round %d failed: %d of %d updates by the deadline (quorum %d)",
                        active.spec.job_id, active.round_no, progress.received,
                        progress.selected, progress.quorum)  # fmt: skip
            self.store.set_round(active.spec.job_id, active.round_no, "failed", closed=time.time())
            return
        self.store.set_round(active.spec.job_id, active.round_no, active.state.value)
        self._publish_round(active)

    def _publish_round(self, active: _Active) -> None:
        try:
            self._aggregate_and_publish(active)
        except (AggregationError, StoreError, ValueError, RuntimeError) as exc:
            spec = active.spec
            if self._registered(spec.model, version_id(spec.job_id, active.round_no)) is not None:
                # The version exists, made from exactly these updates: finish later, never redo
                # the round with other updates under the same version id.
                log.error("job %s round %d: recording failed, will retry: %s",
                          spec.job_id, active.round_no, exc)  # fmt: skip
                return
            log.error("job %s round %d: aggregation failed, the round will be retried: %s",
                      spec.job_id, active.round_no, exc)  # fmt: skip
            with self._lock:
                active.state = next_round_state(active.state, RoundEvent.FAIL)
            self.store.set_round(spec.job_id, active.round_no, "failed", closed=time.time())

    def _aggregate_and_publish(self, active: _Active) -> None:
        spec = active.spec
        assert active.aggregate is not None
        delta = active.aggregate.result()
        head = {name: (active.head[name] + delta[name]).astype("float32") for name in active.head}
        version = version_id(spec.job_id, active.round_no)
        bundle = self._registered(spec.model, version)  # made before a crash, from these updates
        if bundle is None:
            bundle = bundles.next_bundle(active.bundle, head, version, active.version)
        else:
            head = bundle.head_state()
        accuracy, loss = bundles.evaluate(
            bundle.files["model.onnx"], active.holdout.x, active.holdout.y
        )
        total = sum(n for _, n in active.device_val)
        metrics = {
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
            "aggregation_device": str(self.device),
        }
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if self._registered(spec.model, version) is None:
            self.models.put(bundle, job_id=spec.job_id, round=active.round_no,
                            devices=tuple(sorted(active.received)), metrics=numeric)  # fmt: skip
        self.store.finish_round(spec.job_id, active.round_no, version, metrics)
        with self._lock:
            active.bundle, active.head, active.version = bundle, head, version
            active.state = next_round_state(active.state, RoundEvent.PUBLISHED)
        self._publish_manifest(bundle)
        log.info("job %s round %d: accuracy %.4f, %d updates, %.0f kB up, %.2fs",
                 spec.job_id, active.round_no, accuracy, len(active.received),
                 active.uplink / 1e3, metrics["wall_s"])  # fmt: skip

    # --- views ---------------------------------------------------------------------------
    def job_json(self, job_id: str) -> dict[str, object] | None:
        """A job with its rounds, JSON-ready, or None."""
        return job_views.job_json(self.store, job_id)

    def jobs_json(self) -> list[dict[str, object]]:
        """Every job in brief, oldest first."""
        return job_views.jobs_json(self.store)

    # --- inbound (ingest thread) ---------------------------------------------------------
    def _count_update(self, active: _Active, update: ModelUpdate, size: int) -> None:
        active.received.add(update.device_id)
        active.uplink += size
        val = update.metrics.get("val_acc_before")
        if val is not None:
            active.device_val.append((val, update.num_samples))

    def on_update(self, device_id: str, payload: bytes, max_bytes: int) -> None:
        """Fold in one update and acknowledge it; DecodeError (counted by the caller) if it
        is rejected — the device is told why, so it stops re-sending."""
        update = decode_as(ModelUpdate, payload, max_bytes)
        if update.device_id != device_id:
            raise DecodeError("update names another device", reason="device_mismatch")
        try:
            duplicate = self._accept(update, payload)
        except DecodeError as exc:
            self._ack(update, ok=False, reason=exc.reason)
            raise
        self._ack(update, ok=True, duplicate=duplicate)

    def _accept(self, update: ModelUpdate, payload: bytes) -> bool:
        with self._lock:
            active = self._active.get(update.job_id)
            if active is None:
                raise DecodeError(f"no running job {update.job_id!r}", reason="unknown_job")
            if update.round != active.round_no or active.state is not RoundState.COLLECTING:
                raise DecodeError(f"round {update.round} is not open", reason="late")
            if update.device_id not in active.selected:
                raise DecodeError("device was not selected this round", reason="not_selected")
            if update.base_version != active.version:
                raise DecodeError(
                    f"based on {update.base_version}, not {active.version}", reason="stale"
                )
            if update.device_id in active.received:
                verdict = self.store.add_update(update.job_id, update.round, update.device_id,
                                                update.base_version, update.seq,
                                                update.num_samples, payload)  # fmt: skip
                if verdict == "duplicate":
                    return True
                raise DecodeError(
                    "a different update for this round was already counted", reason="conflict"
                )
            if update.num_samples <= 0:
                raise DecodeError("update trained on no samples", reason="bad_field")
            assert active.aggregate is not None
            try:
                active.aggregate.add(update.tensors, float(update.num_samples))
            except AggregationError as exc:
                raise DecodeError(str(exc), reason=exc.reason) from exc
            self.store.add_update(update.job_id, update.round, update.device_id,
                                  update.base_version, update.seq, update.num_samples,
                                  payload)  # fmt: skip
            self._count_update(active, update, len(payload))
            return False

    def _ack(
        self, update: ModelUpdate, ok: bool, reason: str = "", duplicate: bool = False
    ) -> None:
        ack = Ack(update_key(update), ok, time.time(), reason, duplicate)
        self.publisher.publish(
            device_topic(update.device_id, DeviceChannel.UPDATE_ACK), encode(ack)
        )

    def on_blob_request(self, device_id: str, payload: bytes, max_bytes: int) -> None:
        """Send the requested chunks of a blob to the device that asked."""
        serve_blob_request(
            self.models, self.publisher, self.chunk_size, device_id, payload, max_bytes
        )
