"""The job runner against devices that lie about their weight, acks that get lost, and a
stop between making a version and recording it (the world of `test_job_runner`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cloud_coordinator.job_spec import JobSpec, JobSpecError
from protocols.errors import DecodeError
from tests.unit.fl.test_job_runner import (
    JOB,
    V0,
    V1,
    World,
    assert_head,
    collecting,
    deltas,
    expected_head,
    fail_finish_once,
    make_update,
    seed,
    send_good,
    world,
)

__all__ = ["collecting", "seed", "world"]  # (the fixtures)


def _two_answer(w: World) -> tuple[str, str, str]:
    """The selected devices, the first two of which have sent good updates."""
    a, b, c = w.selected()
    send_good(w, a, seed=1, num_samples=10)
    send_good(w, b, seed=2, num_samples=30)
    return a, b, c


def test_an_update_claiming_more_samples_than_the_job_allows_is_refused(
    collecting: World,
) -> None:
    w = collecting
    _, _, c = _two_answer(w)
    with pytest.raises(DecodeError, match="max_samples_per_update") as refused:
        w.send(make_update(c, deltas(3, scale=1.0), num_samples=2**63 - 1))  # to dominate
    assert refused.value.reason == "bad_weight"
    (ack,) = w.publisher.acks(c)
    assert (ack.ok, ack.reason) == (False, "bad_weight")
    w.clock.now += JOB.round_deadline_s + 0.1
    w.runner.tick()
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))  # the honest mean


def test_the_weight_cap_is_a_job_setting() -> None:
    assert JOB.max_samples_per_update == 100_000
    spec = JobSpec.from_json({"job_id": "j", "max_samples_per_update": 500})
    assert spec.max_samples_per_update == 500
    with pytest.raises(JobSpecError, match="max_samples_per_update"):
        JobSpec.from_json({"job_id": "j", "max_samples_per_update": 0})


def test_an_update_resent_after_its_round_closed_is_a_duplicate_not_late(
    collecting: World,
) -> None:
    w = collecting
    a, _, _ = _two_answer(w)
    w.clock.now += JOB.round_deadline_s + 0.1
    w.runner.tick()  # round 1 closed and made V1
    w.send(make_update(a, deltas(1), num_samples=10))  # its ack was lost: sent again
    assert [(x.ok, x.duplicate) for x in w.publisher.acks(a)] == [(True, False), (True, True)]
    late = make_update(a, deltas(1), num_samples=10, seq=2)  # a new update, too late
    with pytest.raises(DecodeError, match="not open"):
        w.send(late)
    assert (w.publisher.acks(a)[-1].ok, w.publisher.acks(a)[-1].reason) == (False, "late")


def test_a_round_whose_version_was_made_before_a_stop_takes_no_more_updates(
    collecting: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reopened after a restart, the round used to acknowledge late updates that the
    version (made before the stop, from the others) never held."""
    w = collecting
    fail_finish_once(w, monkeypatch)
    a, b, c = _two_answer(w)
    w.clock.now += JOB.round_deadline_s + 0.1
    w.runner.tick()  # V1 registered from a and b; recording it failed
    w.restart()
    assert c not in w.publisher.tasks()  # no task sent again for a version already made
    with pytest.raises(DecodeError, match="not open"):
        w.send(make_update(c, deltas(3), num_samples=50))
    assert (w.publisher.acks(c)[-1].ok, w.publisher.acks(c)[-1].reason) == (False, "late")
    w.runner.tick()
    rnd = w.store.round(JOB.job_id, 1)
    assert rnd is not None
    assert rnd.state == "done"
    assert w.models.record(JOB.model, V1).devices == tuple(sorted((a, b)))
    assert_head(w.head(V1), expected_head(w.head(V0), w.accepted))


def test_a_device_accuracy_outside_0_to_1_is_left_out_of_the_round_metrics(
    collecting: World,
) -> None:
    w = collecting
    a, b, c = w.selected()
    for n, (device, accuracy) in enumerate(((a, 0.5), (b, 1e300), (c, 0.7))):
        update = make_update(device, deltas(n), num_samples=10)
        w.send(dataclasses.replace(update, metrics={"val_acc_before": accuracy}))
    w.runner.tick()
    job = w.runner.job_json(JOB.job_id)
    assert job is not None
    text = json.dumps(job, allow_nan=False)  # strict JSON: no Infinity anywhere
    rounds = json.loads(text)["rounds"]
    assert rounds[-1]["metrics"]["device_val_acc_base"] == pytest.approx(0.6)


def test_a_finished_rounds_update_payloads_are_dropped_and_their_rows_kept(
    collecting: World,
) -> None:
    w = collecting
    a, _, _ = _two_answer(w)
    assert all(len(u.payload) > 1000 for u in w.store.updates(JOB.job_id, 1))
    w.clock.now += JOB.round_deadline_s + 0.1
    w.runner.tick()  # round 1 done
    stored = w.store.updates(JOB.job_id, 1)
    assert [u.payload for u in stored] == [b"", b""]  # the version holds what they brought
    w.send(make_update(a, deltas(1), num_samples=10))  # and a re-send is still a duplicate
    assert w.publisher.acks(a)[-1].duplicate
