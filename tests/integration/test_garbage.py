"""Garbage on every topic the coordinator subscribes to is counted, and it keeps serving."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import pytest

from cloud_coordinator.ingest import SUBSCRIBED
from protocols.messages import (
    Ack,
    BlobRequest,
    InferenceRequest,
    ModelUpdate,
    Status,
    Telemetry,
    encode,
)
from protocols.mqtt import MqttClient, settings_from_config
from protocols.tensors import encode_dense
from protocols.topics import ROOT, DeviceChannel, device_topic
from tests.broker import Mosquitto
from tests.procs import Agent, Coordinator, running, wait_until

pytestmark = pytest.mark.integration
MAX_PAYLOAD = 64 * 1024


def _valid(channel: str, device_id: str) -> bytes:
    if channel == "status":
        return encode(Status(device_id, "online", time.time(), "9.9"))
    if channel == "telemetry":
        return encode(Telemetry(device_id, time.time(), 1, 1.0, 1.0, 1, 1))
    if channel == "update":
        tensor = encode_dense("head.0.weight", [[0.0, 1.0]])
        return encode(ModelUpdate(device_id, "job-g", 1, "job-g.r0", 1, 10, (tensor,)))
    if channel == "blob/req":
        return encode(BlobRequest(device_id, "0" * 64, (0,), "req-1"))
    if channel == "infer/req":  # names no device: its reply address is what is checked
        reply_to = device_topic(device_id, DeviceChannel.INFER_RESPONSE)
        tensor = encode_dense("input", [[0.0] * 64])
        return encode(InferenceRequest("q-1", "digits-mlp", (tensor,), reply_to, time.time()))
    return encode(Ack("cmd-1", True, time.time()))


def _garbage(channel: str) -> dict[str, bytes]:
    """Payloads that must be rejected, by the reason the coordinator should count."""
    good = msgpack.unpackb(_valid(channel, "dev-g"))
    wrong_kind = "telemetry" if channel != "telemetry" else "status"
    cases = {
        "malformed": os.urandom(200),
        "too_large": b"\x00" * (MAX_PAYLOAD + 1),
        "unknown_kind": msgpack.packb({"v": 1, "kind": "nonsense"}),
        "wrong_kind": _valid(wrong_kind, "dev-g"),
        "version": msgpack.packb({**good, "v": 2}),
        "missing_field": msgpack.packb({"v": 1, "kind": good["kind"]}),
    }
    if channel == "infer/req":
        cases["bad_reply_to"] = _valid(channel, "someone-else")
    elif channel != "ack":
        cases["device_mismatch"] = _valid(channel, "someone-else")
    return cases


def test_garbage_on_every_subscribed_topic_is_counted(mosquitto: Mosquitto, tmp_path: Path) -> None:
    env = {**mosquitto.env(), "FEDGE_MQTT_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD)}
    coordinator = Coordinator(tmp_path / "coordinator", env)
    sender = MqttClient(settings_from_config(mosquitto.broker_config(), "garbage"), lambda m: None)
    with running(coordinator):
        coordinator.wait_connected()
        sender.start()
        sender.wait_connected(5)
        expected: dict[tuple[str, str], int] = {}
        for channel in SUBSCRIBED:
            topic = device_topic("dev-g", channel)
            for reason, payload in _garbage(channel.value).items():
                sender.publish(topic, payload, qos=1).wait(5)
                expected[(channel.value, reason)] = 1
        # a device id Fedge does not allow, on a topic the coordinator's filter matches
        sender.publish(f"{ROOT}/dev/bad id!/status", b"x", qos=1).wait(5)
        expected[("unknown", "topic")] = 1
        wait_until(lambda: sum(coordinator.rejections().values()) >= len(expected), 10)
        sender.stop()
        counts = coordinator.rejections()
        for key, n in expected.items():
            assert counts.get(key) == n, f"{key}: {counts}"
        # still serving: healthy, and a real agent still comes online
        assert coordinator.process.poll() is None
        assert coordinator.get("/healthz")["status"] == "ok"
        metrics = coordinator.metrics()
        assert 'fedge_messages_rejected_total{channel="status",reason="malformed"} 1' in metrics
        agent = Agent("dev-ok", tmp_path / "ok", mosquitto.env())
        with running(agent):
            wait_until(lambda: (r := coordinator.device("dev-ok")) and r.online, 5)
        assert "Traceback" not in coordinator.output()
