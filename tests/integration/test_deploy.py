"""Deployments over a real Mosquitto: a real agent follows its retained deploy topic,
fetches the version's blobs over MQTT (a fake cloud answers the blob requests), serves a
good version and acknowledges it, and refuses a broken or unsigned one with the reason
while the previous version keeps serving; and an older deployment replayed on the topic
does not downgrade it."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from agent.client import ClientError, InferenceClient
from agent.predictions import ModelUnavailableError
from cloud_coordinator.bundles import Bundle
from cloud_coordinator.deployments import DeploymentSigner
from protocols.chunks import split_blob
from protocols.messages import (
    Ack,
    BlobRequest,
    Command,
    ModelManifest,
    Telemetry,
    decode_as,
    encode,
)
from protocols.mqtt import InboundMessage, MqttClient, settings_from_config
from protocols.signing import (
    generate_private_key,
    key_text,
    public_key,
    sign_manifest,
)
from protocols.topics import DeviceChannel, device_topic
from tests.agent_inference.conftest import Bundles, broken, make_bundles
from tests.broker import Mosquitto
from tests.procs import Agent, running, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DEV = "dev-9"


class FakeCloud:
    """Publishes deployments, numbered and signed by the coordinator's own code
    (`DeploymentSigner`, its counter in a database under `db_dir`), and answers the
    device's blob requests with chunks."""

    def __init__(self, mosquitto: Mosquitto, key: bytes, db_dir: Path) -> None:
        self.signer = DeploymentSigner(db_dir / "coordinator.db", key)
        self.blobs: dict[str, bytes] = {}
        self.acks: queue.Queue[Ack] = queue.Queue()
        self.telemetry: queue.Queue[Telemetry] = queue.Queue()
        self.client = MqttClient(
            settings_from_config(mosquitto.broker_config(), "fake-cloud"), self._on_message
        )
        self.client.subscribe(device_topic(DEV, DeviceChannel.BLOB_REQUEST), qos=1)
        self.client.subscribe(device_topic(DEV, DeviceChannel.ACK), qos=1)
        self.client.subscribe(device_topic(DEV, DeviceChannel.TELEMETRY), qos=1)
        self.client.start()
        self.client.wait_connected(10)
        self._lock = threading.Lock()

    def _on_message(self, message: InboundMessage) -> None:
        if message.topic.endswith("/ack"):
            self.acks.put(decode_as(Ack, message.payload))
            return
        if message.topic.endswith("/telemetry"):
            self.telemetry.put(decode_as(Telemetry, message.payload))
            return
        request = decode_as(BlobRequest, message.payload)
        blob = self.blobs.get(request.blob_sha256)
        for chunk in split_blob(blob or b"", 64 * 1024) if blob else ():
            if not request.indices or chunk.index in request.indices:
                self.client.publish(device_topic(DEV, DeviceChannel.BLOB), encode(chunk), qos=1)

    def deploy(self, bundle: Bundle, manifest: ModelManifest) -> bytes:
        """Deploy `manifest` (its blobs from `bundle`) as the next deployment; its bytes."""
        for entry in manifest.files:
            self.blobs[entry.sha256] = bundle.files[entry.name]
        payload = self.signer.payload(DEV, manifest)
        self.publish(payload)
        return payload

    def publish(self, payload: bytes) -> None:
        """Put `payload` on the device's deploy topic, retained (what an attacker can do too)."""
        self.client.publish(device_topic(DEV, DeviceChannel.DEPLOY), payload, qos=1, retain=True)

    def rejected(self, reason: str, timeout: float = 30) -> float:
        """The device's count of messages refused for `reason`, once it is not 0."""
        ask = Command(f"tel-{time.monotonic_ns()}", "telemetry", time.time())
        self.client.publish(device_topic(DEV, DeviceChannel.CMD), encode(ask), qos=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                count = self.telemetry.get(timeout=1).extra.get(f"message_rejected_{reason}")
            except queue.Empty:
                continue
            if count:
                return count
        raise AssertionError(f"no message_rejected_{reason} in telemetry within {timeout}s")

    def ack(self, ref: str, timeout: float = 60) -> Ack:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ack = self.acks.get(timeout=1)
            except queue.Empty:
                continue
            if ack.ref == ref:
                return ack
        raise AssertionError(f"no ack {ref} within {timeout}s")


@pytest.fixture(scope="module")
def bundles() -> Bundles:
    """digits-mlp v1 and v2 (exported once for this module)."""
    return make_bundles()


def _version(client: InferenceClient) -> str | None:
    try:
        return str(client.model()["version"])
    except (ModelUnavailableError, ClientError):
        return None


def test_deployments_are_served_acknowledged_and_refused_with_the_reason(
    mosquitto: Mosquitto, bundles: Bundles, tmp_path: Path
) -> None:
    key = generate_private_key()
    cloud = FakeCloud(mosquitto, key, tmp_path)
    sock = tmp_path / "api.sock"
    agent = Agent(DEV, tmp_path / "dev", mosquitto.env(), "--no-train", "--listen",
                  f"unix:{sock}", "--model-key", key_text(public_key(key)))  # fmt: skip
    client = InferenceClient.connect(f"unix:{sock}")
    try:
        with running(agent):
            cloud.deploy(bundles.v1, sign_manifest(bundles.v1.manifest, key))
            ack = cloud.ack("deploy/digits-mlp/v1")
            assert (ack.ok, ack.reason) == (True, "")
            assert wait_until(lambda: _version(client), 30) == "v1"
            assert client.predict(bundles.pixels[0]).version == "v1"

            bad = broken(bundles.v1, "v2-bad", b"this is not an onnx model")
            cloud.deploy(bad, sign_manifest(bad.manifest, key))
            ack = cloud.ack("deploy/digits-mlp/v2-bad")
            assert not ack.ok
            assert ack.reason.startswith("load:"), ack.reason
            assert client.predict(bundles.pixels[0]).version == "v1"  # still serving v1

            cloud.deploy(bundles.v2, bundles.v2.manifest)  # unsigned
            ack = cloud.ack("deploy/digits-mlp/v2")
            assert (ack.ok, ack.reason) == (False, "manifest_rejected_unsigned")
            assert 'manifests_rejected_total{reason="unsigned"} 1' in client.metrics()

            cloud.deploy(bundles.v2, sign_manifest(bundles.v2.manifest, key))
            assert cloud.ack("deploy/digits-mlp/v2").ok
            assert client.predict(bundles.pixels[0]).version == "v2"
        assert agent.wait() == 0
    finally:
        client.close()
        cloud.client.stop()
        cloud.signer.close()
    log = agent.output()
    assert "Traceback" not in log
    assert "deployment of digits-mlp v2-bad failed" in log


def test_an_older_deployment_replayed_on_the_topic_does_not_downgrade_the_device(
    mosquitto: Mosquitto, bundles: Bundles, tmp_path: Path
) -> None:
    key = generate_private_key()
    cloud = FakeCloud(mosquitto, key, tmp_path)
    sock = tmp_path / "api.sock"
    flags = ("--no-train", "--listen", f"unix:{sock}", "--model-key", key_text(public_key(key)))
    agent = Agent(DEV, tmp_path / "dev", mosquitto.env(), *flags)
    client = InferenceClient.connect(f"unix:{sock}")
    try:
        with running(agent):
            v1 = cloud.deploy(bundles.v1, sign_manifest(bundles.v1.manifest, key))
            assert cloud.ack("deploy/digits-mlp/v1").ok
            cloud.deploy(bundles.v2, sign_manifest(bundles.v2.manifest, key))
            assert cloud.ack("deploy/digits-mlp/v2").ok
            assert wait_until(lambda: _version(client) == "v2" or None, 30)

            cloud.publish(v1)  # validly signed by the coordinator, once: a replay now
            ack = cloud.ack("deploy/digits-mlp/v1")
            assert (ack.ok, ack.reason) == (False, "deployment_rejected_replayed")
            assert cloud.rejected("replayed") == 1
            assert client.predict(bundles.pixels[0]).version == "v2"
        assert agent.wait() == 0
        client.close()
        # A restart: the retained replay is the first deployment it meets.
        agent = Agent(DEV, tmp_path / "dev", mosquitto.env(), *flags)
        client = InferenceClient.connect(f"unix:{sock}")
        with running(agent):
            ack = cloud.ack("deploy/digits-mlp/v1")
            assert (ack.ok, ack.reason) == (False, "deployment_rejected_replayed")
            assert wait_until(lambda: _version(client) == "v2" or None, 30)
        assert agent.wait() == 0
    finally:
        client.close()
        cloud.client.stop()
        cloud.signer.close()
    assert "Traceback" not in agent.output()
