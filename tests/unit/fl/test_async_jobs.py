"""Async (FedBuff) jobs through the real runner, store and registry, driven tick by tick:
tasks handed to free devices, versions every `async_buffer` updates, staleness weights,
the staleness window, duplicates across versions and a restart mid-buffer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_coordinator import async_rounds, jobs, versions
from cloud_coordinator.job_spec import JobSpec
from cloud_coordinator.job_store import JobStore
from cloud_coordinator.jobs import JobRunner, version_id
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.selection import Candidate
from protocols.errors import DecodeError
from protocols.messages import ModelUpdate, encode
from protocols.model_format import HEAD_FILE, unpack_tensors
from protocols.tensors import encode_dense
from tests.unit.fl.test_job_runner import Clock, FakePublisher, Head, deltas

JOB = JobSpec(
    job_id="fb-job",
    template="digits_mlp",
    model_name="fb-digits",
    mode="async",
    rounds=3,
    devices_per_round=3,
    async_buffer=2,
    max_staleness=1,
    staleness_exponent=0.5,
    round_deadline_s=30.0,
    seed=3,
)
DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")
V = [version_id(JOB.job_id, n) for n in range(4)]
MAX = 1 << 24


@pytest.fixture(scope="module")
def seed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fb-seed")
    store, models = JobStore(root / "jobs.db"), ModelRegistry(root / "models")
    JobRunner(store, models, FakePublisher(), list, device="cpu").create(JOB)
    store.close()
    models.close()
    return root


class Fleet:
    """A runner over a copy of the seed state, four online devices, a fake clock."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.root, self.clock = root, clock
        self.candidates = [Candidate(d, online=True) for d in DEVICES]
        self.open()

    def open(self) -> None:
        self.publisher = FakePublisher()
        self.store = JobStore(self.root / "jobs.db")
        self.models = ModelRegistry(self.root / "models")
        self.runner = JobRunner(self.store, self.models, self.publisher,
                                lambda: list(self.candidates), device="cpu")  # fmt: skip
        held, self.candidates = self.candidates, []
        self.runner.start()
        self.runner.stop()
        self.candidates = held

    def close(self) -> None:
        self.runner.stop()
        self.store.close()
        self.models.close()

    def head(self, version: str) -> Head:
        files = self.models.files(JOB.model, version)
        return {k: np.asarray(v) for k, v in unpack_tensors(files[HEAD_FILE]).items()}

    def send(self, device: str, round_no: int, delta: Head, n: int = 10, seq: int = 1) -> None:
        tensors = tuple(encode_dense(k, v) for k, v in delta.items())
        update = ModelUpdate(device, JOB.job_id, round_no, V[round_no - 1], seq, n, tensors)
        self.runner.on_update(device, encode(update), MAX)

    def last_ack(self, device: str) -> tuple[bool, bool, str]:
        ack = self.publisher.acks(device)[-1]
        return ack.ok, ack.duplicate, ack.reason


