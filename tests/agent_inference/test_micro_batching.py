"""Micro-batching over the real runtime and digits model: concurrent single samples share
runs and each gets its own answer, feedback ids resolve, metrics count every request,
batches and bad inputs are never held, a failed run fails every request in it, and a row
whose answer overflows fails only its own."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.client import InferenceClient
from agent.errors import InferenceError, InputError
from agent.feedback import RecentInputs
from agent.inference_metrics import InferenceMetrics
from agent.inference_service import InferenceService
from agent.micro_batching import MicroBatcher
from agent.model_store import ModelStore
from agent.predictions import ModelUnavailableError, Predictions
from agent.serving import InferenceRuntime
from cloud_coordinator.baseline import server_backbone
from cloud_coordinator.bundles import initial_bundle
from cloud_coordinator.templates import get_template
from protocols.model_format import MODEL_FILE
from tests.agent_inference.conftest import Bundles, agent_config, put


def _runtime(bundles: Bundles) -> tuple[InferenceRuntime, InferenceMetrics]:
    metrics = InferenceMetrics()
    rt = InferenceRuntime(metrics, RecentInputs(256))
    assert rt.install(bundles.v1.manifest, bundles.v1.files[MODEL_FILE])
    return rt, metrics


def _metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


def _together(batcher: MicroBatcher, samples: list[Any]) -> list[Predictions]:
    """Predict every sample from its own thread, all released at once."""
    gate = threading.Barrier(len(samples))

    def one(x: Any) -> Predictions:
        gate.wait()
        return batcher.predict(x)

    with ThreadPoolExecutor(len(samples)) as pool:
        return list(pool.map(one, samples))


def test_concurrent_samples_share_runs_and_get_their_own_rows(bundles: Bundles) -> None:
    rt, metrics = _runtime(bundles)
    batcher = MicroBatcher(rt, metrics, max_rows=32, wait_s=0.2)
    samples = [bundles.pixels[i].copy() for i in range(16)]
    alone = [rt.predict(x) for x in samples]  # each on its own: the reference answers
    before = metrics.snapshot()
    answers = _together(batcher, samples)
    for got, ref in zip(answers, alone, strict=True):
        assert got.single
        assert got.version == "v1"
        assert got.classes == ref.classes
        assert got.confidences == pytest.approx(ref.confidences, rel=1e-5)
    text = metrics.render()
    assert _metric(text, "fedge_agent_microbatches_total") >= 1
    merged = _metric(text, "fedge_agent_microbatched_requests_total")
    assert merged >= 8  # 16 threads released together within a 200 ms window
    after = metrics.snapshot()
    assert after["inference_ok"] - before["inference_ok"] == 16  # every request counted
    assert after["inference_rows"] - before["inference_rows"] == 16
    assert after["inference_microbatches"] <= 16 - merged


def test_each_answer_takes_feedback_for_its_own_input(bundles: Bundles) -> None:
    rt, metrics = _runtime(bundles)
    batcher = MicroBatcher(rt, metrics, max_rows=8, wait_s=0.2)
    samples = [bundles.pixels[i].copy() for i in range(8)]
    answers = _together(batcher, samples)
    assert len({a.prediction_id for a in answers}) == 8
    for answer, x in zip(answers, samples, strict=True):
        row, model, version = rt.recent.get(answer.row_id(0))
        np.testing.assert_array_equal(row, x / np.float32(16))  # the preprocessed sample
        assert (model, version) == (bundles.v1.manifest.name, "v1")


def test_a_full_batch_runs_without_waiting_out_the_window(bundles: Bundles) -> None:
    rt, metrics = _runtime(bundles)
    batcher = MicroBatcher(rt, metrics, max_rows=4, wait_s=30.0)  # a 30 s window
    done = threading.Event()
    answers: list[Predictions] = []

    def run() -> None:
        answers.extend(_together(batcher, [bundles.pixels[i].copy() for i in range(4)]))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(10), "a batch of max_rows samples waited for its window"
    assert len(answers) == 4
    assert _metric(metrics.render(), "fedge_agent_microbatched_requests_total") == 3


def test_batches_and_bad_inputs_are_not_held(bundles: Bundles) -> None:
    rt, metrics = _runtime(bundles)
    batcher = MicroBatcher(rt, metrics, max_rows=32, wait_s=30.0)  # would hold a sample 30 s
    batch = bundles.pixels[:5].copy()
    answer = batcher.predict(batch)  # a batch of its own: runs at once
    assert not answer.single
    assert len(answer.classes) == 5
    with pytest.raises(InputError):
        batcher.predict(np.zeros(3, dtype=np.float32))  # wrong shape: refused at once
    assert _metric(metrics.render(), "fedge_agent_microbatches_total") == 0


def test_without_a_model_the_runtime_answers_unavailable(bundles: Bundles) -> None:
    metrics = InferenceMetrics()
    batcher = MicroBatcher(InferenceRuntime(metrics, RecentInputs(8)), metrics, 8, 0.05)
    with pytest.raises(ModelUnavailableError):
        batcher.predict(bundles.pixels[0])


class _FailingRuns:
    """A runtime whose checks pass and whose runs fail, as a broken model's would."""

    def __init__(self, rt: InferenceRuntime) -> None:
        self.rt = rt
        self.runs = 0

    def predict(self, x: object) -> Predictions:
        return self.rt.predict(x)

    def sample_row(self, x: object) -> npt.NDArray[Any] | None:
        return self.rt.sample_row(x)

    def predict_rows(self, rows: npt.NDArray[Any], start: float) -> Predictions:
        self.runs += 1
        raise InferenceError(f"session run failed on {len(rows)} rows")


