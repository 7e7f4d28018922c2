"""Federated jobs end to end: a real Mosquitto, a coordinator and training agents as processes.

Jobs are started through the HTTP API like a user would; what happened is read back from
GET /v1/jobs/{id} and the rejection counts, and device traffic is watched (and forged) by
a spy MQTT client on the broker's plain listener, where anonymous clients may do anything.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from cloud_coordinator.jobs import update_key
from cloud_coordinator.templates import template_names
from protocols.messages import ModelUpdate, decode_as, encode
from protocols.topics import DeviceChannel
from tests.broker import Mosquitto
from tests.integration.fl_helpers import (
    Spy,
    child_pids,
    fleet,
    get_job,
    job_spec,
    prepare_data,
    rounds_done,
    start_job,
    wait_job,
    wait_online,
    wait_rounds_done,
    zero_update,
)
from tests.procs import Coordinator, running, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _check_lineage(job: dict[str, Any], rounds: int) -> None:
    """Rounds 1..n in order, each done and built on the version the round before produced."""
    job_id = job["job_id"]
    assert [r["round"] for r in job["rounds"]] == list(range(1, rounds + 1))
    previous = f"{job_id}.r0"
    for r in job["rounds"]:
        assert r["state"] == "done", r
        assert r["base_version"] == previous
        assert r["new_version"] == f"{job_id}.r{r['round']}"
        previous = r["new_version"]
    assert job["current_version"] == previous
    started = [r["started"] for r in job["rounds"]]
    assert started == sorted(started), "rounds ran out of order"


def _update_rejections(coordinator: Coordinator) -> dict[str, int]:
    return {r: n for (c, r), n in coordinator.rejections().items() if c == "update"}


def _forged(payload: bytes, **changes: Any) -> bytes:
    """A captured update re-encoded with some fields changed."""
    return encode(dataclasses.replace(decode_as(ModelUpdate, payload, 1 << 30), **changes))


def test_three_agents_train_a_job_started_over_http(mosquitto: Mosquitto, tmp_path: Path) -> None:
    data = prepare_data(tmp_path, 3, "iid")
    ids = [d.name for d in data]
    with fleet(mosquitto, tmp_path, data) as (coordinator, _):
        # bad specs are refused up front, naming what is wrong, and leave no job behind
        status, body = coordinator.post("/v1/jobs", job_spec("bad-zip", compression="zip"))
        assert status == 400
        assert "'compression'" in body["error"]
        assert "'zip'" in body["error"]
        status, body = coordinator.post("/v1/jobs", job_spec("bad-tpl", template="resnet_9000"))
        assert status == 400
        assert "resnet_9000" in body["error"]
        assert all(name in body["error"] for name in template_names())
        assert coordinator.get("/v1/jobs")["jobs"] == []

        start_job(coordinator, job_spec("fl3", rounds=3, devices_per_round=3))
        job = wait_job(coordinator, "fl3", timeout=90)
        assert coordinator.rejections() == {}
        assert "Traceback" not in coordinator.output()
    assert job["state"] == "done", job["message"]
    _check_lineage(job, 3)
    accuracy = []
    for r in rounds_done(job):
        assert sorted(r["selected"]) == ids
        assert r["metrics"]["participants"] == 3
        assert r["metrics"]["selected"] == 3
        assert r["metrics"]["uplink_bytes"] > 0
        accuracy.append(r["metrics"]["accuracy"])
    assert accuracy[-1] > accuracy[0], accuracy
    assert accuracy[-1] >= 0.8, accuracy


def test_replayed_update_counts_once_and_forgeries_are_refused(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Two real agents and `sim-03`, a device the spy plays: selected, it keeps the round
    open (quorum: all three) while updates are replayed and forged, then closes it."""
    data = prepare_data(tmp_path, 2, "iid")
    sim = "sim-03"
    with fleet(mosquitto, tmp_path, data) as (coordinator, _), Spy(mosquitto) as spy:
        spy.announce_online(sim)
        wait_online(coordinator, [d.name for d in data] + [sim])
        start_job(coordinator, job_spec("dup", rounds=1, devices_per_round=3))

        # both real agents' updates are in and acknowledged once
        real = wait_until(lambda: u if len(u := spy.updates("dup", 1)) == 2 else None, 60)
        keys = {d: update_key(decode_as(ModelUpdate, p, 1 << 30)) for d, p in real.items()}
        for device, key in keys.items():
            (ack,) = spy.wait_ack(device, key, timeout=10)
            assert ack.ok, ack
            assert not ack.duplicate, ack

        # a verbatim replay is acknowledged as a duplicate and not counted again
        spy.publish("agent-01", DeviceChannel.UPDATE, real["agent-01"])
        acks = wait_until(lambda: a if len(a := spy.acks("agent-01")) == 2 else None, 10)
        assert acks[1].ref == keys["agent-01"]
        assert acks[1].ok
        assert acks[1].duplicate

        # forgeries are refused, each for its reason, and the sender is told why
        seq = decode_as(ModelUpdate, real["agent-01"], 1 << 30).seq
        forgeries: dict[str, tuple[str, dict[str, Any]]] = {
            "conflict": ("agent-01", {"seq": seq + 1}),
            "not_selected": ("outsider", {"device_id": "outsider"}),
            "stale": (sim, {"device_id": sim, "base_version": "dup.r7"}),
        }
        for reason, (device, changes) in forgeries.items():
            forged = _forged(real["agent-01"], **changes)
            spy.publish(device, DeviceChannel.UPDATE, forged)
            key = update_key(decode_as(ModelUpdate, forged, 1 << 30))
            (ack,) = spy.wait_ack(device, key, timeout=10)
            assert (ack.ok, ack.reason) == (False, reason)
        assert get_job(coordinator, "dup")["rounds"][0]["state"] == "collecting"

        # the simulated device answers properly (agent-02's delta under its own name)
        answer = _forged(real["agent-02"], device_id=sim, seq=1)
        spy.publish(sim, DeviceChannel.UPDATE, answer)
        job = wait_job(coordinator, "dup", timeout=30)
        rejected = _update_rejections(coordinator)
        metrics = coordinator.metrics()

    assert job["state"] == "done", job["message"]
    (r,) = job["rounds"]
    assert r["state"] == "done"
    assert sorted(r["selected"]) == ["agent-01", "agent-02", sim]
    assert r["metrics"]["participants"] == 3
    # uplink counts each device's update once: the replay and the refused forgeries add nothing
    assert r["metrics"]["uplink_bytes"] == len(real["agent-01"]) + len(real["agent-02"]) + len(
        answer
    )
    # a duplicate is acknowledged and accepted, not a rejection; each forgery is counted once
    assert rejected == {"conflict": 1, "not_selected": 1, "stale": 1}
    assert 'fedge_messages_accepted_total{channel="update"} 4' in metrics