@pytest.fixture
def fleet(seed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    root = tmp_path / "coordinator"
    shutil.copytree(seed_root, root)
    clock = Clock()
    for module in (jobs, async_rounds, versions):
        monkeypatch.setattr(module, "time", clock)
    f = Fleet(root, clock)
    yield f
    f.close()


def test_spec_round_trips_through_the_store(fleet: Fleet) -> None:
    job = fleet.store.job(JOB.job_id)
    assert job is not None
    assert job.spec == JOB
    assert JOB.updates_per_version == 2


def test_free_devices_get_tasks_up_to_the_concurrency(fleet: Fleet) -> None:
    fleet.runner.tick()
    tasks = fleet.publisher.tasks()
    assert len(tasks) == 3  # devices_per_round tasks at a time, of 4 devices
    assert {(t.round, t.base_version) for t in tasks.values()} == {(1, V[0])}
    count = len(fleet.publisher.sent)
    fleet.runner.tick()  # nobody is free: nothing more goes out
    assert len(fleet.publisher.sent) == count


def test_every_buffer_makes_a_version_and_late_updates_fold_in_with_staleness(
    fleet: Fleet,
) -> None:
    fleet.runner.tick()
    first = sorted(fleet.publisher.tasks())
    a, b, late = first
    da, db, dl, dx = (deltas(n) for n in range(4))
    fleet.send(a, 1, da, n=10)
    fleet.send(b, 1, db, n=30)
    assert fleet.last_ack(a) == (True, False, "")
    fleet.runner.tick()  # two updates: version 1 is made, buffer 2 opens, tasks go out
    v0 = fleet.head(V[0])
    v1 = fleet.head(V[1])
    for name in v0:
        expected = v0[name] + (10 * da[name] + 30 * db[name]) / 40
        np.testing.assert_allclose(v1[name], expected, rtol=1e-5, atol=1e-6)
    tasks = fleet.publisher.tasks()
    second = tasked_in(fleet, 2)
    assert len(second) == 2  # 3 at a time, and the straggler still holds one
    assert late not in second
    assert {tasks[d].base_version for d in second} == {V[1]}
    assert tasks[late].round == 1  # still working on its first task: not sent another
    # the straggler's update, trained on V0, arrives during buffer 2: staleness 1
    fleet.send(late, 1, dl, n=20)
    assert fleet.last_ack(late) == (True, False, "")
    fleet.send(second[0], 2, dx, n=10)
    fleet.runner.tick()
    v2 = fleet.head(V[2])
    w_late = 20 * 2**-0.5
    for name in v1:
        expected = v1[name] + (w_late * dl[name] + 10 * dx[name]) / (w_late + 10)
        np.testing.assert_allclose(v2[name], expected, rtol=1e-5, atol=1e-6)
    record = fleet.store.round(JOB.job_id, 2)
    assert record is not None
    assert record.metrics["staleness_max"] == 1
    assert record.metrics["mode"] == "async"
    assert record.metrics["rule"]


def test_refusals_stale_untasked_duplicate_and_twice_in_one_buffer(fleet: Fleet) -> None:
    fleet.runner.tick()
    a, b, c = sorted(fleet.publisher.tasks())
    (idle,) = set(DEVICES) - {a, b, c}
    with pytest.raises(DecodeError):
        fleet.send(idle, 1, deltas(9))
    assert fleet.last_ack(idle) == (False, False, "not_selected")
    fleet.send(a, 1, deltas(1))
    fleet.send(a, 1, deltas(1))  # the same update again (its ack was lost)
    assert fleet.last_ack(a) == (True, True, "")
    with pytest.raises(DecodeError):
        fleet.send(a, 1, deltas(2), seq=2)  # a second, different update in this buffer
    assert fleet.last_ack(a) == (False, False, "conflict")
    fleet.send(b, 1, deltas(3))
    fleet.runner.tick()  # version 1
    fleet.send(a, 1, deltas(1))  # resent after its version was made: still a duplicate
    assert fleet.last_ack(a) == (True, True, "")
    for d in tasked_in(fleet, 2)[:2]:
        fleet.send(d, 2, deltas(4))
    fleet.runner.tick()  # version 2; c's task from buffer 1 is now 2 versions old
    with pytest.raises(DecodeError, match="max_staleness"):
        fleet.send(c, 1, deltas(5))
    assert fleet.last_ack(c) == (False, False, "stale")
    bad = deltas(6)
    bad[next(iter(bad))].reshape(-1)[0] = np.nan
    d3 = tasked_in(fleet, 3)[0]
    with pytest.raises(DecodeError):
        fleet.send(d3, 3, bad)
    assert fleet.last_ack(d3) == (False, False, "non_finite")
    assert fleet.store.updates(JOB.job_id, 3) == []  # refused: not kept either


def tasked_in(fleet: Fleet, round_no: int) -> list[str]:
    """The devices whose latest task is from buffer `round_no`, sorted."""
    return sorted(d for d, t in fleet.publisher.tasks().items() if t.round == round_no)


def test_a_restart_mid_buffer_resumes_with_its_updates_and_tasks(fleet: Fleet) -> None:
    fleet.runner.tick()
    a, b, _ = sorted(fleet.publisher.tasks())
    fleet.send(a, 1, deltas(1), n=10)
    fleet.close()
    fleet.open()  # a restart: buffer 1 holds a's update; b and c still hold tasks
    fleet.send(b, 1, deltas(2), n=30)  # tasked before the restart: accepted
    assert fleet.last_ack(b) == (True, False, "")
    fleet.runner.tick()
    v0, v1 = fleet.head(V[0]), fleet.head(V[1])
    d1, d2 = deltas(1), deltas(2)
    for name in v0:
        expected = v0[name] + (10 * d1[name] + 30 * d2[name]) / 40
        np.testing.assert_allclose(v1[name], expected, rtol=1e-5, atol=1e-6)


def test_the_job_ends_after_its_versions(fleet: Fleet) -> None:
    for version in range(1, JOB.rounds + 1):
        fleet.runner.tick()
        for d in tasked_in(fleet, version)[:2]:
            fleet.send(d, version, deltas(version), n=5)
    fleet.runner.tick()
    job = fleet.store.job(JOB.job_id)
    assert job is not None
    assert (job.state, job.current_version) == ("done", V[3])
    fleet.runner.tick()
    assert fleet.runner.jobs_json()[0]["state"] == "done"


def test_a_late_task_trained_on_a_newer_version_counts_as_less_stale(fleet: Fleet) -> None:
    fleet.runner.tick()
    a, b, late = sorted(fleet.publisher.tasks())
    assert fleet.publisher.tasks()[late].hyperparams["base"] == "latest"
    fleet.send(a, 1, deltas(1))
    fleet.send(b, 1, deltas(2))
    fleet.runner.tick()  # version 1; `late` still holds its task from buffer 1
    d = deltas(3)
    tensors = tuple(encode_dense(k, v) for k, v in d.items())
    for base, reason in [("other-job.r1", "bad_field"), (V[2], "bad_field")]:
        wrong = ModelUpdate(late, JOB.job_id, 1, base, 1, 10, tensors)
        with pytest.raises(DecodeError):
            fleet.runner.on_update(late, encode(wrong), MAX)
        assert fleet.last_ack(late) == (False, False, reason)
    # it got to its task late and trained on V1, the newest it had: staleness 0
    fresh = ModelUpdate(late, JOB.job_id, 1, V[1], 1, 10, tensors)
    fleet.runner.on_update(late, encode(fresh), MAX)
    assert fleet.last_ack(late) == (True, False, "")
    fleet.send(tasked_in(fleet, 2)[0], 2, deltas(4))
    fleet.runner.tick()
    record = fleet.store.round(JOB.job_id, 2)
    assert record is not None
    assert record.metrics["staleness_max"] == 0


def test_version_round_parses_only_this_jobs_versions() -> None:
    assert async_rounds.version_round("j", "j.r12") == 12
    for bad in ("j.r", "j.r-1", "j.r01", "k.r1", "j.r1x", "jj.r1"):
        assert async_rounds.version_round("j", bad) is None


def test_an_update_for_a_full_buffer_is_kept_for_the_next_version(fleet: Fleet) -> None:
    fleet.runner.tick()
    a, b, c = sorted(fleet.publisher.tasks())
    da, db, dc = deltas(1), deltas(2), deltas(3)
    fleet.send(a, 1, da, n=10)
    fleet.send(b, 1, db, n=10)  # the buffer is full (2), but not closed yet
    fleet.send(c, 1, dc, n=10)  # acknowledged, stored for version 2
    assert fleet.last_ack(c) == (True, False, "")
    fleet.send(c, 1, dc, n=10)  # its resend is a duplicate, not a second update
    assert fleet.last_ack(c) == (True, True, "")
    fleet.runner.tick()  # version 1 from exactly a and b; buffer 2 opens holding c's
    v0, v1 = fleet.head(V[0]), fleet.head(V[1])
    for name in v0:
        np.testing.assert_allclose(v1[name], v0[name] + (da[name] + db[name]) / 2,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    assert c not in tasked_in(fleet, 2)  # it already has an update in version 2
    d = tasked_in(fleet, 2)[0]
    dd = deltas(4)
    fleet.send(d, 2, dd, n=10)
    fleet.runner.tick()
    v2 = fleet.head(V[2])
    w_c = 10 * 2**-0.5  # trained on V0, folded into version 2 (made from V1): staleness 1
    for name in v1:
        expected = v1[name] + (w_c * dc[name] + 10 * dd[name]) / (w_c + 10)
        np.testing.assert_allclose(v2[name], expected, rtol=1e-5, atol=1e-6)
    record = fleet.store.round(JOB.job_id, 2)
    assert record is not None
    assert record.metrics["contributors"] == sorted([c, d])


def test_a_bad_update_for_the_next_buffer_is_refused_at_once(fleet: Fleet) -> None:
    fleet.runner.tick()
    a, b, c = sorted(fleet.publisher.tasks())
    fleet.send(a, 1, deltas(1))
    fleet.send(b, 1, deltas(2))
    bad = deltas(3)
    bad[next(iter(bad))].reshape(-1)[0] = np.inf
    with pytest.raises(DecodeError):
        fleet.send(c, 1, bad)
    assert fleet.last_ack(c) == (False, False, "non_finite")
    assert fleet.store.updates(JOB.job_id, 2) == []
