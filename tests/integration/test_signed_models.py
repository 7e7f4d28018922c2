"""Signed models end to end over a real Mosquitto: an agent with no key configured trusts
the coordinator's key on first use, trains on its signed versions, and from then on
refuses a tampered or foreign-signed manifest (counted in telemetry's extra)."""

from __future__ import annotations

import dataclasses
import queue
from pathlib import Path

import pytest

from protocols.messages import ModelManifest, Telemetry, decode_as, encode
from protocols.mqtt import InboundMessage, MqttClient, settings_from_config
from protocols.signing import generate_private_key, parse_key, sign_manifest
from protocols.topics import DeviceChannel, ModelChannel, device_topic, model_topic
from tests.broker import Mosquitto
from tests.integration.fl_helpers import fleet, job_spec, prepare_data, start_job, wait_job
from tests.procs import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_an_agent_pins_the_coordinators_key_and_refuses_forgeries(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    data = prepare_data(tmp_path, 1)
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    spy = MqttClient(settings_from_config(mosquitto.broker_config(), "spy"), inbox.put)
    topic = model_topic("digits-mlp", ModelChannel.MANIFEST)
    spy.subscribe(topic, qos=1)
    spy.subscribe(device_topic("agent-01", DeviceChannel.TELEMETRY), qos=0)
    spy.start()
    spy.wait_connected(10)
    try:
        with fleet(mosquitto, tmp_path, data, "--telemetry-interval", "0.5") as (
            coordinator,
            agents,
        ):
            start_job(coordinator, job_spec("signed", rounds=2, devices_per_round=1))
            job = wait_job(coordinator, "signed", timeout=90)
            assert job["state"] == "done", job["message"]
            key = parse_key(coordinator.get("/v1/signing-key")["public_key"])
            pin = tmp_path / "agents" / "agent-01" / "trust" / "model-keys"
            assert parse_key(pin.read_text()) == key
            real = None
            while real is None or real.version != "signed.r2":
                message = inbox.get(timeout=10)
                if message.topic == topic:
                    real = decode_as(ModelManifest, message.payload)
            tampered = dataclasses.replace(real, version="signed.r3", parent_version=real.version)
            forged = sign_manifest(dataclasses.replace(tampered, version="signed.r4"),
                                   generate_private_key())  # fmt: skip
            for fake in (tampered, forged):
                spy.publish(topic, encode(fake), qos=1)

            def rejected() -> dict[str, float] | None:
                message = inbox.get(timeout=10)
                if not message.topic.endswith("/telemetry"):
                    return None
                extra = decode_as(Telemetry, message.payload).extra
                done = extra.get("manifest_rejected_bad_signature") == 1.0
                return extra if done and extra["manifest_rejected_untrusted_key"] == 1.0 else None

            extra = wait_until(rejected, 30)
            assert extra["manifest_rejected_unsigned"] == 0.0
            output = agents[0].output()
            assert output.count("on first use") == 1
            assert "the signature does not match" in output
            assert "Traceback" not in output
    finally:
        spy.stop()