@pytest.mark.wallclock  # (the two others must train and answer within the 5-s deadline)
def test_straggler_does_not_block_the_round_and_its_late_update_is_refused(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The straggler's training child is frozen (SIGSTOP) once it is warm, so the device is
    online and selected but cannot answer; thawed after the round closed, it sends late."""
    deadline = 5.0
    data = prepare_data(tmp_path, 3, "iid")
    with fleet(mosquitto, tmp_path, data) as (coordinator, agents), Spy(mosquitto) as spy:
        # a one-round job warms every agent's training child (torch imported)
        start_job(coordinator, job_spec("warm", rounds=1, devices_per_round=3))
        assert wait_job(coordinator, "warm", timeout=90)["state"] == "done"
        straggler = agents[2]
        (trainer,) = child_pids(straggler.process.pid)
        os.kill(trainer, signal.SIGSTOP)
        try:
            spec = job_spec(
                "strag", rounds=2, devices_per_round=3, quorum=2, round_deadline_s=deadline
            )
            start_job(coordinator, spec)
            job = wait_rounds_done(coordinator, "strag", 1, timeout=30)
        finally:
            os.kill(trainer, signal.SIGCONT)
        first = job["rounds"][0]
        assert sorted(first["selected"]) == ["agent-01", "agent-02", "agent-03"]
        assert first["metrics"]["participants"] == 2
        assert first["closed"] - first["started"] >= deadline - 0.1  # held until the deadline

        # thawed, the straggler finishes round 1 and sends it: refused as late, and told so
        wait_until(lambda: _update_rejections(coordinator).get("late") == 1, timeout=30)
        late = wait_until(
            lambda: [a for a in spy.acks(straggler.device_id) if a.ref.startswith("strag/1/")],
            timeout=10,
        )
        assert [(a.ok, a.reason) for a in late] == [(False, "late")]
        job = wait_job(coordinator, "strag", timeout=30)
    assert job["state"] == "done", job["message"]
    _check_lineage(job, 2)
    assert job["rounds"][1]["metrics"]["participants"] >= 2


def test_coordinator_killed_mid_round_resumes_and_finishes(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """kill -9 while round 2 is collecting with two of its three updates stored (sim-03, a
    device the spy plays, holds its answer); a new coordinator on the same data dir resumes
    round 2 with the stored updates, gets the held answer and finishes the job."""
    rounds, held, sim = 4, 2, "sim-03"
    data = prepare_data(tmp_path, 2, "iid")
    with fleet(mosquitto, tmp_path, data) as (first, _), Spy(mosquitto) as spy:
        release = threading.Event()
        spy.holding = lambda task: task.round == held and not release.is_set()
        spy.simulate(sim)
        wait_online(first, ["agent-01", "agent-02", sim])
        start_job(first, job_spec("crash", rounds=rounds, devices_per_round=3))

        # round 2 is collecting: both agents' updates are stored (acknowledged), sim holds
        real = wait_until(lambda: u if len(u := spy.updates("crash", held)) == 2 else None, 90)
        for device, payload in real.items():
            key = update_key(decode_as(ModelUpdate, payload, 1 << 30))
            assert [a.ok for a in spy.wait_ack(device, key)] == [True]
        before = get_job(first, "crash")
        assert [r["state"] for r in before["rounds"]] == ["done", "collecting"]
        first.signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL

        second = Coordinator(first.data_dir, mosquitto.env())
        with running(second):
            second.wait_connected(30)
            # the resumed round asks the device that has not answered again, and only it
            wait_until(lambda: len(spy.tasks(sim)) == held + 1, timeout=30)
            release.set()
            job = wait_job(second, "crash", timeout=90)
            assert second.rejections() == {}
            assert "Traceback" not in second.output()
    assert job["state"] == "done", job["message"]
    _check_lineage(job, rounds)
    assert job["rounds"][0] == before["rounds"][0], "round 1 changed after the restart"
    resumed = job["rounds"][1]
    assert resumed["started"] == before["rounds"][1]["started"], "round 2 was started again"
    assert resumed["metrics"]["participants"] == 3
    # the agents sent round 2 once, before the crash; their stored updates were folded in
    sent = spy.all_updates("crash", held)
    assert sorted(d for d, _ in sent) == ["agent-01", "agent-02", sim]
    assert resumed["metrics"]["uplink_bytes"] == sum(len(p) for _, p in sent)
    assert [t.round for t in spy.tasks("agent-01")] == list(range(1, rounds + 1))


def test_update_queued_while_the_coordinator_was_down_counts_after_restart(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """An update that reached the broker while the coordinator was dead is delivered when it
    reconnects (persistent session, QoS 1); the resumed round must count it, not refuse it
    as unknown_job (a regression test: jobs are resumed before MQTT connects, 5da1970)."""
    sim = "sim-01"
    first = Coordinator(tmp_path / "coordinator", mosquitto.env())
    with Spy(mosquitto) as spy:
        with running(first):
            first.wait_connected(30)
            spy.announce_online(sim)
            wait_online(first, [sim])
            start_job(first, job_spec("queued", rounds=1, devices_per_round=1))
            wait_until(lambda: get_job(first, "queued")["rounds"], timeout=10)
            first.signal(signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
        update = zero_update(sim, "queued", 1, "queued.r0")
        spy.publish(sim, DeviceChannel.UPDATE, encode(update))  # queued for the coordinator

        second = Coordinator(first.data_dir, mosquitto.env())
        with running(second):
            second.wait_connected(30)
            acks = spy.wait_ack(sim, update_key(update), timeout=30)
            assert [(a.ok, a.reason) for a in acks] == [(True, "")]
            job = wait_job(second, "queued", timeout=30)
    assert job["state"] == "done", job["message"]
    assert job["rounds"][0]["metrics"]["participants"] == 1
