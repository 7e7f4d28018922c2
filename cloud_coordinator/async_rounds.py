"""Asynchronous (FedBuff-style) jobs: devices train whenever they can, and every
``updates_per_version`` updates make a new version.

A job's buffer ``r`` collects updates towards version ``r`` (made from version ``r - 1``).
A device is sent a task from the current version whenever it is free (online, no task
outstanding, nothing in this buffer yet), up to ``devices_per_round`` tasks at a time.
Tasks say ``base = "latest"``: a device that gets to a task late trains from the newest
version of the job it holds (it names it in its update's ``base_version``). An update
trained on version ``k`` while buffer ``r`` collects is ``r - 1 - k`` versions stale: it
is folded in with ``num_samples * (1 + staleness) ** -staleness_exponent``, and refused
as ``stale`` past ``max_staleness``. The buffer's updates are stored before they are
acknowledged, and after a restart they are folded in again with the same weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cloud_coordinator.aggregation import AggregationError, decode_update
from cloud_coordinator.job_state import ActiveJob, check_weight
from cloud_coordinator.job_store import JobStore
from cloud_coordinator.rounds import RoundEvent, RoundState, next_round_state
from cloud_coordinator.selection import Candidate, select_devices
from protocols.errors import DecodeError
from protocols.messages import ModelUpdate, decode_as

log = logging.getLogger(__name__)

SendTask = Callable[[ActiveJob, str, float], None]


def version_round(job_id: str, version: str) -> int | None:
    """`k` for the job's version ``{job_id}.r{k}`` (`version_id`), else None."""
    prefix = f"{job_id}.r"
    digits = version[len(prefix) :] if version.startswith(prefix) else ""
    return int(digits) if digits.isdigit() and digits == str(int(digits)) else None


def staleness_of(active: ActiveJob, update: ModelUpdate, buffer: int | None = None) -> int | None:
    """How many versions behind the version buffer `buffer` (default: the one collecting)
    is made from `update` was trained (None: not a version of this job, or one older than
    its task or newer than the current version)."""
    base = version_round(active.spec.job_id, update.base_version)
    if base is None or not update.round - 1 <= base <= active.round_no - 1:
        return None
    return (active.round_no if buffer is None else buffer) - 1 - base


