"""The real agent process: its API on a Unix socket, the MQTT rollback command, telemetry
reporting the served version, and --help. A test's own Mosquitto."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.client import ClientError, InferenceClient
from agent.model_store import ModelStore
from agent.predictions import ModelUnavailableError
from protocols.messages import Ack, Command, Telemetry, decode_as, encode
from protocols.mqtt import InboundMessage, MqttClient, settings_from_config
from protocols.topics import DeviceChannel, device_topic
from tests.agent_inference.conftest import Bundles, put
from tests.broker import Mosquitto
from tests.procs import Agent, running, wait_until

pytestmark = pytest.mark.integration  # a real agent process and a real Mosquitto


def _up(client: InferenceClient) -> dict[str, object] | None:
    try:
        return client.health()
    except (ModelUnavailableError, ClientError):  # not up yet
        return None


def test_rollback_over_mqtt_and_telemetry_report_the_served_version(
    mosquitto: Mosquitto, bundles: Bundles, tmp_path: Path
) -> None:
    state = tmp_path / "dev"
    store = ModelStore(state / "models")
    put(store, bundles.v1)
    put(store, bundles.v2)  # current v2, previous v1
    sock = tmp_path / "api.sock"
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    spy = MqttClient(settings_from_config(mosquitto.broker_config(), "spy"), inbox.put)
    spy.subscribe(device_topic("dev-1", DeviceChannel.ACK), qos=1)
    spy.subscribe(device_topic("dev-1", DeviceChannel.TELEMETRY), qos=0)
    spy.start()
    spy.wait_connected(10)
    agent = Agent("dev-1", state, mosquitto.env(), "--no-train", "--listen", f"unix:{sock}",
                  "--telemetry-interval", "0.5")  # fmt: skip
    client = InferenceClient.connect(f"unix:{sock}")
    try:
        with running(agent):
            health = wait_until(lambda: _up(client), 60)
            assert health["version"] == "v2"
            wait_until(lambda: client.model()["previous_version"] == "v1", 30)
            assert client.predict(bundles.pixels[0]).version == "v2"
            command = Command("cmd-1", "rollback", time.time())
            spy.publish(device_topic("dev-1", DeviceChannel.CMD), encode(command), qos=1)
            ack = None
            served: dict[str, str] = {}
            deadline = time.monotonic() + 20
            while (ack is None or served.get("digits-mlp") != "v1") and time.monotonic() < deadline:
                try:
                    message = inbox.get(timeout=1)
                except queue.Empty:
                    continue
                if message.topic.endswith("/ack"):
                    ack = decode_as(Ack, message.payload)
                else:
                    served = decode_as(Telemetry, message.payload).model_versions
            assert ack is not None
            assert (ack.ref, ack.ok) == ("cmd-1", True), ack
            assert served.get("digits-mlp") == "v1"
            assert client.predict(bundles.pixels[0]).version == "v1"
            assert "model_rollbacks_total 1" in client.metrics()
        assert agent.wait() == 0
    finally:
        client.close()
        spy.stop()
    assert ModelStore(state / "models").current("digits-mlp").version == "v1"  # type: ignore[union-attr]


def test_help_names_the_inference_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--no-inference", "--listen", "--model", "--inference-threads", "--providers"):
        assert flag in out
    assert "/v1/predict" in out
