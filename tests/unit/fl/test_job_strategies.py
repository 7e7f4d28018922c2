"""Strategies inside a running job: a server optimiser whose state survives a restart
(checked against torch's own Adam), and a robust rule that reports itself in the round."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_coordinator import async_rounds, jobs, versions
from cloud_coordinator.job_spec import JobSpec
from cloud_coordinator.job_store import JobStore
from cloud_coordinator.jobs import JobRunner, version_id
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.selection import Candidate
from protocols.messages import ModelUpdate, encode
from protocols.model_format import HEAD_FILE, unpack_tensors
from protocols.tensors import encode_dense
from tests.unit.fl.test_job_runner import Clock, FakePublisher, Head, deltas

ADAM = JobSpec(job_id="adam-job", model_name="adam-digits", rounds=3, devices_per_round=3,
               strategy="fedadam",
               strategy_params={"server_lr": 0.05, "beta1": 0.8, "beta2": 0.9, "eps": 1e-3},
               seed=1)  # fmt: skip
MEDIAN = JobSpec(job_id="med-job", model_name="med-digits", rounds=1, devices_per_round=3,
                 strategy="median", seed=2)  # fmt: skip
DEVICES = ("dev-a", "dev-b", "dev-c")


@pytest.fixture(scope="module")
def seed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("strategies-seed")
    store, models = JobStore(root / "jobs.db"), ModelRegistry(root / "models")
    runner = JobRunner(store, models, FakePublisher(), list, device="cpu")
    runner.create(ADAM)
    runner.create(MEDIAN)
    store.close()
    models.close()
    return root


class Coordinator:
    """A runner over a copy of the seed state, with three online devices."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.open()

    def open(self) -> None:
        self.publisher = FakePublisher()
        self.store = JobStore(self.root / "jobs.db")
        self.models = ModelRegistry(self.root / "models")
        self.online: list[Candidate] = []
        self.runner = JobRunner(self.store, self.models, self.publisher,
                                lambda: list(self.online), device="cpu")  # fmt: skip
        self.runner.start()
        self.runner.stop()
        self.online = [Candidate(d, online=True) for d in DEVICES]

    def restart(self) -> None:
        self.close()
        self.open()

    def close(self) -> None:
        self.runner.stop()
        self.store.close()
        self.models.close()

    def head(self, spec: JobSpec, round_no: int) -> Head:
        files = self.models.files(spec.model, version_id(spec.job_id, round_no))
        return {k: np.asarray(v) for k, v in unpack_tensors(files[HEAD_FILE]).items()}

    def round_of(self, spec: JobSpec, round_no: int, updates: list[Head]) -> None:
        """Run one round of `spec` in which the three devices send `updates` (10 samples)."""
        self.runner.tick()
        base = version_id(spec.job_id, round_no - 1)
        for device, delta in zip(DEVICES, updates, strict=True):
            tensors = tuple(encode_dense(k, v) for k, v in delta.items())
            update = ModelUpdate(device, spec.job_id, round_no, base, 1, 10, tensors)
            self.runner.on_update(device, encode(update), 1 << 24)
        self.runner.tick()


@pytest.fixture
def coordinator(
    seed_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Coordinator]:
    root = tmp_path / "coordinator"
    shutil.copytree(seed_root, root)
    clock = Clock()
    for module in (jobs, async_rounds, versions):
        monkeypatch.setattr(module, "time", clock)
    c = Coordinator(root)
    c.store.set_job(MEDIAN.job_id, state="paused")  # one job at a time per test
    c.restart()
    yield c
    c.close()


def test_fedadam_steps_like_torch_adam_across_a_restart(coordinator: Coordinator) -> None:
    c = coordinator
    start = c.head(ADAM, 0)
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in start.items()}
    p = ADAM.strategy_params
    adam = torch.optim.Adam(list(params.values()), lr=p["server_lr"],
                            betas=(p["beta1"], p["beta2"]), eps=p["eps"])  # fmt: skip
    for round_no in (1, 2, 3):
        updates = [deltas(10 * round_no + i, scale=0.05) for i in range(3)]
        c.round_of(ADAM, round_no, updates)
        mean = {k: sum(u[k] for u in updates) / 3 for k in start}
        for k, param in params.items():
            param.grad = torch.from_numpy(-mean[k])
        adam.step()
        got = c.head(ADAM, round_no)
        for k, param in params.items():
            np.testing.assert_allclose(got[k], param.detach().numpy(), rtol=1e-4, atol=1e-6)
        assert c.store.optimiser_state(ADAM.job_id) is not None
        c.restart()  # the optimiser's moments come back from the store


def test_a_robust_rule_reports_itself_in_the_round_record(coordinator: Coordinator) -> None:
    c = coordinator
    c.store.set_job(ADAM.job_id, state="paused")
    c.store.set_job(MEDIAN.job_id, state="running")
    c.restart()
    updates = [deltas(1), deltas(2), {k: v * 1e4 for k, v in deltas(3).items()}]
    c.round_of(MEDIAN, 1, updates)
    start, got = c.head(MEDIAN, 0), c.head(MEDIAN, 1)
    for k in start:
        expected = start[k] + np.median(np.stack([u[k] for u in updates]), axis=0)
        np.testing.assert_allclose(got[k], expected, rtol=1e-5, atol=1e-6)
    record = c.store.round(MEDIAN.job_id, 1)
    assert record is not None
    assert record.metrics["rule"] == "median"
    assert record.metrics["buffer_device"] == "cpu"
    assert record.metrics["strategy"] == "median"
