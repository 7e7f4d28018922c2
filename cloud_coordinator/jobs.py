"""Runs federated training jobs: tasks out, updates in, new model versions out.

One `JobRunner` per coordinator. Its thread drives every running job through the table in
`rounds.py`; the ingest thread hands it updates (`on_update`). A sync job runs rounds:
select devices, send tasks, close at the quorum and deadline, make a version. An async job
(`async_rounds`) keeps devices busy and makes a version from every ``updates_per_version``
updates. Either way each update is checked, written to SQLite, folded into the aggregate of
the job's strategy and only then acknowledged; after a restart the stored updates are folded
in again and the round (or version buffer) carries on where it stopped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from cloud_coordinator import baseline, bundles, datasets, job_views
from cloud_coordinator.aggregation import AggregationError, pick_device
from cloud_coordinator.async_rounds import AsyncDriver
from cloud_coordinator.blob_server import Publisher
from cloud_coordinator.errors import CoordinatorError, StoreError
from cloud_coordinator.job_spec import JobSpec, JobSpecError
from cloud_coordinator.job_state import ActiveJob, check_weight, update_key, version_id
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
from cloud_coordinator.ticker import Ticker
from cloud_coordinator.versions import VersionMaker
from protocols.chunks import DEFAULT_CHUNK_SIZE
from protocols.errors import DecodeError
from protocols.messages import Ack, ModelUpdate, TrainTask, decode_as, encode
from protocols.topics import DeviceChannel, device_topic

log = logging.getLogger(__name__)
TICK_S = 0.02
#: Seconds a round resumed after a restart keeps collecting once the broker is reached.
RESUME_GRACE_S = 10.0

__all__ = ["TICK_S", "JobRunner", "update_key", "version_id"]


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
        signing_key: bytes | None = None,
    ) -> None:
        self.store = store
        self.models = models
        self.publisher = publisher
        self.candidates = candidates
        self.device = pick_device(device)
        self.chunk_size = chunk_size
        self.versions = VersionMaker(store, models, publisher, signing_key)
        self.async_driver = AsyncDriver(store, candidates, self._busy, self._send_task)
        self._active: dict[str, ActiveJob] = {}
        self._lock = threading.RLock()
        self._creating = threading.Lock()  # one job creation at a time
        self._ticker = Ticker("jobs", TICK_S, self.tick)
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
        self._ticker.start()

    def stop(self) -> None:
        """Stop driving rounds (state stays in the store)."""
        self._ticker.stop()

    # --- jobs ----------------------------------------------------------------------------
    def create(self, spec: JobSpec) -> JobRecord:
        """Validate `spec`, publish its initial model version and start it."""
        template = get_template(spec.template)  # ValueError lists the valid names
        with self._creating:  # two requests for one job id: the second is told it exists
            if self.store.job(spec.job_id) is not None:
                raise JobSpecError(f"a job named {spec.job_id!r} already exists")
            version = version_id(spec.job_id, 0)
            backbone = baseline.server_backbone(template, spec.data_seed)
            bundle, _ = bundles.initial_bundle(
                template, spec.model, version, spec.seed, backbone=backbone
            )
            holdout = datasets.server_data(template, spec.data_seed).holdout
            orphan = self.versions.registered(spec.model, version)
            if orphan is not None:  # registered by a create that stopped before its job row
                bundle = self._adopt(spec, bundle, orphan)
            accuracy, loss = self.versions.scored(bundle, holdout)
            if orphan is None:
                bundle = self.versions.finished(bundle, holdout, accuracy, spec.int8_variant)
                metrics = {"accuracy": accuracy, "loss": loss}
                self.models.put(bundle, job_id=spec.job_id, round=0, devices=(), metrics=metrics)
            if not self.store.create_job(spec, version):
                raise JobSpecError(f"a job named {spec.job_id!r} already exists")
            self.versions.publish_manifest(bundle)  # (once the job exists)
        record = self.store.job(spec.job_id)
        assert record is not None
        with self._lock:
            self._active[spec.job_id] = ActiveJob(record, self.models, self.device)
        log.info("job %s started: %s, %s %s, %d versions, initial accuracy %.3f", spec.job_id,
                 spec.template, spec.mode, spec.strategy, spec.rounds, accuracy)  # fmt: skip
        return record

    def _adopt(
        self, spec: JobSpec, fresh: bundles.Bundle, orphan: bundles.Bundle
    ) -> bundles.Bundle:
        """The initial version a create of the same job id registered before it stopped
        (versions are never remade under a name devices may have seen), if it is of the
        same model shape; JobSpecError if it is of another."""
        record = self.models.record(spec.model, orphan.manifest.version)
        same = (fresh.manifest.inputs, fresh.manifest.outputs, fresh.manifest.head_layers) == (
            orphan.manifest.inputs, orphan.manifest.outputs, orphan.manifest.head_layers,
        )  # fmt: skip
        if record.job_id != spec.job_id or not same:
            raise JobSpecError(
                f"{spec.model} {orphan.manifest.version} is registered already, for another"
                f" model than this job's; choose another job_id"
            )
        log.warning("job %s: reusing %s, registered by an earlier request that did not"
                    " finish creating the job", spec.job_id, orphan.manifest.version)  # fmt: skip
        return orphan

    def create_json(self, body: object) -> dict[str, object]:
        """Start a job from a JSON spec and return it; ValueError naming what is wrong."""
        record = self.create(JobSpec.from_json(body))
        job = self.job_json(record.spec.job_id)
        assert job is not None
        return job

    def _resume(self, record: JobRecord) -> None:
        active = ActiveJob(record, self.models, self.device)
        active.optimiser_state = self.store.optimiser_state(record.spec.job_id)
        current = self.store.round(record.spec.job_id, record.current_round)
        if current is not None and current.state == "failed":
            active.round_no, active.state = current.round, RoundState.FAILED  # retried next tick
        elif current is not None and current.state in ("collecting", "aggregating", "selecting"):
            if active.is_async:
                self.async_driver.resume(active, current.round)
            else:
                self._resume_sync(active, current.round)
        elif current is not None and active.is_async:  # stopped between two buffers: the
            # devices tasked in recent ones may still send, and are accepted as before
            self.async_driver.remember_tasked(active, current.round)
        with self._lock:
            self._active[record.spec.job_id] = active

    def connected(self) -> None:
        """The broker connection is up: a round resumed at start gets `RESUME_GRACE_S` from
        now, not from the start (the updates queued for this coordinator arrive now)."""
        with self._lock:
            for active in self._active.values():
                if active.resumed and active.state is RoundState.COLLECTING:
                    record = self.store.round(active.spec.job_id, active.round_no)
                    stored = record.deadline if record is not None else 0.0
                    active.deadline = max(stored, time.time() + RESUME_GRACE_S)
                active.resumed = False

    def _resume_sync(self, active: ActiveJob, round_no: int) -> None:
        current = self.store.round(active.spec.job_id, round_no)
        assert current is not None
        # no deadline until the broker is reached: what devices sent meanwhile waits there
        active.open_collection(round_no, current.started, math.inf)
        active.resumed = True
        active.selected = current.selected
        active.state = RoundState.COLLECTING
        assert active.aggregate is not None
        for stored in self.store.updates(active.spec.job_id, round_no):
            update = decode_as(ModelUpdate, stored.payload, 1 << 30)
            try:
                active.aggregate.add(update.tensors, float(update.num_samples),
                                     source=update.device_id)  # fmt: skip
            except AggregationError as exc:  # stored, then refused before a crash
                self.store.delete_update(active.spec.job_id, round_no, update.device_id)
                log.warning("job %s: dropped a stored update it refuses: %s",
                            active.spec.job_id, exc)  # fmt: skip
                continue
            active.count_update(update, len(stored.payload))
        log.info("job %s: resumed round %d with %d stored updates",
                 active.spec.job_id, round_no, len(active.received))  # fmt: skip
        if self.versions.registered(active.spec.model, version_id(active.spec.job_id, round_no)):
            # Its version was made from these updates before the stop: finish it from them.
            # Reopened, it would take (and acknowledge) updates the version never holds.
            active.state = RoundState.AGGREGATING
            self.store.set_round(active.spec.job_id, round_no, active.state.value)
            return
        for device_id in active.selected:
            if device_id not in active.received:
                # (the round has no deadline until the broker is reached: the task gets one)
                self._send_task(active, device_id, max(current.deadline, time.time() + 5))

    # --- rounds ----------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every running job by one step."""
        with self._lock:
            actives = list(self._active.values())
        for active in actives:
            if active.is_async:
                self._tick_async(active)
            elif active.state in (RoundState.DONE, RoundState.FAILED):
                self._maybe_start_round(active)
            elif active.state is RoundState.COLLECTING:
                self._maybe_close(active)
            elif active.state is RoundState.AGGREGATING:
                self._publish_round(active)  # an earlier attempt stopped half-way; finish it

    def _finished(self, active: ActiveJob) -> bool:
        spec = active.spec
        if active.state is not RoundState.DONE or active.round_no < spec.rounds:
            return False
        self.store.set_job(spec.job_id, state="done", message="all rounds done")
        with self._lock:
            del self._active[spec.job_id]
        log.info("job %s finished: version %s", spec.job_id, active.version)
        return True

    def _tick_async(self, active: ActiveJob) -> None:
        driver = self.async_driver
        with self._lock:  # updates wait while a version is made, rather than being refused
            if active.state is RoundState.COLLECTING and driver.full(active):
                active.state = next_round_state(active.state, RoundEvent.CLOSE)
                self.store.set_round(active.spec.job_id, active.round_no, active.state.value)
            if active.state is RoundState.AGGREGATING:
                self._publish_round(active)
            if self._finished(active):
                return
            if active.state is RoundState.DONE:
                driver.open_buffer(active, active.round_no + 1)
            elif active.state is RoundState.FAILED:
                driver.open_buffer(active, active.round_no, retry=True)
            if active.state is RoundState.COLLECTING and not driver.full(active):
                driver.hand_out_tasks(active)

    def _busy(self) -> set[str]:
        with self._lock:
            busy: set[str] = set()
            for a in self._active.values():
                busy.update(a.outstanding)
                if not a.is_async and a.state is RoundState.COLLECTING:
                    busy.update(d for d in a.selected if d not in a.received)
            return busy

    def _maybe_start_round(self, active: ActiveJob) -> None:
        spec = active.spec
        next_round = active.round_no + 1 if active.state is RoundState.DONE else active.round_no
        if self._finished(active):
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
        now = time.time()
        active.open_collection(next_round, now, now + spec.round_deadline_s)
        active.selected = tuple(chosen)
        active.state = RoundState.SELECTING
        self.store.start_round(spec.job_id, next_round, active.version, chosen, active.deadline)
        # Open for updates before the tasks leave, so even an instant answer finds it open.
        with self._lock:
            active.state = next_round_state(active.state, RoundEvent.TASKS_SENT)
        self.store.set_round(spec.job_id, next_round, active.state.value)
        for device_id in chosen:
            self._send_task(active, device_id, active.deadline)
        self._picked_last[spec.job_id] = tuple(chosen)

    def _send_task(self, active: ActiveJob, device_id: str, deadline: float) -> None:
        spec = active.spec
        task = TrainTask(
            task_id=f"{spec.job_id}.{active.round_no}.{device_id}",
            job_id=spec.job_id,
            round=active.round_no,
            model_name=spec.model,
            base_version=active.version,
            deadline=deadline,
            compression=spec.compression,
            hyperparams=spec.hyperparams(),
        )
        self.publisher.publish(device_topic(device_id, DeviceChannel.TASK), encode(task), qos=1)

    def _maybe_close(self, active: ActiveJob) -> None:
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

    def _publish_round(self, active: ActiveJob) -> None:
        spec = active.spec
        try:
            self.versions.make(active)
        except (AggregationError, StoreError, ValueError, RuntimeError) as exc:
            if self.versions.registered(spec.model, version_id(spec.job_id, active.round_no)):
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
            return
        with self._lock:
            active.state = next_round_state(active.state, RoundEvent.PUBLISHED)

    # --- views ---------------------------------------------------------------------------
    def job_json(self, job_id: str) -> dict[str, object] | None:
        """A job with its rounds, JSON-ready, or None."""
        return job_views.job_json(self.store, job_id)

    def jobs_json(self) -> list[dict[str, object]]:
        """Every job in brief, oldest first."""
        return job_views.jobs_json(self.store)

    # --- inbound (ingest thread) ---------------------------------------------------------
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
            if active.is_async:
                return self.async_driver.accept(active, update, payload)
            return self._accept_sync(active, update, payload)

    def _accept_sync(self, active: ActiveJob, update: ModelUpdate, payload: bytes) -> bool:
        if update.round != active.round_no or active.state is not RoundState.COLLECTING:
            stored = self.store.stored_round(update.job_id, update.device_id,
                                             update.base_version, update.seq)  # fmt: skip
            if stored == update.round:
                return True  # counted before; its acknowledgement was lost: a duplicate
            raise DecodeError(f"round {update.round} is not open", reason="late")
        if update.device_id not in active.selected:
            raise DecodeError("device was not selected this round", reason="not_selected")
        if update.base_version != active.version:
            raise DecodeError(f"based on {update.base_version}, not {active.version}",
                              reason="stale")  # fmt: skip
        if update.num_samples <= 0 and update.device_id not in active.received:
            raise DecodeError("update trained on no samples", reason="bad_field")
        check_weight(active.spec, update)
        # Stored before it is folded, so a failed write never leaves it counted unacknowledged.
        verdict = self.store.add_update(update.job_id, update.round, update.device_id,
                                        update.base_version, update.seq, update.num_samples,
                                        payload)  # fmt: skip
        if verdict == "duplicate":
            return True
        if verdict == "conflict":
            raise DecodeError(
                "a different update for this round was already counted", reason="conflict"
            )
        assert active.aggregate is not None
        try:
            active.aggregate.add(update.tensors, float(update.num_samples),
                                 source=update.device_id)  # fmt: skip
        except AggregationError as exc:
            self.store.delete_update(update.job_id, update.round, update.device_id)
            raise DecodeError(str(exc), reason=exc.reason) from exc
        active.count_update(update, len(payload))
        return False

    def _ack(
        self, update: ModelUpdate, ok: bool, reason: str = "", duplicate: bool = False
    ) -> None:
        ack = Ack(update_key(update), ok, time.time(), reason, duplicate)
        self.publisher.publish(
            device_topic(update.device_id, DeviceChannel.UPDATE_ACK), encode(ack)
        )
