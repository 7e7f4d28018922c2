"""The job runner across stops at awkward moments, and updates too large to add: a stop
between two async buffers, a create stopped before its job row, two creates of one id,
and a version whose head would overflow to Inf (real runner, store and registry)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from cloud_coordinator import jobs
from cloud_coordinator.job_spec import JobSpec, JobSpecError
from cloud_coordinator.job_store import JobStore
from cloud_coordinator.jobs import JobRunner
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.rounds import RoundState
from cloud_coordinator.selection import Candidate
from cloud_coordinator.update_tensors import AggregationError
from protocols.messages import ModelUpdate, encode
from protocols.tensors import encode_dense
from tests.unit.fl.test_async_jobs import JOB as ASYNC_JOB
from tests.unit.fl.test_async_jobs import Fleet, fleet, seed_root
from tests.unit.fl.test_job_runner import (
    JOB,
    V0,
    FakePublisher,
    World,
    collecting,
    deltas,
    make_update,
    seed,
    world,
)

__all__ = ["collecting", "fleet", "seed", "seed_root", "world"]  # (the fixtures)


class _Stop(BaseException):
    """A process killed at this point."""


def test_a_stop_between_two_async_buffers_keeps_the_tasked_devices(fleet: Fleet) -> None:
    fleet.runner.tick()
    a, b, c = sorted(fleet.publisher.tasks())
    fleet.send(a, 1, deltas(1))
    fleet.send(b, 1, deltas(2))  # buffer 1 full: finished at the next tick

    def stopped(*args: object, **kwargs: object) -> None:
        raise _Stop

    fleet.runner.async_driver.open_buffer = stopped  # type: ignore[method-assign]
    with pytest.raises(_Stop):
        fleet.runner.tick()  # buffer 1 saved as done; buffer 2 never opened
    record = fleet.store.round(ASYNC_JOB.job_id, 1)
    assert record is not None
    assert record.state == "done"
    fleet.close()
    fleet.open()  # the restart
    fleet.runner.tick()
    fleet.send(c, 1, deltas(3))  # tasked in buffer 1, trained on v0: one version stale
    assert fleet.last_ack(c) == (True, False, "")


def _spec(job_id: str) -> JobSpec:
    return JobSpec(job_id=job_id, template="digits_mlp", model_name=f"{job_id}-digits",
                   rounds=2, devices_per_round=2, seed=1)  # fmt: skip


def _runner(root: Path) -> tuple[JobRunner, JobStore, ModelRegistry, FakePublisher]:
    store, models, publisher = (
        JobStore(root / "jobs.db"),
        ModelRegistry(root / "models"),
        FakePublisher(),
    )
    return JobRunner(store, models, publisher, list, device="cpu"), store, models, publisher


def _stopped_create(root: Path, job_id: str) -> None:
    """A create of `job_id` killed just before its job row was written."""
    runner, store, models, publisher = _runner(root)

    def stopped(*args: object, **kwargs: object) -> bool:
        raise _Stop

    store.create_job = stopped  # type: ignore[method-assign]
    try:
        with pytest.raises(_Stop):
            runner.create(_spec(job_id))
        assert publisher.sent == []  # nothing announced for a job that does not exist
    finally:
        store.close()
        models.close()


@pytest.mark.parametrize(
    ("template", "outcome"), [("digits_mlp", "created"), ("digits_cnn", "choose another job_id")]
)
def test_a_create_stopped_before_its_job_row_can_be_made_again(
    tmp_path: Path, template: str, outcome: str
) -> None:
    _stopped_create(tmp_path, "j1")
    runner, store, models, publisher = _runner(tmp_path)  # the restart, and the retry
    try:
        registered = models.manifest("j1-digits", "j1.r0")
        spec = dataclasses.replace(_spec("j1"), template=template)
        if outcome != "created":  # another model shape under the same name: not adopted
            with pytest.raises(JobSpecError, match=outcome):
                runner.create(spec)
            return
        record = runner.create(spec)
        assert record.current_version == "j1.r0"
        assert models.manifest("j1-digits", "j1.r0") == registered  # reused, not remade
        assert [p.topic for p in publisher.sent] == ["fedge/v1/model/j1-digits/manifest"]
        with pytest.raises(JobSpecError, match="already exists"):
            runner.create(spec)
    finally:
        store.close()
        models.close()


def test_two_creates_of_one_job_id_make_one_job_and_one_clear_refusal(tmp_path: Path) -> None:
    runner, store, models, _ = _runner(tmp_path)
    outcomes: list[str] = []

    def create() -> None:
        try:
            runner.create(_spec("j3"))
            outcomes.append("created")
        except JobSpecError as exc:
            outcomes.append(f"refused: {exc}")

    threads = [threading.Thread(target=create) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(outcomes) == ["created", "refused: a job named 'j3' already exists"]
    finally:
        store.close()
        models.close()


def test_a_head_that_would_overflow_is_refused_before_it_is_registered(
    collecting: World,
) -> None:
    """Finite updates can still add up past float32's range (a device sending 3e38 in two
    rounds): the new head would hold Inf. `make` steps the head before it registers or
    announces anything, so the round fails (and is retried) instead."""
    active = collecting.runner._active[JOB.job_id]
    big = {name: np.full_like(value, 3.0e38) for name, value in active.head.items()}
    active.head = {name: value.copy() for name, value in big.items()}
    with pytest.raises(AggregationError, match="would hold NaN or Inf") as refused:
        collecting.runner.versions.server_step(active, big)
    assert refused.value.reason == "non_finite"
    small = {name: np.zeros_like(value) for name, value in big.items()}
    head, _ = collecting.runner.versions.server_step(active, small)  # finite: fine
    assert all(np.isfinite(v).all() for v in head.values())
    assert [v.version for v in collecting.models.versions(JOB.model)] == [V0]


def test_a_resumed_round_keeps_collecting_for_a_while_once_the_broker_is_reached(
    collecting: World,
) -> None:
    """The updates sent while the coordinator was down wait at the broker; they arrive
    when it connects, which may be a while after it started."""
    w = collecting
    w.send(make_update(w.selected()[0]))  # stored before the stop
    record = w.store.round(JOB.job_id, 1)
    assert record is not None
    w.clock.now = record.deadline + 60  # down for a minute past the round's deadline
    w.restart()
    active = w.runner._active[JOB.job_id]
    w.clock.now += 30  # the broker took 30 s to reach
    w.runner.tick()  # ticks meanwhile: the round must not close (no deadline yet)
    assert active.state is RoundState.COLLECTING
    assert active.received  # the updates stored before the restart still count
    w.runner.connected()
    assert active.deadline >= w.clock.now + jobs.RESUME_GRACE_S
    w.runner.connected()  # a later reconnect: no more grace
    w.clock.now += 1
    assert active.deadline < w.clock.now + jobs.RESUME_GRACE_S


class _AnnouncesFailOnce(FakePublisher):
    """The broker refuses the first retained manifest after `fail` is set."""

    fail = False

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        if self.fail and retain and topic.endswith("/manifest"):
            self.fail = False
            raise RuntimeError("broker hiccup")
        return super().publish(topic, payload, qos, retain)


def test_a_round_announced_again_does_not_step_the_server_optimiser_twice(
    tmp_path: Path,
) -> None:
    spec = JobSpec(job_id="adam-job", model_name="adam-digits", rounds=3, devices_per_round=3,
                   strategy="fedadam", strategy_params={"server_lr": 0.05}, seed=1)  # fmt: skip
    store, models, publisher = (
        JobStore(tmp_path / "jobs.db"), ModelRegistry(tmp_path / "models"), _AnnouncesFailOnce(),
    )  # fmt: skip
    online = [Candidate(d, online=True) for d in ("dev-a", "dev-b", "dev-c")]
    runner = JobRunner(store, models, publisher, lambda: online, device="cpu")
    try:
        runner.create(spec)
        runner.tick()
        for i, device in enumerate(("dev-a", "dev-b", "dev-c")):
            tensors = tuple(encode_dense(k, v) for k, v in deltas(i, 0.05).items())
            update = ModelUpdate(device, spec.job_id, 1, "adam-job.r0", 1, 10, tensors)
            runner.on_update(device, encode(update), 1 << 24)
        publisher.fail = True
        runner.tick()  # recorded, then the announcement fails
        state = store.optimiser_state(spec.job_id)
        assert state is not None
        runner.tick()  # announced again
        assert store.optimiser_state(spec.job_id) == state  # not stepped a second time
        assert sum(p.topic.endswith("/manifest") for p in publisher.sent) == 2  # r0, r1
    finally:
        store.close()
        models.close()
