"""What asking for blobs may cost the coordinator: chunks on their way are not queued again,
each device's requests are rate-limited, and a blob served to many is read once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_coordinator import blob_server
from cloud_coordinator.blob_server import BlobServer
from cloud_coordinator.model_registry import ModelRegistry
from protocols.errors import DecodeError
from protocols.messages import BlobChunk, BlobRequest, decode_as, encode
from protocols.mqtt_types import PublishError

MAX = 1 << 20


class Handle:
    def __init__(self) -> None:
        self.delivered = False

    def done(self) -> bool:
        return self.delivered


class Broker:
    """A publisher whose messages reach the broker only when `deliver` says so."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.sent: list[tuple[str, BlobChunk, Handle]] = []
        self.room = room

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        if len(self.sent) >= self.room:
            raise PublishError("outgoing queue full (test)")
        handle = Handle()
        self.sent.append((topic, decode_as(BlobChunk, payload), handle))
        return handle

    def indices(self) -> list[int]:
        return [chunk.index for _, chunk, _ in self.sent]

    def deliver(self) -> None:
        for _, _, handle in self.sent:
            handle.delivered = True


@pytest.fixture
def models(tmp_path: Path) -> Iterator[ModelRegistry]:
    registry = ModelRegistry(tmp_path / "models")
    yield registry
    registry.close()


def _blob(models: ModelRegistry, size: int = 10 * 4096) -> str:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    return models.put_blob(data)


def _ask(server: BlobServer, sha: str, device: str = "cam-1", *indices: int) -> int:
    return server.serve(device, encode(BlobRequest(device, sha, indices)), MAX)


def test_chunks_on_their_way_are_not_queued_again(models: ModelRegistry) -> None:
    sha, broker = _blob(models), Broker()
    server = BlobServer(models, broker, 4096, clock=lambda: 0.0)
    assert _ask(server, sha) == 10
    assert _ask(server, sha) == 0  # asked again before any reached the broker
    assert _ask(server, sha, "cam-1", 2, 3) == 0
    assert _ask(server, sha, "cam-2") == 10  # another device: its own chunks
    broker.deliver()
    assert _ask(server, sha, "cam-1", 2, 3) == 2  # delivered (and lost): sent again
    assert broker.indices()[-2:] == [2, 3]


def test_a_device_asking_too_often_is_refused_until_its_allowance_returns(
    models: ModelRegistry,
) -> None:
    sha, broker = _blob(models), Broker()
    now = [0.0]
    server = BlobServer(models, broker, 4096, clock=lambda: now[0])
    for _ in range(blob_server.BURST):
        _ask(server, sha)
    with pytest.raises(DecodeError) as info:
        _ask(server, sha)
    assert info.value.reason == "rate_limited"
    _ask(server, sha, "cam-2")  # others are not held up
    now[0] += 1.0 / blob_server.REFILL_PER_S
    _ask(server, sha)
    with pytest.raises(DecodeError):
        _ask(server, sha)


def test_a_blob_served_to_many_devices_is_read_and_checked_once(
    models: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha, broker = _blob(models), Broker()
    reads = []
    real = models.blob
    monkeypatch.setattr(models, "blob", lambda digest: reads.append(digest) or real(digest))
    server = BlobServer(models, broker, 4096, clock=lambda: 0.0)
    for n in range(20):
        assert _ask(server, sha, f"cam-{n}") == 10
    assert reads == [sha]


def test_a_full_outgoing_queue_stops_the_answer_and_the_device_asks_again(
    models: ModelRegistry,
) -> None:
    sha, broker = _blob(models), Broker(room=4)
    server = BlobServer(models, broker, 4096, clock=lambda: 0.0)
    assert _ask(server, sha) == 4
    broker.room = 100
    broker.deliver()
    assert _ask(server, sha, "cam-1", *range(10)) == 10
