"""The job store on real SQLite files: jobs, rounds and durable updates across reopen."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_coordinator.errors import StoreError
from cloud_coordinator.job_spec import JobSpec
from cloud_coordinator.job_store import JobStore, StoredUpdate


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.db"


@pytest.fixture
def store(path: Path) -> Iterator[JobStore]:
    s = JobStore(path)
    yield s
    s.close()


def spec(job_id: str = "job-1", **kw: object) -> JobSpec:
    return JobSpec(job_id=job_id, **kw)  # type: ignore[arg-type]


def test_create_job_is_idempotent_and_keeps_the_first(store: JobStore) -> None:
    assert store.create_job(spec(rounds=3), "job-1.r0") is True
    assert store.create_job(spec(rounds=9), "other") is False
    record = store.job("job-1")
    assert record is not None
    assert record.spec == spec(rounds=3)
    assert (record.state, record.current_round, record.current_version, record.message) == (
        "running", 0, "job-1.r0", "",
    )  # fmt: skip
    assert store.job("nope") is None


def test_jobs_oldest_first_and_by_state(store: JobStore) -> None:
    for name in ("b", "a", "c"):
        store.create_job(spec(name), f"{name}.r0")
    store.set_job("a", state="done", message="all rounds done")
    assert [r.spec.job_id for r in store.jobs()] == ["b", "a", "c"]
    assert [r.spec.job_id for r in store.jobs("running")] == ["b", "c"]
    done = store.jobs("done")
    assert [(r.spec.job_id, r.message) for r in done] == [("a", "all rounds done")]
    assert store.jobs("failed") == []


def test_set_job_takes_only_its_fields(store: JobStore) -> None:
    store.create_job(spec(), "v0")
    store.set_job("job-1", state="failed", current_round=4, current_version="v4", message="m")
    record = store.job("job-1")
    assert record is not None
    assert (record.state, record.current_round, record.current_version, record.message) == (
        "failed", 4, "v4", "m",
    )  # fmt: skip
    for bad in ({"spec": "{}"}, {"created": 0.0}, {"state": "x", "oops": 1}, {}):
        with pytest.raises(ValueError, match="set_job takes"):
            store.set_job("job-1", **bad)
    assert store.job("job-1") == record  # nothing changed by the refused calls


def test_start_round_records_a_selecting_round(store: JobStore) -> None:
    store.create_job(spec(), "v0")
    store.start_round("job-1", 1, "v0", ["d2", "d1"], deadline=123.5)
    rec = store.round("job-1", 1)
    assert rec is not None
    assert (rec.state, rec.base_version, rec.new_version, rec.selected) == (
        "selecting", "v0", "", ("d2", "d1"),
    )  # fmt: skip
    assert (rec.deadline, rec.closed, rec.metrics) == (123.5, None, {})
    job = store.job("job-1")
    assert job is not None
    assert job.current_round == 1
    assert store.round("job-1", 2) is None


def test_set_round_and_rounds_in_order(store: JobStore) -> None:
    store.create_job(spec(), "v0")
    store.start_round("job-1", 2, "v1", ["a"], 10.0)
    store.start_round("job-1", 1, "v0", ["a"], 10.0)
    store.set_round("job-1", 1, "done", new_version="v1", closed=11.0, metrics={"acc": 0.5})
    store.set_round("job-1", 2, "collecting")
    first, second = store.rounds("job-1")
    assert (first.round, first.state, first.new_version, first.closed) == (1, "done", "v1", 11.0)
    assert first.metrics == {"acc": 0.5}
    assert (second.round, second.state, second.new_version, second.closed) == (
        2, "collecting", "", None,
    )  # fmt: skip


def test_finish_round_marks_it_done_and_moves_the_job_on(store: JobStore) -> None:
    store.create_job(spec(), "v0")
    store.start_round("job-1", 1, "v0", ["a"], 10.0)
    store.set_round("job-1", 1, "aggregating")
    store.finish_round("job-1", 1, "v1", {"accuracy": 0.75, "participants": 1})
    rnd = store.round("job-1", 1)
    assert rnd is not None
    assert (rnd.state, rnd.new_version, rnd.metrics) == (
        "done", "v1", {"accuracy": 0.75, "participants": 1},
    )  # fmt: skip
    assert rnd.closed is not None
    job = store.job("job-1")
    assert job is not None
    assert (job.current_version, job.current_round) == ("v1", 1)


def test_start_round_replaces_a_failed_attempt_and_clears_its_updates(store: JobStore) -> None:
    store.create_job(spec(), "v0")
    store.start_round("job-1", 1, "v0", ["a", "b"], 10.0)
    store.add_update("job-1", 1, "a", "v0", 1, 5, b"one")
    store.add_update("job-1", 2, "a", "v1", 1, 5, b"next round")  # another round: kept
    store.set_round("job-1", 1, "failed", closed=11.0, metrics={"why": "deadline"})
    store.start_round("job-1", 1, "v0", ["b", "c"], 20.0)
    rec = store.round("job-1", 1)
    assert rec is not None
    assert (rec.state, rec.selected, rec.deadline, rec.closed, rec.metrics) == (
        "selecting", ("b", "c"), 20.0, None, {},
    )  # fmt: skip
    assert store.updates("job-1", 1) == []
    assert [u.payload for u in store.updates("job-1", 2)] == [b"next round"]
    assert len(store.rounds("job-1")) == 1
    # the device may send again in the new attempt, with any seq
    assert store.add_update("job-1", 1, "a", "v0", 2, 5, b"two") == "new"


def test_add_update_new_duplicate_conflict(store: JobStore) -> None:
    store.create_job(spec(), "v0")
    assert store.add_update("job-1", 1, "a", "v0", 7, 10, b"first") == "new"
    assert store.add_update("job-1", 1, "a", "v0", 7, 10, b"first") == "duplicate"
    assert store.add_update("job-1", 1, "a", "v0", 8, 10, b"other") == "conflict"
    assert store.add_update("job-1", 1, "a", "v9", 7, 10, b"other") == "conflict"
    # the stored update is the first one, untouched by the refused ones
    assert store.updates("job-1", 1) == [StoredUpdate("a", 7, 10, b"first")]
    # other devices, rounds and jobs are independent
    assert store.add_update("job-1", 1, "b", "v0", 7, 3, b"b") == "new"
    assert store.add_update("job-1", 2, "a", "v0", 7, 10, b"r2") == "new"
    assert store.add_update("job-2", 1, "a", "v0", 7, 10, b"j2") == "new"


def test_updates_come_back_in_arrival_order(store: JobStore) -> None:
    for n, device in enumerate(["zeta", "alpha", "mid", "beta"]):
        store.add_update("job-1", 1, device, "v0", n, n + 1, device.encode())
    got = store.updates("job-1", 1)
    assert [u.device_id for u in got] == ["zeta", "alpha", "mid", "beta"]
    assert [(u.seq, u.num_samples, u.payload) for u in got][1] == (1, 2, b"alpha")
    assert all(type(u.payload) is bytes for u in got)
    assert store.updates("job-1", 2) == []


def test_everything_survives_close_and_reopen(path: Path) -> None:
    first = JobStore(path)
    first.create_job(spec(quorum=2, devices_per_round=3), "v0")
    first.start_round("job-1", 1, "v0", ["a", "b", "c"], 99.0)
    first.set_round("job-1", 1, "collecting")
    first.add_update("job-1", 1, "b", "v0", 3, 4, b"\x00\xffbinary")
    first.set_job("job-1", message="halfway")
    first.close()

    again = JobStore(path)
    try:
        record = again.job("job-1")
        assert record is not None
        assert record.spec == spec(quorum=2, devices_per_round=3)
        assert (record.current_round, record.message) == (1, "halfway")
        rnd = again.round("job-1", 1)
        assert rnd is not None
        assert (rnd.state, rnd.selected) == ("collecting", ("a", "b", "c"))
        assert again.updates("job-1", 1) == [StoredUpdate("b", 3, 4, b"\x00\xffbinary")]
        assert again.add_update("job-1", 1, "b", "v0", 3, 4, b"\x00\xffbinary") == "duplicate"
        assert again.create_job(spec(), "v0") is False
    finally:
        again.close()


def test_an_unopenable_store_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "jobs.db").mkdir()  # a directory where the database file should be
    with pytest.raises(StoreError, match="cannot open the job store"):
        JobStore(tmp_path / "jobs.db")
