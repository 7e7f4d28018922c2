"""Malicious and faulty devices against a real job: three real agents, two devices that
send huge random updates, and one that sends every kind of malformed update before a
valid one, all over a real Mosquitto. The median keeps the model learning; every malformed
update is refused with its reason before it touches the aggregate; no published version
holds NaN or Inf."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bench.attacks import FAULTS, attack, dense_update, faulty
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.templates import get_template
from protocols.messages import TrainTask, encode
from protocols.model_format import HEAD_FILE, head_shapes, unpack_tensors
from protocols.topics import DeviceChannel
from tests.broker import Mosquitto
from tests.integration.fl_helpers import (
    TEMPLATE,
    Spy,
    fleet,
    job_spec,
    prepare_data,
    rounds_done,
    start_job,
    wait_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHAPES = head_shapes(get_template(TEMPLATE).head_layers)
Answer = Callable[[TrainTask], list[bytes]]


def malicious(device_id: str, seed: int) -> Answer:
    """Answers each task with Gaussian noise a thousand times an honest update's size."""
    rng = np.random.default_rng(seed)
    base = {n: np.full(s, 0.01, dtype=np.float32) for n, s in SHAPES.items()}

    def answer(task: TrainTask) -> list[bytes]:
        delta = attack(base, "noise", 1000.0, rng)
        update = dense_update(device_id, task.job_id, task.round, task.base_version, 1, 200,
                              delta)  # fmt: skip
        return [encode(update)]

    return answer


def broken(device_id: str) -> Answer:
    """Answers each task with one update of every fault, then a valid (zero) one."""
    zero = {n: np.zeros(s, dtype=np.float32) for n, s in SHAPES.items()}

    def answer(task: TrainTask) -> list[bytes]:
        good = dense_update(device_id, task.job_id, task.round, task.base_version, 1, 50, zero)
        bad = [encode(faulty(good, kind, zero)) for kind in FAULTS]
        return [*bad, encode(good)]

    return answer


class Adversaries(Spy):
    """Plays devices without agents: each goes online and answers every task it is sent."""

    def play(self, players: dict[str, Answer]) -> None:
        for device_id in players:
            self.announce_online(device_id)

        def respond() -> None:
            answered: set[str] = set()
            while not self._stop.wait(0.05):
                for device_id, answer in players.items():
                    for task in self.tasks(device_id):
                        if task.task_id not in answered:
                            answered.add(task.task_id)
                            for payload in answer(task):
                                self.publish(device_id, DeviceChannel.UPDATE, payload)

        self._responder = threading.Thread(target=respond, name="adversaries", daemon=True)
        self._responder.start()


def test_median_survives_malicious_devices_and_refuses_faulty_updates(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    data = prepare_data(tmp_path, 3, "iid")
    with fleet(mosquitto, tmp_path, data) as (coordinator, _), Adversaries(mosquitto) as adv:
        adv.play({"evil-1": malicious("evil-1", 1), "evil-2": malicious("evil-2", 2),
                  "broken-1": broken("broken-1")})  # fmt: skip
        spec = job_spec("robust", rounds=3, devices_per_round=6, strategy="median")
        start_job(coordinator, spec)
        job = wait_job(coordinator, "robust", timeout=120)
        rejections = coordinator.rejections()
        acks = adv.acks("broken-1")
        models = ModelRegistry(coordinator.data_dir / "models")
        try:
            model = job["spec"]["template"].replace("_", "-")
            heads = [
                unpack_tensors(models.files(model, r["new_version"])[HEAD_FILE])
                for r in rounds_done(job)
            ]
        finally:
            models.close()
    assert job["state"] == "done", job["message"]
    done = rounds_done(job)
    assert len(done) == 3
    for r in done:
        assert r["metrics"]["participants"] == 6  # the broken device's valid update too
        assert r["metrics"]["rule"] == "median"
    accuracy = [r["metrics"]["accuracy"] for r in done]
    assert accuracy[-1] >= 0.8, accuracy  # the malicious devices did not take over
    for head in heads:
        assert all(np.isfinite(a).all() for a in head.values())
    reasons = {reason for (channel, reason) in rejections if channel == "update"}
    assert {"non_finite", "bad_shape", "bad_tensor", "stale"} <= reasons, rejections
    refused = [a.reason for a in acks if not a.ok]
    assert refused.count("non_finite") == 2 * 3  # NaN and Inf, every round
    assert refused.count("stale") == 3
