"""The job runner as a component: a fake publisher and candidate list around a real job store
and model registry, driven tick by tick with a fake clock.

Creating a job exports ONNX (seconds), so one job is created per module (`seed`); each test
gets its own copy of that coordinator state and a fresh runner resumed from it (`world`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from cloud_coordinator import async_rounds, checked_sums, jobs, versions
from cloud_coordinator.blob_server import BlobServer
from cloud_coordinator.errors import StoreError
from cloud_coordinator.job_spec import JobSpec, JobSpecError
from cloud_coordinator.job_store import JobStore
from cloud_coordinator.jobs import JobRunner, update_key, version_id
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.selection import Candidate
from cloud_coordinator.templates import get_template
from protocols.chunks import PIECE_SIZE, Reassembly, piece_digests
from protocols.errors import DecodeError
from protocols.messages import (
    Ack,
    BlobChunk,
    BlobRequest,
    ModelManifest,
    ModelUpdate,
    TrainTask,
    decode_as,
    encode,
)
from protocols.model_format import HEAD_FILE, head_shapes, unpack_tensors
from protocols.tensors import encode_dense

Head = dict[str, npt.NDArray[np.float32]]

JOB = JobSpec(
    job_id="fl-job",
    template="digits_mlp",
    model_name="fl-digits",
    rounds=2,
    devices_per_round=3,
    quorum=2,
    round_deadline_s=30.0,
    seed=5,
)
MODEL_TOPIC = "fedge/v1/model/fl-digits/manifest"
SHAPES = head_shapes(get_template(JOB.template).head_layers)
MAX_BYTES = 1 << 24
ELIGIBLE = ("dev-a", "dev-b", "dev-c", "dev-d")
CANDIDATES = [
    *(Candidate(d, online=True) for d in ELIGIBLE),
    Candidate("dev-off", online=False),
    Candidate("dev-busy", online=True, busy=True),
]
V0, V1, V2 = (version_id(JOB.job_id, n) for n in range(3))


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class FakePublisher:
    """Implements `jobs.Publisher`: keeps every message it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[Published] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        self.sent.append(Published(topic, bytes(payload), qos, retain))
        return None

    def on(self, topic: str) -> list[Published]:
        return [p for p in self.sent if p.topic == topic]

    def tasks(self) -> dict[str, TrainTask]:
        """The latest task sent to each device."""
        out = {}
        for p in self.sent:
            parts = p.topic.split("/")
            if parts[:3] == ["fedge", "v1", "dev"] and parts[4:] == ["task"]:
                out[parts[3]] = decode_as(TrainTask, p.payload)
        return out

    def acks(self, device_id: str) -> list[Ack]:
        return [decode_as(Ack, p.payload) for p in self.on(f"fedge/v1/dev/{device_id}/update/ack")]

    def manifests(self) -> list[ModelManifest]:
        return [decode_as(ModelManifest, p.payload) for p in self.on(MODEL_TOPIC)]


