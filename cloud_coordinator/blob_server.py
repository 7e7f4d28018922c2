"""Serves model blobs to devices as chunks over MQTT, all of them or only those asked for.

A device asks again every few seconds until a blob has arrived, and anyone holding a
device's credentials can ask as often as it likes, so `BlobServer` bounds what asking
costs: a chunk already on its way to the device (queued, or sent and not yet acknowledged
by the broker) is not queued again; each device has a bucket of `BURST` requests that
refills at `REFILL_PER_S`, past which requests are refused (``rate_limited``) and the
device asks again later; and recently served blobs are kept, verified, in memory (up to
`CACHE_BYTES`), so a rollout to many devices reads and hashes each blob once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from cloud_coordinator.model_registry import ModelRegistry
from protocols.chunks import serving_chunk_size, split_blob
from protocols.errors import DecodeError
from protocols.messages import BlobRequest, decode_as, encode
from protocols.mqtt_types import MqttError
from protocols.topics import DeviceChannel, device_topic

log = logging.getLogger(__name__)

#: Blob requests a device may make at once, and how fast its allowance comes back.
BURST = 16
REFILL_PER_S = 2.0
#: Bytes of recently served blobs kept in memory.
CACHE_BYTES = 64 * 1024 * 1024
#: (device, blob) pairs tracked before the finished ones are swept.
SWEEP_AT = 4096


class Publisher(Protocol):
    """Where messages go (the MQTT client, or a fake in tests)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        """Queue one message."""


def _delivered(handle: object) -> bool:
    """Whether a publish handle's message has reached the broker (no handle: assume so)."""
    done = getattr(handle, "done", None)
    return bool(done()) if callable(done) else True


class BlobServer:
    """Answers blob requests (the ingest thread calls `serve`)."""

    def __init__(
        self,
        models: ModelRegistry,
        publisher: Publisher,
        chunk_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = models
        self.publisher = publisher
        self.chunk_size = serving_chunk_size(chunk_size)
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)
        self._sending: dict[tuple[str, str], dict[int, object]] = {}  # -> {index: handle}
        self._cache: OrderedDict[str, bytes] = OrderedDict()

    def serve(self, device_id: str, payload: bytes, max_bytes: int) -> int:
        """Publish the chunks a device asked for on its blob topic and return how many were
        queued; DecodeError (with the reason) to refuse the request."""
        request = decode_as(BlobRequest, payload, max_bytes)
        if request.device_id != device_id:
            raise DecodeError("blob request names another device", reason="device_mismatch")
        sha = request.blob_sha256
        if not self.models.has_blob(sha):
            raise DecodeError(f"no blob {sha[:12]}", reason="unknown_blob")
        with self._lock:
            self._take_token(device_id)
        blob = self._blob(sha)
        wanted = set(request.indices)
        topic = device_topic(device_id, DeviceChannel.BLOB)
        queued = 0
        with self._lock:
            sending = self._sending.setdefault((device_id, sha), {})
            for index in [i for i, handle in sending.items() if _delivered(handle)]:
                del sending[index]
            # (chunks hold whole pieces of the manifest's piece digests, or lie inside one)
            for chunk in split_blob(blob, self.chunk_size, digest=sha):
                if (wanted and chunk.index not in wanted) or chunk.index in sending:
                    continue
                try:
                    sending[chunk.index] = self.publisher.publish(topic, encode(chunk), qos=1)
                except MqttError as exc:  # (the queue is full: the device asks again later)
                    log.warning("blob %s for %s: stopped after %d chunks: %s",
                                sha[:12], device_id, queued, exc)  # fmt: skip
                    break
                queued += 1
            if len(self._sending) > SWEEP_AT:
                self._sweep()
        return queued

    def _take_token(self, device_id: str) -> None:
        """Spend one of the device's requests; DecodeError when it has none left."""
        now = self.clock()
        tokens, at = self._buckets.get(device_id, (float(BURST), now))
        tokens = min(float(BURST), tokens + (now - at) * REFILL_PER_S)
        if tokens < 1.0:
            self._buckets[device_id] = (tokens, now)
            raise DecodeError(
                f"more than {BURST} blob requests at {REFILL_PER_S:g}/s from this device",
                reason="rate_limited",
            )
        self._buckets[device_id] = (tokens - 1.0, now)

    def _sweep(self) -> None:
        """Forget (device, blob) pairs whose chunks have all reached the broker."""
        for key, sending in list(self._sending.items()):
            if all(_delivered(handle) for handle in sending.values()):
                del self._sending[key]

    def _blob(self, sha: str) -> bytes:
        """The blob's bytes, verified (from the cache, or read and hashed once)."""
        with self._lock:
            data = self._cache.get(sha)
            if data is not None:
                self._cache.move_to_end(sha)
                return data
        data = self.models.blob(sha)  # (read and checked outside the lock)
        if len(data) <= CACHE_BYTES:
            with self._lock:
                self._cache[sha] = data
                while sum(map(len, self._cache.values())) > CACHE_BYTES:
                    self._cache.popitem(last=False)
        return data