def test_a_failed_run_fails_every_request_in_it(bundles: Bundles) -> None:
    rt, metrics = _runtime(bundles)
    failing = _FailingRuns(rt)
    batcher = MicroBatcher(failing, metrics, max_rows=6, wait_s=5.0)
    gate = threading.Barrier(6)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        gate.wait()
        try:
            batcher.predict(bundles.pixels[i].copy())
        except InferenceError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 6
    assert failing.runs == 1
    assert all("failed on 6 rows" in str(e) for e in errors)
    # the fake runtime counted nothing; the batcher counts the five requests merged into it
    assert 'fedge_agent_predict_requests_total{outcome="error"} 5' in metrics.render()


def test_the_config_turns_it_on_and_checks_its_keys(tmp_path: Path) -> None:
    assert agent_config(tmp_path).inference_batch_wait_ms == 0  # off by default
    on = agent_config(tmp_path, inference_batch_wait_ms=2.5, inference_batch_rows=16)
    assert on.inference_batch_rows == 16
    with pytest.raises(ValueError, match="inference_batch_wait_ms"):
        agent_config(tmp_path, inference_batch_wait_ms=-1)
    with pytest.raises(ValueError, match="inference_batch_rows"):
        agent_config(tmp_path, inference_batch_rows=2048)  # over inference_max_batch
    with pytest.raises(ValueError, match="max_rows"):
        MicroBatcher(_FailingRuns.__new__(_FailingRuns), InferenceMetrics(), 0, 0.01)


def test_http_requests_from_many_clients_are_merged(tmp_path: Path, bundles: Bundles) -> None:
    config = agent_config(tmp_path, inference_batch_wait_ms=200, inference_batch_rows=64)
    store = ModelStore(Path(config.data_dir) / "models")
    put(store, bundles.v1)
    service = InferenceService(config, store, Path(config.data_dir) / "data")
    service.start()
    try:
        assert service.wait_idle(30)
        assert service.server is not None
        url = service.server.url
        samples = [bundles.pixels[i].copy() for i in range(12)]
        reference = [service.runtime.predict(x) for x in samples]
        gate = threading.Barrier(len(samples))

        def one(x: Any) -> Predictions:
            client = InferenceClient.connect(url)
            try:
                gate.wait()
                return client.predict(x)
            finally:
                client.close()

        with ThreadPoolExecutor(len(samples)) as pool:
            answers = list(pool.map(one, samples))
        assert [a.classes for a in answers] == [r.classes for r in reference]
        client = InferenceClient.connect(url)
        try:
            merged = _metric(client.metrics(), "fedge_agent_microbatched_requests_total")
            assert merged >= 1
            client.feedback(answers[3].row_id(0), int(bundles.labels[3]))  # its own input
        finally:
            client.close()
        row, _, _ = service.recent.get(answers[3].row_id(0))
        np.testing.assert_array_equal(row, samples[3] / np.float32(16))
    finally:
        service.stop()


def test_a_row_whose_answer_overflows_fails_only_its_own_request() -> None:
    # machine_health: a finite input of 1e37 overflows in its model (the answers are NaN)
    template = get_template("machine_health")
    bundle, _ = initial_bundle(template, "mh", "v1", seed=0,
                               backbone=server_backbone(template, 0), created=1.0)  # fmt: skip
    metrics = InferenceMetrics()
    rt = InferenceRuntime(metrics, RecentInputs(256))
    assert rt.install(bundle.manifest, bundle.files[MODEL_FILE])
    batcher = MicroBatcher(rt, metrics, max_rows=6, wait_s=30.0)  # runs once six are in
    samples = [np.full(30, 0.5 + i, np.float32) for i in range(6)]
    samples[1][:] = samples[4][:] = 1e37  # finite, so let in; the model overflows on it
    alone = [rt.predict(samples[i]) for i in (0, 2, 3, 5)]
    gate = threading.Barrier(6)
    before = metrics.snapshot()

    def one(x: npt.NDArray[Any]) -> Predictions | InputError:
        gate.wait()
        try:
            return batcher.predict(x)
        except InputError as exc:
            return exc

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, samples))
    for i in (1, 4):
        assert isinstance(answers[i], InputError)
        assert "NaN or Inf" in str(answers[i])
    good = [answers[i] for i in (0, 2, 3, 5)]
    for got, ref in zip(good, alone, strict=True):
        assert isinstance(got, Predictions), got
        assert got.classes == ref.classes
        assert got.confidences == pytest.approx(ref.confidences, rel=1e-5)
    after = metrics.snapshot()
    for key, more in (("inference_ok", 4), ("inference_invalid", 2), ("inference_rows", 4)):
        assert after[key] - before[key] == more, key
    assert after["inference_microbatches"] - before["inference_microbatches"] == 1
    for _ in range(2):  # the runtime's side, on one thread: a size's first run is plain,
        rows = rt.predict_rows(np.stack(samples), 0.0)  # its second bound
        assert [math.isnan(c) for c in rows.confidences] == [i in (1, 4) for i in range(6)]
        assert [rows.classes[i] for i in (0, 2, 3, 5)] == [a.classes[0] for a in alone]
