"""Model blobs fetched from the coordinator in chunks: asked for, asked for again until they
arrive, and resumed after a reconnect from the chunks already verified.

A request names the blob and the chunks still missing (none: all of them); the coordinator
answers on ``dev/{id}/blob`` (`protocols.chunks` reassembles and checks each blob's
sha256).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from protocols.chunks import Reassembly
from protocols.errors import DecodeError
from protocols.messages import BlobChunk, BlobRequest, encode
from protocols.topics import DeviceChannel, device_topic

#: Seconds before a blob that has not arrived is asked for again.
FETCH_RETRY_S = 3.0


class Publisher(Protocol):
    """The part of the MQTT connection blob requests need."""

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        """Publish `payload` on `topic`."""
        ...


@dataclass
class _Fetch:
    sha256: str
    requested_at: float = 0.0
    reassembly: Reassembly | None = None


class BlobFetches:
    """The blobs one device is fetching (thread-safe)."""

    def __init__(
        self, device_id: str, transport: Publisher, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.device_id = device_id
        self.transport = transport
        self.clock = clock
        self._lock = threading.Lock()
        self._fetches: dict[str, _Fetch] = {}

    def want(self, sha256: str) -> None:
        """Fetch `sha256` (asked for at the next `send_due`) unless it is already wanted."""
        with self._lock:
            if sha256 not in self._fetches:
                self._fetches[sha256] = _Fetch(sha256)

    def add_chunk(self, chunk: BlobChunk) -> bytes | None:
        """Add a chunk; the verified blob once it is complete (and no longer fetched), else
        None. DecodeError if the complete blob is corrupt: it is then fetched whole again."""
        with self._lock:
            fetch = self._fetches.get(chunk.blob_sha256)
            if fetch is None:
                return None  # unrequested or already complete
            if fetch.reassembly is None:
                fetch.reassembly = Reassembly(chunk)
            fetch.reassembly.add(chunk)
            if not fetch.reassembly.complete:
                return None
            try:
                blob = fetch.reassembly.result()
            except DecodeError:
                fetch.reassembly = None
                fetch.requested_at = 0.0
                raise
            del self._fetches[chunk.blob_sha256]
            return blob

    def restart(self) -> None:
        """Ask for every wanted blob at the next `send_due` (after a reconnect)."""
        with self._lock:
            for fetch in self._fetches.values():
                fetch.requested_at = 0.0

    def send_due(self) -> None:
        """Request every wanted blob not asked for in `FETCH_RETRY_S` (its missing chunks)."""
        now = self.clock()
        with self._lock:
            due = [f for f in self._fetches.values() if now - f.requested_at > FETCH_RETRY_S]
            for fetch in due:
                fetch.requested_at = now
            requests = [
                BlobRequest(
                    self.device_id,
                    f.sha256,
                    tuple(f.reassembly.missing()) if f.reassembly else (),
                    f.sha256[:8],
                )
                for f in due
            ]
        if not self.transport.connected:
            return
        topic = device_topic(self.device_id, DeviceChannel.BLOB_REQUEST)
        for request in requests:
            self.transport.publish(topic, encode(request), qos=1)


__all__ = ["FETCH_RETRY_S", "BlobFetches", "Publisher"]
