"""Cloud inference: answers with the newest fp32 version, refuses what it must, drops the
expired, and says 'busy' rather than queue without bound. A real registry, real ONNX."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cloud_coordinator import bundles
from cloud_coordinator import cloud_inference as ci
from cloud_coordinator.cloud_inference import CloudInference
from cloud_coordinator.ingest import Ingest
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.templates import get_template
from protocols.errors import DecodeError
from protocols.messages import InferenceRequest, InferenceResponse, decode_as, encode
from protocols.tensors import WireTensor, decode_tensor, encode_dense

RESP = "fedge/v1/dev/cam-1/infer/resp"
REQ = "fedge/v1/dev/cam-1/infer/req"


@dataclass
class Sent:
    topic: str
    response: InferenceResponse
    correlation: bytes


class Responder:
    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
        response_topic: str = "", correlation: bytes = b"",
    ) -> object:  # fmt: skip
        self.sent.append(Sent(topic, decode_as(InferenceResponse, payload), correlation))
        return None


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelRegistry]:
    template = get_template("digits_mlp")
    models = ModelRegistry(tmp_path_factory.mktemp("ci") / "models")
    b0, _ = bundles.initial_bundle(template, "digits-mlp", "j.r0", 0)
    rng = np.random.default_rng(0)
    head = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32)
            for k, v in b0.head_state().items()}  # fmt: skip
    b1 = bundles.next_bundle(b0, head, "j.r1")
    models.put(b0, job_id="j", round=0, devices=(), metrics={})
    models.put(b1, job_id="j", round=1, devices=(), metrics={})
    yield models
    models.close()


def request(x: np.ndarray, *, deadline: float = 1e12, model: str = "digits-mlp",
            reply_to: str = RESP) -> bytes:  # fmt: skip
    return encode(InferenceRequest("r-1", model, (encode_dense("input", x),), reply_to, deadline))


def served(
    registry: ModelRegistry, *payloads: bytes, now: float = 0.0, rolled_back: tuple[str, ...] = ()
) -> Responder:
    responder = Responder()
    cloud = CloudInference(
        registry, responder, clock=lambda: now,
        rolled_back=lambda name: rolled_back if name == "digits-mlp" else (),
    )  # fmt: skip
    for payload in payloads:
        cloud.on_request("cam-1", payload, 1 << 20, RESP, b"corr-7")
    cloud.start()
    cloud.stop()  # drains the queue first
    return responder


def test_answers_with_the_newest_version_and_echoes_the_correlation(
    registry: ModelRegistry,
) -> None:
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    (sent,) = served(registry, request(x)).sent
    assert (sent.topic, sent.correlation) == (RESP, b"corr-7")
    assert (sent.response.request_id, sent.response.model_version) == ("r-1", "j.r1")
    assert sent.response.error == ""
    expected = bundles.logits(registry.files("digits-mlp", "j.r1")["model.onnx"], x)
    np.testing.assert_allclose(decode_tensor(sent.response.outputs[0]), expected, rtol=1e-5)


def test_a_version_rolled_back_on_the_fleet_does_not_answer(registry: ModelRegistry) -> None:
    x = np.random.default_rng(1).random((2, 64), dtype=np.float32)
    (sent,) = served(registry, request(x), rolled_back=("j.r1",)).sent
    assert sent.response.model_version == "j.r0"  # the newest one the canary did not refuse
    expected = bundles.logits(registry.files("digits-mlp", "j.r0")["model.onnx"], x)
    np.testing.assert_allclose(decode_tensor(sent.response.outputs[0]), expected, rtol=1e-5)
    (sent,) = served(registry, request(x), rolled_back=("j.r0", "j.r1")).sent
    assert sent.response.model_version == "j.r1"  # every one refused: still the newest


def test_a_sparse_input_claiming_a_huge_shape_is_refused_before_it_is_built(
    registry: ModelRegistry,
) -> None:
    huge = WireTensor("input", "f32", (1024, 1 << 18), b"", indices=b"")  # 1 GiB expanded
    payload = encode(InferenceRequest("r-1", "digits-mlp", (huge,), RESP, 1e12))
    tracemalloc.start()
    try:
        (sent,) = served(registry, payload).sent
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent.response.error.startswith("bad input")
    assert "exceeds" in sent.response.error
    assert peak < 64 * 1024 * 1024


def test_errors_and_expired_requests_are_answered(registry: ModelRegistry) -> None:
    x = np.zeros((1, 64), np.float32)
    skew = ci.SKEW_TOLERANCE_S
    responder = served(
        registry,
        request(x, model="no-such"),
        request(np.zeros((1, 7), np.float32)),
        request(x, deadline=-skew - 1),  # expired (by more than clock skew) before served
        request(x, deadline=-skew + 1),  # late by less than a likely skew: served
    )
    errors = [s.response.error for s in responder.sent]
    assert len(errors) == 4
    assert "no model 'no-such'" in errors[0]
    assert "refused input (1, 7)" in errors[1]
    assert errors[2].startswith("expired")  # said, so the device need not wait it out
    assert errors[3] == ""


def test_reply_addresses_other_than_the_devices_own_are_refused(
    registry: ModelRegistry,
) -> None:
    cloud = CloudInference(registry, Responder())
    x = np.zeros((1, 64), np.float32)
    for payload, prop in [(request(x, reply_to="fedge/v1/dev/other/cmd"), ""),
                          (request(x), "fedge/v1/dev/other/infer/resp")]:  # fmt: skip
        with pytest.raises(DecodeError) as info:
            cloud.on_request("cam-1", payload, 1 << 20, prop, b"")
        assert info.value.reason == "bad_reply_to"


def test_a_full_queue_answers_busy_at_once(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ci, "QUEUE_LIMIT", 1)
    responder = Responder()
    cloud = CloudInference(registry, responder)  # not started: nothing drains the queue
    x = np.zeros((1, 64), np.float32)
    cloud.on_request("cam-1", request(x), 1 << 20)
    cloud.on_request("cam-1", request(x), 1 << 20)
    (sent,) = responder.sent
    assert sent.response.error.startswith("busy")
    assert cloud.counts["busy"] == 1


def test_ingest_routes_requests_and_counts_refusals(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    from cloud_coordinator.registry import Registry

    store = Registry(tmp_path / "coordinator.db")
    responder = Responder()
    cloud = CloudInference(registry, responder)
    ingest = Ingest(store, 1 << 20, inference=cloud)
    x = np.zeros((2, 64), np.float32)
    assert ingest.handle(REQ, request(x), 0.0, response_topic=RESP, correlation=b"c")
    assert not ingest.handle(REQ, b"\xc1garbage", 0.0)
    assert not ingest.handle(REQ, request(x, reply_to="fedge/v1/dev/x/cmd"), 0.0)
    cloud.start()
    cloud.stop()
    assert [s.correlation for s in responder.sent] == [b"c"]
    assert ingest.rejected[("infer/req", "bad_reply_to")] == 1
    store.close()
