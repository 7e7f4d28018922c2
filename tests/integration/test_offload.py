"""Hybrid offload over a real Mosquitto: a low-confidence prediction answered by a real
coordinator's model (MQTT 5 request/response), and the local answer at the deadline when
no coordinator answers; low-confidence inputs kept as training candidates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import ClientError, InferenceClient
from agent.model_store import ModelStore
from agent.predictions import ModelUnavailableError
from tests.agent_inference.conftest import Bundles, make_bundles, put
from tests.broker import Mosquitto
from tests.integration.fl_helpers import job_spec, start_job
from tests.procs import Agent, Coordinator, running, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def bundles() -> Bundles:
    """digits-mlp v1 and v2 (exported once for this module)."""
    return make_bundles()


def _predict_json(client: InferenceClient, x: object) -> dict[str, Any] | None:
    try:
        return client._map("POST", "/v1/predict", {"input": x})  # the raw JSON answer
    except (ModelUnavailableError, ClientError):
        return None


@pytest.mark.wallclock  # (the cloud's first answer must come within the 5-s deadline)
def test_a_low_confidence_prediction_is_answered_by_the_coordinator(
    mosquitto: Mosquitto, bundles: Bundles, tmp_path: Path
) -> None:
    coordinator = Coordinator(tmp_path / "coordinator", mosquitto.env())
    sock = tmp_path / "api.sock"
    env = {**mosquitto.env(), "FEDGE_OFFLOAD_THRESHOLD": "1.0", "FEDGE_OFFLOAD_TIMEOUT_MS": "5000"}
    agent = Agent("cam-1", tmp_path / "cam", env, "--no-train", "--model", "digits-mlp",
                  "--offload", "--listen", f"unix:{sock}")  # fmt: skip
    client = InferenceClient.connect(f"unix:{sock}")
    try:
        with running(coordinator, agent):
            coordinator.wait_connected(30)
            start_job(coordinator, job_spec("cloudy", rounds=1))  # registers cloudy.r0
            pixels = bundles.pixels[:3].tolist()
            answer = wait_until(lambda: _predict_json(client, pixels), 60, interval=0.5)
            assert answer["version"] == "cloudy.r0"  # served locally: the same version
            assert answer["source"] == "cloud", answer
            assert answer["cloud_version"] == "cloudy.r0"
            rows = answer["predictions"]
            assert isinstance(rows, list)
            assert {r["source"] for r in rows} == {"cloud"}
            metrics = client.metrics()
            assert 'fedge_agent_offload_requests_total{outcome="answered"} 1' in metrics
        assert "Traceback" not in agent.output()
    finally:
        client.close()


def test_without_an_answer_the_local_prediction_is_used_at_the_deadline(
    mosquitto: Mosquitto, bundles: Bundles, tmp_path: Path
) -> None:
    state = tmp_path / "cam"
    put(ModelStore(state / "models"), bundles.v1)
    dataset = tmp_path / "data"
    sock = tmp_path / "api.sock"
    env = {**mosquitto.env(), "FEDGE_OFFLOAD_THRESHOLD": "1.0",
           "FEDGE_OFFLOAD_TIMEOUT_MS": "200", "FEDGE_KEEP_LOW_CONFIDENCE": "true"}  # fmt: skip
    agent = Agent("cam-2", state, env, "--no-train", "--offload", "--listen", f"unix:{sock}",
                  "--dataset-dir", str(dataset))  # fmt: skip
    client = InferenceClient.connect(f"unix:{sock}")
    try:
        with running(agent):
            x = bundles.pixels[0].tolist()
            answer = wait_until(lambda: _predict_json(client, x), 60, interval=0.5)
            assert (answer["source"], answer["version"]) == ("local", "v1")
            assert "cloud_version" not in answer
            metrics = client.metrics()
            assert 'fedge_agent_offload_requests_total{outcome="timeout"} 1' in metrics
            assert "fedge_agent_low_confidence_kept_total 1" in metrics
        with np.load(dataset / "candidates.npz", allow_pickle=False) as kept:
            assert kept["x"].shape == (1, 64)
    finally:
        client.close()
