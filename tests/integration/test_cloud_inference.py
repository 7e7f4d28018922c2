"""Hybrid offload, the cloud side, over a real Mosquitto with MQTT 5 request/response: a
device asks, the coordinator answers on the device's response topic with the correlation
data it was given, before the deadline."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import pytest

from protocols.messages import InferenceRequest, InferenceResponse, decode_as, encode
from protocols.mqtt import InboundMessage, MqttClient, settings_from_config
from protocols.tensors import decode_tensor, encode_dense
from protocols.topics import DeviceChannel, device_topic
from tests.broker import Mosquitto
from tests.integration.fl_helpers import job_spec, start_job
from tests.procs import Coordinator

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_coordinator_answers_an_offloaded_prediction(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    coordinator = Coordinator(tmp_path / "coordinator", mosquitto.env())
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    device = MqttClient(settings_from_config(mosquitto.broker_config(), "cam-9"), inbox.put)
    response_topic = device_topic("cam-9", DeviceChannel.INFER_RESPONSE)
    device.subscribe(response_topic, qos=0)
    try:
        coordinator.wait_connected(30)
        start_job(coordinator, job_spec("cloud-model", rounds=1))  # registers digits-mlp r0
        device.start()
        device.wait_connected(10)
        x = np.random.default_rng(0).random((2, 64), dtype=np.float32)
        request = InferenceRequest("q-1", "digits-mlp", (encode_dense("input", x),),
                                   response_topic, time.time() + 10)  # fmt: skip
        device.publish(device_topic("cam-9", DeviceChannel.INFER_REQUEST), encode(request),
                       qos=1, response_topic=response_topic, correlation=b"\x01q-1")  # fmt: skip
        answer = inbox.get(timeout=20)
        assert answer.topic == response_topic
        assert answer.correlation == b"\x01q-1"
        response = decode_as(InferenceResponse, answer.payload)
        assert (response.request_id, response.model_version, response.error) == (
            "q-1", "cloud-model.r0", "",
        )  # fmt: skip
        logits = decode_tensor(response.outputs[0])
        assert logits.shape == (2, 10)
        assert np.all(np.isfinite(logits))
    finally:
        device.stop()
        coordinator.stop()
