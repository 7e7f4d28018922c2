"""A model transfer cut mid-way resumes from the last verified chunk: a real agent over a
real Mosquitto asks for a deployed version's blobs, gets only half of each blob's chunks,
the broker restarts under it, and after reconnecting it asks for exactly the chunks it
lacks, then verifies, loads and serves the version. No chunk is sent twice. A forged copy
of a chunk, sent just before the genuine one, is refused by its signed piece digest, and
the genuine one is taken."""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from agent.client import InferenceClient
from protocols.chunks import split_blob
from protocols.messages import BlobRequest, decode_as, encode
from protocols.mqtt import InboundMessage
from protocols.signing import generate_private_key, key_text, public_key, sign_manifest
from protocols.topics import DeviceChannel, device_topic
from tests.agent_inference.conftest import Bundles, make_bundles
from tests.broker import Mosquitto
from tests.integration.test_deploy import DEV, FakeCloud
from tests.procs import Agent, running, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHUNK = 64 * 1024


class CuttingCloud(FakeCloud):
    """Answers the first request for each blob with only its first half of chunks."""

    def __init__(self, mosquitto: Mosquitto, key: bytes, db_dir: Path) -> None:
        self.requests: list[BlobRequest] = []
        self.sent: defaultdict[str, list[int]] = defaultdict(list)
        self.cutting = True
        self.forged = 0
        self.lock = threading.Lock()
        super().__init__(mosquitto, key, db_dir)

    def _on_message(self, message: InboundMessage) -> None:
        if message.topic.endswith(("/ack", "/telemetry")):
            super()._on_message(message)
            return
        request = decode_as(BlobRequest, message.payload)
        blob = self.blobs.get(request.blob_sha256, b"")
        chunks = list(split_blob(blob, CHUNK)) if blob else []
        with self.lock:
            self.requests.append(request)
            wanted = [c for c in chunks if not request.indices or c.index in request.indices]
            if self.cutting and not request.indices:
                wanted = wanted[: max(1, len(chunks) // 2)]
            topic = device_topic(DEV, DeviceChannel.BLOB)
            if request.indices and wanted and not self.forged:  # the resume: a forgery first
                data = bytearray(bytes(wanted[0].data))
                data[-1] ^= 0xFF
                forged = dataclasses.replace(wanted[0], data=bytes(data))
                self.client.publish(topic, encode(forged), qos=1)
                self.forged += 1
            for chunk in wanted:
                self.sent[request.blob_sha256].append(chunk.index)
                self.client.publish(topic, encode(chunk), qos=1)


@pytest.fixture(scope="module")
def bundles() -> Bundles:
    return make_bundles()


def test_a_cut_transfer_resumes_with_only_the_missing_chunks(
    mosquitto: Mosquitto, bundles: Bundles, tmp_path: Path
) -> None:
    key = generate_private_key()
    cloud = CuttingCloud(mosquitto, key, tmp_path)
    sock = tmp_path / "api.sock"
    agent = Agent(DEV, tmp_path / "dev", mosquitto.env(), "--no-train", "--listen",
                  f"unix:{sock}", "--model-key", key_text(public_key(key)))  # fmt: skip
    manifest = sign_manifest(bundles.v1.manifest, key)
    sizes = {f.sha256: f.size for f in manifest.files}
    assert all(f.piece_size == CHUNK and f.pieces for f in manifest.files)
    counts = {sha: len(list(split_blob(cloud_blob, CHUNK))) for sha, cloud_blob in
              ((f.sha256, bundles.v1.files[f.name]) for f in manifest.files)}  # fmt: skip
    big = max(counts, key=counts.__getitem__)
    assert counts[big] >= 4  # a transfer worth cutting
    client = InferenceClient.connect(f"unix:{sock}")
    try:
        with running(agent):
            cloud.deploy(bundles.v1, manifest)
            # every blob was asked for whole, and half of it sent
            wait_until(lambda: {r.blob_sha256 for r in cloud.requests} >= set(sizes), 30)
            wait_until(lambda: len(cloud.sent[big]) >= counts[big] // 2, 30)
            with cloud.lock:
                cloud.cutting = False
                first = len(cloud.requests)
            mosquitto.restart(downtime=1.0)  # the cut: the agent loses its session's traffic
            cloud.client.wait_connected(30)
            ack = cloud.ack("deploy/digits-mlp/v1", timeout=90)
            assert (ack.ok, ack.reason) == (True, "")
            assert wait_until(lambda: client.model().get("version"), 30) == "v1"
        assert agent.wait() == 0
    finally:
        client.close()
        cloud.client.stop()
        cloud.signer.close()
    resumed = [r for r in cloud.requests[first:] if r.blob_sha256 == big and r.indices]
    assert resumed, [(r.blob_sha256[:8], r.indices) for r in cloud.requests]
    n, half = counts[big], counts[big] // 2
    asked = set(resumed[0].indices)
    # What it lacked, and no more than that: the first half less the chunks the broker still
    # held for the agent when it went down (lost with it; usually none).
    lost = asked - set(range(half, n))
    assert set(range(half, n)) <= asked
    assert len(lost) < half, f"asked again for {sorted(asked)} of {n}: not a resume"
    assert all(i < half for i in lost)
    resent = sorted(cloud.sent[big])
    assert resent == sorted([*range(n), *lost])  # each chunk sent once, a lost one twice
    assert cloud.forged == 1
    assert "(bad_piece)" in agent.output()  # refused, counted, and the genuine chunk taken
    assert "Traceback" not in agent.output()