class AsyncDriver:
    """Drives async jobs: hands out tasks, folds updates, closes buffers."""

    def __init__(
        self,
        store: JobStore,
        candidates: Callable[[], list[Candidate]],
        busy: Callable[[], set[str]],
        send_task: SendTask,
    ) -> None:
        self.store = store
        self.candidates = candidates
        self.busy = busy
        self.send_task = send_task

    def open_buffer(self, active: ActiveJob, round_no: int, retry: bool = False) -> None:
        """Start collecting version `round_no`, with the updates stored ahead for it while
        the previous buffer was full (a retried buffer starts empty again)."""
        now = time.time()
        active.open_collection(round_no, now, 0.0)
        active.state = RoundState.SELECTING
        self.store.start_round(active.spec.job_id, round_no, active.version, [], 0.0,
                               keep_updates=not retry)  # fmt: skip
        active.tasked.setdefault(round_no, set())
        for old in [k for k in active.tasked if k < round_no - active.spec.max_staleness]:
            del active.tasked[old]
        active.state = next_round_state(active.state, RoundEvent.TASKS_SENT)
        self.store.set_round(active.spec.job_id, round_no, active.state.value)
        self._replay(active, round_no)

    def full(self, active: ActiveJob) -> bool:
        """True once the buffer holds enough updates for a new version."""
        assert active.aggregate is not None
        return active.aggregate.count >= active.spec.updates_per_version

    def hand_out_tasks(self, active: ActiveJob) -> None:
        """Send a task from the current version to free devices, up to the concurrency."""
        spec = active.spec
        now = time.time()
        for device_id, (_, deadline) in list(active.outstanding.items()):
            if now >= deadline:  # gave up on it; its update still counts if it comes
                del active.outstanding[device_id]
        slots = spec.devices_per_round - len(active.outstanding)
        if slots <= 0:
            return
        busy = self.busy()
        taken = set(active.outstanding) | active.received | active.parked
        free = [
            Candidate(c.device_id, c.online, c.busy or c.device_id in busy or c.device_id in taken)
            for c in self.candidates()
        ]
        chosen = select_devices(free, slots, (), seed=spec.seed * 100_003 + active.round_no)
        if not chosen:
            return
        deadline = now + spec.round_deadline_s
        tasked = active.tasked.setdefault(active.round_no, set())
        for device_id in chosen:
            active.outstanding[device_id] = (active.round_no, deadline)
            tasked.add(device_id)
            self.send_task(active, device_id, deadline)
        active.selected = tuple(sorted(tasked))
        self.store.set_round_selected(spec.job_id, active.round_no, sorted(tasked))

    def accept(self, active: ActiveJob, update: ModelUpdate, payload: bytes) -> bool:
        """Store and fold one update into the buffer (True: a duplicate, already counted);
        DecodeError with the reason it is refused."""
        spec = active.spec
        if self.store.stored_round(spec.job_id, update.device_id, update.base_version,
                                   update.seq) is not None:  # fmt: skip
            return True
        if active.state is not RoundState.COLLECTING:
            raise DecodeError("the job is between versions", reason="late")
        ahead = self.full(active)  # this buffer is closing: store it for the next one
        target = active.round_no + 1 if ahead else active.round_no
        staleness = staleness_of(active, update, target)
        if staleness is None:
            raise DecodeError(
                f"base {update.base_version} is not a version of this job between its task"
                f" (round {update.round}) and now", reason="bad_field",
            )  # fmt: skip
        if staleness > spec.max_staleness:
            raise DecodeError(
                f"based on {update.base_version}, {staleness} versions old"
                f" (max_staleness {spec.max_staleness})", reason="stale",
            )  # fmt: skip
        if update.device_id not in active.tasked.get(update.round, ()):
            raise DecodeError("device was not sent that task", reason="not_selected")
        if update.num_samples <= 0:
            raise DecodeError("update trained on no samples", reason="bad_field")
        check_weight(spec, update)
        verdict = self.store.add_update(spec.job_id, target, update.device_id,
                                        update.base_version, update.seq, update.num_samples,
                                        payload)  # fmt: skip
        if verdict != "new":
            raise DecodeError("this device already has an update in this version",
                              reason="conflict")  # fmt: skip
        if ahead:
            self._park(active, update, target)
        else:
            self._fold(active, update, len(payload), staleness)
        return False

    def _park(self, active: ActiveJob, update: ModelUpdate, target: int) -> None:
        """Check an update stored for the next buffer as folding would, without folding."""
        try:
            decode_update(update.tensors, active.shapes, active.device)
        except AggregationError as exc:
            self.store.delete_update(active.spec.job_id, target, update.device_id)
            raise DecodeError(str(exc), reason=exc.reason) from exc
        active.parked.add(update.device_id)
        active.outstanding.pop(update.device_id, None)

    def _fold(self, active: ActiveJob, update: ModelUpdate, size: int, staleness: int) -> None:
        assert active.aggregate is not None
        weight = update.num_samples * active.spec.staleness_weight(staleness)
        try:
            active.aggregate.add(update.tensors, weight, source=update.device_id)
        except AggregationError as exc:
            self.store.delete_update(active.spec.job_id, active.round_no, update.device_id)
            raise DecodeError(str(exc), reason=exc.reason) from exc
        active.count_update(update, size, staleness)

    def resume(self, active: ActiveJob, round_no: int) -> None:
        """Carry on collecting buffer `round_no` after a restart, from its stored updates."""
        spec = active.spec
        record = self.store.round(spec.job_id, round_no)
        assert record is not None
        active.open_collection(round_no, record.started, 0.0)
        active.state = RoundState.COLLECTING
        self.remember_tasked(active, round_no)
        active.selected = tuple(sorted(active.tasked[round_no]))
        self._replay(active, round_no)
        log.info("job %s: resumed version buffer %d with %d stored updates",
                 spec.job_id, round_no, len(active.received))  # fmt: skip

    def remember_tasked(self, active: ActiveJob, round_no: int) -> None:
        """After a restart: which devices buffers up to `round_no` tasked (from the store),
        as far back as an update may still be accepted (`max_staleness`)."""
        spec = active.spec
        for k in range(max(1, round_no - spec.max_staleness), round_no + 1):
            earlier = self.store.round(spec.job_id, k)
            active.tasked[k] = set(earlier.selected) if earlier is not None else set()

    def _replay(self, active: ActiveJob, round_no: int) -> None:
        """Fold the updates stored for buffer `round_no` (after a restart, or stored ahead)."""
        for stored in self.store.updates(active.spec.job_id, round_no):
            update = decode_as(ModelUpdate, stored.payload, 1 << 30)
            staleness = staleness_of(active, update)
            try:
                if staleness is None:  # cannot happen: it was checked when it was stored
                    raise DecodeError("not a version of this job", reason="bad_field")
                self._fold(active, update, len(stored.payload), staleness)
            except DecodeError as exc:  # refused now (cannot happen but after a crash)
                log.warning("job %s: dropped a stored update it refuses: %s",
                            active.spec.job_id, exc)  # fmt: skip
