"""The local API over real HTTP (loopback TCP and a Unix socket) and in-process."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from agent.client import InferenceClient
from agent.feedback import FeedbackError
from agent.inference_service import InferenceService
from agent.local_data import load_local_data
from agent.model_store import ModelStore
from agent.onnx_runtime import InputError
from agent.openapi import OPENAPI
from agent.serving import ModelUnavailableError
from tests.agent_inference.conftest import Bundles, agent_config, broken, put


@pytest.fixture(params=["tcp-json", "tcp-msgpack", "unix-json", "in-process"])
def client(request: pytest.FixtureRequest, service: InferenceService) -> Iterator[InferenceClient]:
    """A client of `service` in each mode."""
    if request.param == "in-process":
        yield InferenceClient.in_process(service)
        return
    assert service.server is not None
    address = service.server.url
    if request.param.startswith("unix"):
        unix = ApiOnUnix(service, Path(service.config.data_dir) / "api.sock")
        address = unix.url
    c = InferenceClient.connect(address, use_msgpack=request.param.endswith("msgpack"))
    yield c
    c.close()
    if request.param.startswith("unix"):
        unix.stop()


class ApiOnUnix:
    """A second API server of the same service on a Unix socket."""

    def __init__(self, service: InferenceService, path: Path) -> None:
        from agent.config import ListenAddress
        from agent.http_api import ApiServer

        self.server = ApiServer(service, ListenAddress(path=str(path)))
        self.server.start()
        self.url = self.server.url

    def stop(self) -> None:
        self.server.stop()


def test_predict_single_and_batch(client: InferenceClient, bundles: Bundles) -> None:
    one = client.predict(bundles.pixels[5])
    assert one.single
    assert one.version == "v1"
    assert one.model == "digits-mlp"
    batch = client.predict(bundles.pixels[:16])
    assert not batch.single
    assert len(batch.classes) == 16
    assert batch.classes[5] == one.classes[0]
    assert batch.labels[5] == one.labels[0]
    assert batch.confidences[5] == pytest.approx(one.confidences[0], rel=1e-5)
    assert batch.row_id(5) == f"{batch.prediction_id}.5"
    lists = client.predict(bundles.pixels[:2].tolist())
    assert lists.classes == batch.classes[:2]


def test_a_wrong_shape_is_a_clear_400(client: InferenceClient, bundles: Bundles) -> None:
    with pytest.raises(InputError, match=r"shape \(N, 64\), got \(3, 10\)"):
        client.predict(np.zeros((3, 10), np.float32))


def test_feedback_reaches_the_local_training_data(
    client: InferenceClient, service: InferenceService, bundles: Bundles, tmp_path: Path
) -> None:
    data = Path(service.config.data_dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    x = (bundles.pixels[:20] / 16.0).astype(np.float32)
    np.savez(data / "train.npz", x=x[:10], y=bundles.labels[:10])
    np.savez(data / "val.npz", x=x[10:], y=bundles.labels[10:20])
    batch = client.predict(bundles.pixels[100:104])
    assert client.feedback(batch.row_id(2), "7")["stored"]
    assert client.feedback(client.predict(bundles.pixels[200]).prediction_id, 3)["rows"] == 2
    local = load_local_data(data)
    assert local.train_samples == 12
    np.testing.assert_allclose(local.x_train[10], bundles.pixels[102] / 16.0, rtol=1e-6)
    assert local.y_train[10:].tolist() == [7, 3]
    with pytest.raises(FeedbackError, match="unknown prediction id"):
        client.feedback("nope", 1)
    with pytest.raises(FeedbackError, match="unknown label"):
        client.feedback(batch.row_id(0), "cat")
    assert 'fedge_agent_feedback_total{outcome="stored"} 2' in client.metrics()


def test_model_health_metrics_and_rollback(
    client: InferenceClient, service: InferenceService, bundles: Bundles
) -> None:
    assert client.health()["version"] == "v1"
    put(service.store, bundles.v2)
    service.model_activated(bundles.v2.manifest)
    assert service.wait_idle(30)
    info = client.model()
    assert (info["model"], info["version"], info["previous_version"]) == ("digits-mlp", "v2", "v1")
    client.predict(bundles.pixels[:3])
    client.predict(bundles.pixels[0])
    text = client.metrics()
    assert 'fedge_agent_predict_requests_total{outcome="ok"} 2' in text
    assert "fedge_agent_predictions_total 4" in text
    assert 'fedge_agent_predict_latency_seconds_bucket{le="+Inf"} 2' in text
    assert "fedge_agent_prediction_confidence_count 4" in text
    assert 'fedge_agent_model_info{model="digits-mlp",version="v2",role="serving"} 1' in text
    assert 'fedge_agent_model_info{model="digits-mlp",version="v1",role="standby"} 1' in text
    after = client.rollback()
    assert (after["version"], after["previous_version"]) == ("v1", None)
    assert client.predict(bundles.pixels[0]).version == "v1"
    store = service.store
    assert store.current("digits-mlp").version == "v1"  # type: ignore[union-attr]
    assert "v2" in store.blocked("digits-mlp")
    with pytest.raises(ModelUnavailableError):
        client.rollback()


def _raw(service: InferenceService, method: str, path: str, body: bytes = b"",
         content_type: str = "application/json") -> tuple[int, bytes, str]:  # fmt: skip
    assert service.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", service.server.address.port, timeout=10)
    conn.request(method, path, body=body or None, headers={"Content-Type": content_type})
    response = conn.getresponse()
    out = response.status, response.read(), response.getheader("Content-Type") or ""
    conn.close()
    return out


def test_raw_http_statuses(service: InferenceService, bundles: Bundles) -> None:
    status, body, _ = _raw(service, "POST", "/v1/predict", b'{"input": [1, 2')
    assert status == 400
    assert b"not valid JSON" in body
    assert _raw(service, "POST", "/v1/predict", b"{}")[0] == 400
    assert _raw(service, "POST", "/v1/predict", b"x", "text/plain")[0] == 415
    assert _raw(service, "GET", "/nope")[0] == 404
    payload = msgpack.packb({"input": {"dtype": "float32", "shape": [2, 64],
                                       "data": bundles.pixels[:2].tobytes()}})  # fmt: skip
    status, body, kind = _raw(service, "POST", "/v1/predict", payload, "application/msgpack")
    assert status == 200
    assert kind == "application/msgpack"
    assert len(msgpack.unpackb(body)["predictions"]) == 2
    bad = msgpack.packb({"input": {"dtype": "float32", "shape": [2, 64], "data": b"xx"}})
    assert _raw(service, "POST", "/v1/predict", bad, "application/msgpack")[0] == 400
    status, body, _ = _raw(service, "GET", "/openapi.json")
    assert status == 200
    assert json.loads(body) == json.loads(json.dumps(OPENAPI))
    assert 'outcome="invalid"} 4' in _raw(service, "GET", "/metrics")[1].decode()


def test_the_openapi_document_covers_every_endpoint() -> None:
    assert OPENAPI["openapi"].startswith("3.")
    paths = {"/v1/predict", "/v1/model", "/v1/feedback", "/v1/rollback", "/healthz"}
    assert set(OPENAPI["paths"]) == paths | {"/metrics", "/openapi.json"}


def test_health_is_503_without_a_model(tmp_path: Path) -> None:
    config = agent_config(tmp_path)
    svc = InferenceService(config, ModelStore(tmp_path / "models"), tmp_path / "data")
    svc.start()
    try:
        assert _raw(svc, "GET", "/healthz")[0] == 503
        assert _raw(svc, "POST", "/v1/predict", b'{"input": [[0]]}')[0] == 503
    finally:
        svc.stop()


def test_http_swaps_under_concurrent_load_fail_no_request(
    service: InferenceService, bundles: Bundles
) -> None:
    assert service.server is not None
    address = service.server.url
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0] * 4

    def load(i: int) -> None:
        c = InferenceClient.connect(address, use_msgpack=i % 2 == 1)
        while not stop.is_set():
            try:
                c.predict(bundles.pixels[i : i + 2])
                done[i] += 1
            except BaseException as exc:
                errors.append(exc)
        c.close()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    versions = [bundles.v2, bundles.v1]
    for k in range(6):
        b = versions[k % 2]
        assert service.runtime.install(b.manifest, b.files["model.onnx"])
    bad = broken(bundles.v1, "bad", b"garbage")
    assert not service.runtime.install(bad.manifest, bad.files["model.onnx"])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert sum(done) > 0