class Clock:
    """Stands in for the `time` module inside `cloud_coordinator.jobs`."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


@dataclass
class Seed:
    root: Path
    sent: list[Published]


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    """A coordinator state directory holding one freshly created job (created once)."""
    root = tmp_path_factory.mktemp("fl-seed")
    store, models = JobStore(root / "jobs.db"), ModelRegistry(root / "models")
    publisher = FakePublisher()
    runner = JobRunner(store, models, publisher, list, device="cpu")
    runner.create(JOB)
    with pytest.raises(JobSpecError, match="already exists"):
        runner.create(JOB)
    store.close()
    models.close()
    return Seed(root, publisher.sent)


@dataclass
class World:
    """A runner over a private copy of the seed state; `restart` simulates a process restart."""

    root: Path
    clock: Clock
    candidates: list[Candidate] = field(default_factory=list)
    publisher: FakePublisher = field(default_factory=FakePublisher)
    accepted: list[tuple[Head, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._open()

    def _open(self) -> None:
        self.store = JobStore(self.root / "jobs.db")
        self.models = ModelRegistry(self.root / "models")
        self.runner = JobRunner(
            self.store, self.models, self.publisher, self._candidates, device="cpu", chunk_size=4096
        )
        # start() resumes the job from the store; its thread is stopped again at once so the
        # test drives every tick itself (no candidates yet: a stray tick would do nothing).
        held, self.candidates = self.candidates, []
        self.runner.start()
        self.runner.stop()
        self.candidates = held

    def _candidates(self) -> list[Candidate]:
        return list(self.candidates)

    def close(self) -> None:
        self.runner.stop()
        self.store.close()
        self.models.close()

    def restart(self) -> None:
        self.close()
        self.publisher = FakePublisher()
        self._open()

    def selected(self, round_no: int = 1) -> tuple[str, ...]:
        record = self.store.round(JOB.job_id, round_no)
        assert record is not None
        return record.selected

    def head(self, version: str) -> Head:
        files = self.models.files(JOB.model, version)
        return {k: np.asarray(v) for k, v in unpack_tensors(files[HEAD_FILE]).items()}

    def send(self, update: ModelUpdate) -> None:
        self.runner.on_update(update.device_id, encode(update), MAX_BYTES)


@pytest.fixture
def world(seed: Seed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    root = tmp_path / "coordinator"
    shutil.copytree(seed.root, root)
    clock = Clock()
    for module in (jobs, async_rounds, versions):
        monkeypatch.setattr(module, "time", clock)
    w = World(root, clock, candidates=list(CANDIDATES))
    yield w
    w.close()


@pytest.fixture
def collecting(world: World) -> World:
    """Round 1 started: tasks out, waiting for updates."""
    world.runner.tick()
    assert len(world.selected()) == 3
    return world


def deltas(seed: int, scale: float = 0.01) -> Head:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0.0, scale, s).astype(np.float32) for n, s in SHAPES.items()}


def make_update(
    device: str,
    delta: Head | None = None,
    *,
    num_samples: int = 10,
    round_no: int = 1,
    base: str = V0,
    seq: int = 1,
    job_id: str = JOB.job_id,
) -> ModelUpdate:
    delta = deltas(sum(device.encode())) if delta is None else delta
    tensors = tuple(encode_dense(name, array) for name, array in delta.items())
    return ModelUpdate(device, job_id, round_no, base, seq, num_samples, tensors)


def send_good(world: World, device: str, seed: int, num_samples: int, **kw: object) -> None:
    delta = deltas(seed)
    world.send(make_update(device, delta, num_samples=num_samples, **kw))  # type: ignore[arg-type]
    world.accepted.append((delta, num_samples))


def expected_head(
    base: Head, accepted: list[tuple[Head, int]]
) -> dict[str, npt.NDArray[np.float64]]:
    total = sum(n for _, n in accepted)
    return {
        name: base[name].astype(np.float64)
        + sum(n * d[name].astype(np.float64) for d, n in accepted) / total
        for name in base
    }


def assert_head(actual: Head, expected: dict[str, npt.NDArray[np.float64]]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == np.float32
        assert np.all(np.isfinite(actual[name]))
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6)


# --- creation and tasks ------------------------------------------------------------------


def test_create_publishes_the_initial_version_retained(seed: Seed, world: World) -> None:
    (published,) = seed.sent
    assert (published.topic, published.qos, published.retain) == (MODEL_TOPIC, 1, True)
    manifest = decode_as(ModelManifest, published.payload)
    assert (manifest.name, manifest.version, manifest.parent_version) == ("fl-digits", V0, None)
    record = world.models.record(JOB.model, V0)
    assert record.manifest == manifest
    assert (record.job_id, record.round, record.devices) == (JOB.job_id, 0, ())
    assert 0.0 <= float(record.metrics["accuracy"] or 0) <= 1.0
    job = world.store.job(JOB.job_id)
    assert job is not None
    assert (job.spec, job.state, job.current_round, job.current_version) == (JOB, "running", 0, V0)
    assert world.publisher.sent == []  # resuming a job between rounds sends nothing


def test_tick_sends_one_task_to_each_selected_device(world: World) -> None:
    world.runner.tick()
    selected = world.selected()
    assert len(selected) == 3
    assert set(selected) <= set(ELIGIBLE)  # never the offline or the busy one
    tasks = world.publisher.tasks()
    assert sorted(tasks) == sorted(selected)
    for device, task in tasks.items():
        (sent,) = world.publisher.on(f"fedge/v1/dev/{device}/task")
        assert (sent.qos, sent.retain) == (1, False)
        assert task.task_id == f"fl-job.1.{device}"
        assert (task.job_id, task.round, task.model_name, task.base_version) == (
            "fl-job", 1, "fl-digits", V0,
        )  # fmt: skip
        assert task.deadline == pytest.approx(world.clock.now + JOB.round_deadline_s)
        assert task.compression == JOB.compression
        assert task.hyperparams == JOB.hyperparams()
    record = world.store.round(JOB.job_id, 1)
    assert record is not None
    assert (record.state, record.base_version) == ("collecting", V0)
    count = len(world.publisher.sent)
    world.runner.tick()  # waiting for updates: nothing more goes out
    assert len(world.publisher.sent) == count


def test_no_round_starts_without_enough_devices(world: World) -> None:
    world.candidates = [Candidate("dev-a", online=True), Candidate("dev-b", online=False)]
    world.runner.tick()  # one eligible device, quorum 2: wait
    assert world.publisher.sent == []
    assert world.store.round(JOB.job_id, 1) is None
    world.candidates.append(Candidate("dev-c", online=True))
    world.runner.tick()
    assert world.selected() == ("dev-a", "dev-c")


def test_create_json_refuses_bad_specs_before_doing_any_work(world: World) -> None:
    for body, match in [
        ({"job_id": "j2", "template": "no_such"}, "digits_mlp"),  # lists the valid templates
        ({"job_id": "j2", "rounds": "3"}, "'rounds'"),
        ({"job_id": JOB.job_id}, "already exists"),
        ([], "JSON object"),
    ]:
        with pytest.raises(ValueError, match=match):
            world.runner.create_json(body)
    assert [j["job_id"] for j in world.runner.jobs_json()] == [JOB.job_id]
    assert world.publisher.sent == []


def test_a_job_whose_version_is_gone_fails_on_resume_with_a_message(world: World) -> None:
    world.store.set_job(JOB.job_id, current_version="fl-job.r9")
    world.restart()
    job = world.store.job(JOB.job_id)
    assert job is not None
    assert job.state == "failed"
    assert "fl-job.r9" in job.message
    world.runner.tick()
    assert world.publisher.sent == []


# --- updates in, a version out -----------------------------------------------------------


def test_all_updates_in_publishes_the_weighted_mean(collecting: World) -> None:
    w = collecting
    for n, device in enumerate(w.selected()):
        send_good(w, device, seed=n, num_samples=[5, 20, 75][n])
        (ack,) = w.publisher.acks(device)
        assert (ack.ok, ack.duplicate, ack.reason) == (True, False, "")
        assert ack.ref == f"fl-job/1/{V0}/1"
    assert w.publisher.manifests() == []  # nothing until the round is closed by a tick
    w.runner.tick()
    (manifest,) = w.publisher.manifests()
    (published,) = w.publisher.on(MODEL_TOPIC)
    assert (published.qos, published.retain) == (1, True)
    assert (manifest.version, manifest.parent_version) == (V1, V0)
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))
    record = w.models.record(JOB.model, V1)
    assert (record.job_id, record.round, record.devices) == (JOB.job_id, 1, w.selected())
    assert record.metrics["participants"] == 3.0
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert (rnd.state, rnd.new_version, rnd.metrics["participants"]) == ("done", V1, 3)
    job = w.store.job(JOB.job_id)
    assert job is not None
    assert job.current_version == V1


def test_job_views_report_rounds_and_device_metrics(collecting: World) -> None:
    w = collecting
    uplink = 0
    for n, device in enumerate(w.selected()):
        update = make_update(device, deltas(n), num_samples=[10, 30, 60][n])
        update = dataclasses.replace(update, metrics={"val_acc_before": [0.5, 0.7, 0.1][n]})
        payload = encode(update)
        w.runner.on_update(device, payload, MAX_BYTES)
        uplink += len(payload)
    w.runner.tick()
    view = w.runner.job_json(JOB.job_id)
    assert view is not None
    assert (view["state"], view["current_round"], view["current_version"]) == ("running", 1, V1)
    assert view["spec"] == JOB.to_json()
    (rnd,) = cast(list[dict[str, Any]], view["rounds"])
    assert (rnd["round"], rnd["state"], rnd["base_version"], rnd["new_version"]) == (
        1, "done", V0, V1,
    )  # fmt: skip
    assert rnd["selected"] == list(w.selected())
    metrics = rnd["metrics"]
    assert metrics["participants"] == 3
    assert metrics["device_val_acc_base"] == pytest.approx((5 + 21 + 6) / 100)
    assert metrics["uplink_bytes"] == uplink
    assert metrics["dense_bytes"] == 3 * 4 * sum(math.prod(s) for s in SHAPES.values())
    assert w.runner.job_json("nope") is None
    (brief,) = w.runner.jobs_json()
    assert brief == {
        "job_id": JOB.job_id, "state": "running", "template": JOB.template, "current_round": 1,
        "rounds": JOB.rounds, "current_version": V1, "message": "",
    }  # fmt: skip


def test_a_resent_update_is_acked_as_duplicate_and_counted_once(collecting: World) -> None:
    w = collecting
    first, second, third = w.selected()
    send_good(w, first, seed=1, num_samples=10)
    w.send(make_update(first, deltas(1), num_samples=10))  # the same update again
    acks = w.publisher.acks(first)
    assert [(a.ok, a.duplicate) for a in acks] == [(True, False), (True, True)]
    assert acks[0].ref == acks[1].ref
    assert len(w.store.updates(JOB.job_id, 1)) == 1
    send_good(w, second, seed=2, num_samples=30)
    send_good(w, third, seed=3, num_samples=60)
    w.runner.tick()
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))


def test_quorum_closes_the_round_at_the_deadline(collecting: World) -> None:
    w = collecting
    a, b, _ = w.selected()
    send_good(w, a, seed=1, num_samples=10)
    send_good(w, b, seed=2, num_samples=30)
    w.runner.tick()
    assert w.publisher.manifests() == []  # the third may still answer
    w.clock.now += JOB.round_deadline_s + 0.1
    w.runner.tick()
    (manifest,) = w.publisher.manifests()
    assert manifest.version == V1
    assert w.models.record(JOB.model, V1).devices == (a, b)
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))


def test_short_of_quorum_at_the_deadline_the_round_fails_and_is_retried(collecting: World) -> None:
    w = collecting
    first = w.selected()[0]
    send_good(w, first, seed=1, num_samples=10)
    w.clock.now += JOB.round_deadline_s + 0.1
    w.runner.tick()
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert rnd.state == "failed"
    assert w.publisher.manifests() == []
    late = make_update(w.selected()[1], deltas(2))
    with pytest.raises(DecodeError) as info:
        w.send(late)
    assert info.value.reason == "late"
    w.publisher.sent.clear()
    w.runner.tick()  # a new attempt of the same round, from the same base version
    retry = w.store.round(JOB.job_id, 1)
    assert retry is not None
    assert retry.state == "collecting"
    assert w.store.updates(JOB.job_id, 1) == []
    tasks = w.publisher.tasks()
    assert sorted(tasks) == sorted(retry.selected)
    assert {(t.round, t.base_version) for t in tasks.values()} == {(1, V0)}


def test_the_job_runs_all_its_rounds_and_finishes(collecting: World) -> None:
    w = collecting
    picked_first = set(w.selected(1))
    for n, device in enumerate(w.selected(1)):
        send_good(w, device, seed=n, num_samples=10)
    w.runner.tick()  # round 1 published
    w.runner.tick()  # round 2 started, based on round 1's version
    picked_second = set(w.selected(2))
    assert set(ELIGIBLE) - picked_first <= picked_second  # the one left out is picked now
    tasks = w.publisher.tasks()
    assert {tasks[d].base_version for d in picked_second} == {V1}
    with pytest.raises(DecodeError) as info:  # a new update for the closed round 1
        w.send(make_update(sorted(picked_second)[0], round_no=1, seq=2))
    assert info.value.reason == "late"
    w.accepted.clear()
    for n, device in enumerate(w.selected(2)):
        send_good(w, device, seed=10 + n, num_samples=5 + n, round_no=2, base=V1)
    w.runner.tick()
    assert [m.version for m in w.publisher.manifests()] == [V1, V2]
    assert_head(w.head(V2), expected_head(w.head(V1), w.accepted))
    w.runner.tick()
    job = w.store.job(JOB.job_id)
    assert job is not None
    assert (job.state, job.current_version, job.current_round) == ("done", V2, 2)
    with pytest.raises(DecodeError) as info:
        w.send(make_update(sorted(picked_second)[0], round_no=2, base=V1))
    assert info.value.reason == "unknown_job"


# --- rejections ----------------------------------------------------------------------------


def _bad_shape(w: World) -> ModelUpdate:
    delta = deltas(7)
    delta["0.weight"] = np.zeros(SHAPES["0.weight"][::-1], np.float32)  # transposed
    return make_update(w.selected()[0], delta)


def _non_finite(w: World) -> ModelUpdate:
    delta = deltas(7)
    delta["2.bias"][3] = np.nan
    delta["4.weight"][0, 0] = np.inf
    return make_update(w.selected()[0], delta, num_samples=1000)


def _conflict(w: World) -> ModelUpdate:
    send_good(w, w.selected()[0], seed=0, num_samples=10)
    return make_update(w.selected()[0], deltas(99), seq=2, num_samples=10)


def _unselected(w: World) -> str:
    (device,) = set(ELIGIBLE) - set(w.selected())
    return device


REJECTIONS: dict[str, Callable[[World], ModelUpdate]] = {
    "late": lambda w: make_update(w.selected()[0], round_no=2),
    "late-earlier": lambda w: make_update(w.selected()[0], round_no=0),
    "not_selected": lambda w: make_update(_unselected(w)),
    "stale": lambda w: make_update(w.selected()[0], base="fl-job.r7"),
    "conflict": _conflict,
    "unknown_job": lambda w: make_update(w.selected()[0], job_id="other-job"),
    "bad_shape": _bad_shape,
    "non_finite": _non_finite,
    "bad_field": lambda w: make_update(w.selected()[0], num_samples=0),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_a_rejected_update_is_refused_with_its_reason_and_never_counted(
    collecting: World, case: str
) -> None:
    w = collecting
    update = REJECTIONS[case](w)
    with pytest.raises(DecodeError) as info:
        w.send(update)
    reason = case.split("-")[0]
    assert info.value.reason == reason
    ack = w.publisher.acks(update.device_id)[-1]
    assert (ack.ok, ack.reason, ack.duplicate, ack.ref) == (
        False,
        reason,
        False,
        update_key(update),
    )
    # The round goes on: every selected device still gets its good update counted ...
    for n, device in enumerate(w.selected()):
        if not w.publisher.acks(device) or not w.publisher.acks(device)[0].ok:
            send_good(w, device, seed=20 + n, num_samples=10 + n)
            assert w.publisher.acks(device)[-1].ok
    w.runner.tick()
    # ... and the published model is the mean of the good ones alone.
    assert [m.version for m in w.publisher.manifests()] == [V1]
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))


def test_an_update_for_another_device_is_refused_without_an_ack(collecting: World) -> None:
    a, b, _ = collecting.selected()
    with pytest.raises(DecodeError) as info:
        collecting.runner.on_update(b, encode(make_update(a)), MAX_BYTES)
    assert info.value.reason == "device_mismatch"
    assert collecting.publisher.acks(a) == []
    assert collecting.publisher.acks(b) == []


def test_malformed_and_oversized_payloads_are_decode_errors(collecting: World) -> None:
    device = collecting.selected()[0]
    with pytest.raises(DecodeError):
        collecting.runner.on_update(device, b"\x81\xa1v\x01 not msgpack", MAX_BYTES)
    payload = encode(make_update(device))
    with pytest.raises(DecodeError):
        collecting.runner.on_update(device, payload, len(payload) - 1)
    with pytest.raises(DecodeError) as info:  # a message of another kind
        collecting.runner.on_update(device, encode(BlobRequest(device, "0" * 64)), MAX_BYTES)
    assert info.value.reason == "wrong_kind"
    assert collecting.publisher.acks(device) == []
    assert collecting.store.updates(JOB.job_id, 1) == []


def test_nan_updates_never_reach_a_published_model(collecting: World) -> None:
    """One device only ever sends NaN; the quorum of the others closes at the deadline."""
    w = collecting
    bad, *good = w.selected()
    for n, device in enumerate(good):
        send_good(w, device, seed=n, num_samples=10)
    poisoned = deltas(5) | {"0.bias": np.full(SHAPES["0.bias"], np.nan, np.float32)}
    for seq in range(3):  # re-sent, and with new seqs: refused every time
        with pytest.raises(DecodeError) as info:
            w.send(make_update(bad, poisoned, seq=seq, num_samples=500))
        assert info.value.reason == "non_finite"
    assert [a.ok for a in w.publisher.acks(bad)] == [False, False, False]
    w.runner.tick()
    assert w.publisher.manifests() == []  # the NaN device is not counted as having answered
    w.clock.now += JOB.round_deadline_s + 1
    w.runner.tick()
    assert w.models.record(JOB.model, V1).devices == tuple(good)
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))


@pytest.fixture
def two_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """FedAvg on the CPU without the one-pass kernel: as on a GPU, or where it is not built."""
    monkeypatch.setattr(checked_sums, "KEEP_BYTES", 0)


@pytest.mark.skipif(not checked_sums.kernel_built(), reason="the C kernel is not built")
def test_an_update_that_overflows_the_aggregate_is_refused_on_arrival(collecting: World) -> None:
    w = collecting
    huge = {n: np.full(s, 3e38, np.float32) for n, s in SHAPES.items()}  # finite; x2 is not
    first, *others = w.selected()
    w.send(make_update(first, huge, num_samples=1))  # 1 x 3e38: fits
    for device in others:  # the one-pass fold sees each sum overflow as it makes it
        with pytest.raises(DecodeError) as info:
            w.send(make_update(device, huge, num_samples=1))
        assert info.value.reason == "non_finite"
        assert [a.ok for a in w.publisher.acks(device)] == [False]
    assert [a.ok for a in w.publisher.acks(first)] == [True]


def test_an_update_that_could_overflow_the_two_pass_sums_is_refused_on_arrival(
    two_pass: None, collecting: World
) -> None:
    """Finite values near 3e38 pass the per-update checks, but two of them overflow the
    weighted sum. The second used to be acknowledged and the round to fail at aggregation,
    dropping every acknowledged update with it; now it is refused before it is added."""
    w = collecting
    huge = {n: np.full(s, 3e38, np.float32) for n, s in SHAPES.items()}  # finite; x2 is not
    first, *others = w.selected()
    w.send(make_update(first, huge, num_samples=1))
    for device in others:
        with pytest.raises(DecodeError, match="overflow") as info:
            w.send(make_update(device, huge, num_samples=1))
        assert info.value.reason == "non_finite"
        assert not w.publisher.acks(device)[-1].ok
    assert [u.device_id for u in w.store.updates(JOB.job_id, 1)] == [first]  # still held
    w.runner.tick()
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert rnd.state == "collecting"  # waiting for sane updates, not failed


# --- blobs ---------------------------------------------------------------------------------


def test_blob_requests_are_answered_with_chunks_that_reassemble(world: World) -> None:
    manifest = world.models.manifest(JOB.model, V0)
    entry = next(f for f in manifest.files if f.name == HEAD_FILE)
    blob = world.models.blob(entry.sha256)
    request = BlobRequest("dev-a", entry.sha256, (), "r1")
    blobs = BlobServer(world.models, world.publisher, 4096)
    blobs.serve("dev-a", encode(request), MAX_BYTES)
    sent = world.publisher.on("fedge/v1/dev/dev-a/blob")
    chunks = [decode_as(BlobChunk, p.payload) for p in sent]
    assert len(chunks) == -(-len(blob) // 4096) > 1
    assert {p.qos for p in sent} == {1}
    assert (entry.piece_size, entry.pieces) == (PIECE_SIZE, piece_digests(blob))
    assembly = Reassembly(chunks[-1], piece_size=entry.piece_size, pieces=entry.pieces)
    for chunk in reversed(chunks):
        assembly.add(chunk)  # each piece checked against the signed manifest's digests
    assert assembly.result() == blob
    assert world.publisher.sent == sent  # nothing to anybody else

    world.publisher.sent.clear()  # resume: only the chunks still missing
    wanted = (0, 3, len(chunks) - 1)
    blobs.serve("dev-a", encode(BlobRequest("dev-a", entry.sha256, wanted)), 4096)
    again = [decode_as(BlobChunk, p.payload) for p in world.publisher.sent]
    assert tuple(c.index for c in again) == wanted
    assert all(bytes(c.data) == bytes(chunks[c.index].data) for c in again)


def test_blob_chunks_are_cut_to_fit_the_piece_digests(world: World) -> None:
    # 5,000-byte chunks would split the manifest's 64 KiB pieces: 4,096 are served instead
    entry = world.models.manifest(JOB.model, V0).files[0]
    blob = world.models.blob(entry.sha256)
    request = encode(BlobRequest("dev-a", entry.sha256, (), "r1"))
    BlobServer(world.models, world.publisher, 5000).serve("dev-a", request, MAX_BYTES)
    chunks = [decode_as(BlobChunk, p.payload) for p in world.publisher.sent]
    assert {c.chunk_size for c in chunks} == {4096}
    assembly = Reassembly(chunks[0], piece_size=entry.piece_size, pieces=entry.pieces)
    for chunk in chunks:
        assembly.add(chunk)
    assert assembly.result() == blob


def test_bad_blob_requests_are_refused(world: World) -> None:
    sha = world.models.manifest(JOB.model, V0).files[0].sha256
    blobs = BlobServer(world.models, world.publisher, 4096)
    with pytest.raises(DecodeError) as info:
        blobs.serve("dev-a", encode(BlobRequest("dev-a", "f" * 64)), MAX_BYTES)
    assert info.value.reason == "unknown_blob"
    with pytest.raises(DecodeError) as info:
        blobs.serve("dev-b", encode(BlobRequest("dev-a", sha)), MAX_BYTES)
    assert info.value.reason == "device_mismatch"
    assert world.publisher.sent == []


# --- restarts ------------------------------------------------------------------------------


def test_a_restart_resumes_the_collecting_round_with_its_stored_updates(collecting: World) -> None:
    w = collecting
    a, b, c = w.selected()
    send_good(w, a, seed=1, num_samples=10)
    send_good(w, b, seed=2, num_samples=40)
    deadline = w.publisher.tasks()[c].deadline

    w.restart()
    tasks = w.publisher.tasks()  # the device that has not answered is asked again
    assert sorted(tasks) == [c]
    assert (tasks[c].round, tasks[c].base_version) == (1, V0)
    assert tasks[c].deadline >= deadline
    w.send(make_update(a, deltas(1), num_samples=10))  # a re-send from before the restart
    (ack,) = w.publisher.acks(a)
    assert (ack.ok, ack.duplicate) == (True, True)
    w.runner.tick()
    assert w.publisher.manifests() == []  # two of three in, deadline not passed: wait
    send_good(w, c, seed=3, num_samples=50)
    w.runner.tick()
    (manifest,) = w.publisher.manifests()
    assert manifest.version == V1
    assert w.models.record(JOB.model, V1).devices == (a, b, c)
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))


def test_after_a_restart_the_runner_thread_drives_the_rounds(collecting: World) -> None:
    w = collecting
    a, b, c = w.selected()
    send_good(w, a, seed=1, num_samples=10)
    w.runner.stop()
    w.store.close()
    w.models.close()
    w.store = JobStore(w.root / "jobs.db")
    w.models = ModelRegistry(w.root / "models")
    w.publisher = FakePublisher()
    w.runner = JobRunner(w.store, w.models, w.publisher, w._candidates, device="cpu")
    w.runner.start()  # and leave its thread running
    send_good(w, b, seed=2, num_samples=20)
    send_good(w, c, seed=3, num_samples=30)
    give_up = time.monotonic() + 20
    while not w.publisher.manifests() and time.monotonic() < give_up:
        time.sleep(0.02)
    w.runner.stop()
    assert [m.version for m in w.publisher.manifests()][:1] == [V1]
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))


def test_a_restart_after_a_failed_round_retries_that_round(collecting: World) -> None:
    """A resumed runner used to treat the failed round as done and start round 2."""
    w = collecting
    w.clock.now += JOB.round_deadline_s + 1
    w.runner.tick()
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert rnd.state == "failed"
    w.restart()
    assert w.publisher.sent == []
    w.runner.tick()
    assert {(t.round, t.base_version) for t in w.publisher.tasks().values()} == {(1, V0)}
    assert w.store.round(JOB.job_id, 2) is None


def test_a_crash_between_registering_and_recording_a_version_recovers(
    collecting: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """models.put used to raise 'already registered' at every tick after such a crash."""
    w = collecting
    fail_finish_once(w, monkeypatch)  # the process dies where recording would have been
    for n, device in enumerate(w.selected()):
        send_good(w, device, seed=n, num_samples=10 * (n + 1))
    w.runner.tick()
    registered = w.models.record(JOB.model, V1)
    # The version is registered, the round still aggregating, the job on the old version.
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert rnd.state == "aggregating"
    w.restart()
    w.runner.tick()  # the resumed round closes at once: all three updates are stored
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert rnd.state == "done"
    job = w.store.job(JOB.job_id)
    assert job is not None
    assert job.current_version == V1
    assert w.publisher.manifests() == [registered.manifest]  # the same version, announced
    assert w.models.record(JOB.model, V1) == registered
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))
    w.runner.tick()  # and the job goes on from it
    assert {t.base_version for t in w.publisher.tasks().values()} == {V1}


def fail_finish_once(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the store refuse, once, to record a round as done (as a full disk would)."""
    real_finish = w.store.finish_round
    failures = [StoreError("database or disk is full")]

    def finish_round(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        real_finish(*args, **kwargs)

    monkeypatch.setattr(w.store, "finish_round", finish_round)


def test_a_store_failure_when_finishing_a_round_keeps_memory_and_store_in_step(
    collecting: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the store refuses to record the round as done, once (disk full).
    tick() used to raise IllegalRoundTransitionError ('fail' in state 'done') and leave memory
    a version ahead of the store."""
    w = collecting
    fail_finish_once(w, monkeypatch)
    for n, device in enumerate(w.selected()):
        send_good(w, device, seed=n, num_samples=10)
    w.runner.tick()  # not recorded: nothing is announced that the store does not hold
    assert w.publisher.manifests() == []
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert rnd.state == "aggregating"
    job = w.store.job(JOB.job_id)
    assert job is not None
    assert job.current_version == V0
    w.runner.tick()  # recorded now; memory and store move together
    job = w.store.job(JOB.job_id)
    assert job is not None
    assert job.current_version == V1
    w.publisher.sent.clear()
    w.runner.tick()
    bases = {t.base_version for t in w.publisher.tasks().values()}
    assert bases == {V1}  # the next tasks build on what the store holds


def test_a_round_whose_recording_failed_is_finished_from_its_own_updates(
    collecting: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed finish leaves V1 registered from this round's updates; the next tick records
    that same version instead of redoing the round with other updates under its name."""
    w = collecting
    fail_finish_once(w, monkeypatch)
    selected = w.selected()
    for n, device in enumerate(selected):
        send_good(w, device, seed=n, num_samples=10 + n)
    w.runner.tick()  # registered, recording failed: the round waits in 'aggregating'
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert rnd.state == "aggregating"
    w.runner.tick()  # recorded now, from the same updates
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert rnd.state == "done"
    assert rnd.new_version == V1
    assert [m.version for m in w.publisher.manifests()] == [V1]
    assert w.models.record(JOB.model, V1).devices == tuple(sorted(selected))
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))
