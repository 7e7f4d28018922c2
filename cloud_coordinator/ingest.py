"""Turns inbound MQTT messages into registry changes; rejects bad ones with a counted reason.

Nothing a device sends can raise out of `Ingest.handle`: every `DecodeError` (bad topic,
malformed msgpack, wrong kind, foreign version, a payload naming another device, a status
from an older session) is counted by (channel, reason) and logged, rate-limited.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from protocols.errors import DecodeError
from protocols.messages import Ack, Status, Telemetry, decode_as
from protocols.topics import DeviceChannel, DeviceTopic, parse_topic

log = logging.getLogger(__name__)
_LOG_FIRST = 5
_LOG_EVERY = 1000


class DeviceStore(Protocol):
    """Where ingested device state goes (the SQLite `Registry`, or a fake in tests)."""

    def apply_status(self, status: Status, now: float) -> bool:
        """Record presence; False if the status is from an older session."""

    def record_telemetry(self, telemetry: Telemetry, now: float) -> None:
        """Keep the latest telemetry."""

    def touch(self, device_id: str, now: float) -> None:
        """Note that a device was heard from."""

    def count_rejection(self, channel: str, reason: str, n: int = 1) -> None:
        """Persist a rejection count."""


class TrainingSink(Protocol):
    """Where training traffic goes (the `JobRunner`); methods raise DecodeError to reject."""

    def on_update(self, device_id: str, payload: bytes, max_bytes: int) -> None:
        """Fold in and acknowledge a model update."""


class BlobSink(Protocol):
    """Where blob requests go (`BlobServer`); raises DecodeError to reject."""

    def serve(self, device_id: str, payload: bytes, max_bytes: int) -> int:
        """Send the chunks a device asked for; how many were queued."""


class InferenceSink(Protocol):
    """Where offloaded predictions go (`CloudInference`); raises DecodeError to reject."""

    def on_request(
        self, device_id: str, payload: bytes, max_bytes: int,
        response_topic: str = "", correlation: bytes = b"",
    ) -> None:  # fmt: skip
        """Check and queue one inference request."""


#: Device channels the coordinator subscribes to in this version.
SUBSCRIBED = (
    DeviceChannel.STATUS,
    DeviceChannel.TELEMETRY,
    DeviceChannel.ACK,
    DeviceChannel.UPDATE,
    DeviceChannel.BLOB_REQUEST,
    DeviceChannel.INFER_REQUEST,
)


class Ingest:
    """Decodes and applies device messages; keeps in-memory counters for /metrics."""

    def __init__(
        self,
        store: DeviceStore,
        max_payload_bytes: int,
        training: TrainingSink | None = None,
        inference: InferenceSink | None = None,
        acks: Callable[[str, Ack], None] | None = None,
        blobs: BlobSink | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.acks = acks
        self.training = training
        self.inference = inference
        self.max_payload_bytes = max_payload_bytes
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._handlers: dict[DeviceChannel, Callable[[str, bytes, float], None]] = {
            DeviceChannel.STATUS: self._status,
            DeviceChannel.TELEMETRY: self._telemetry,
            DeviceChannel.ACK: self._ack,
        }
        if training is not None:
            self._handlers[DeviceChannel.UPDATE] = self._update
        if blobs is not None:
            self._handlers[DeviceChannel.BLOB_REQUEST] = self._blob_request

    def handle(
        self, topic: str, payload: bytes, now: float, *,
        response_topic: str = "", correlation: bytes = b"",
    ) -> bool:  # fmt: skip
        """Apply one message; False (and a counted reason) if it was rejected. The MQTT 5
        response topic and correlation data matter only to inference requests."""
        channel = "unknown"
        try:
            parsed = parse_topic(topic)
            if not isinstance(parsed, DeviceTopic):
                raise DecodeError(f"{topic} is not a device topic", reason="topic")
            channel = parsed.channel.value
            handler = self._handlers.get(parsed.channel)
            if parsed.channel is DeviceChannel.INFER_REQUEST and self.inference is not None:
                self.inference.on_request(parsed.device_id, payload, self.max_payload_bytes,
                                          response_topic, correlation)  # fmt: skip
            elif handler is None:
                raise DecodeError(f"nothing handles {channel} yet", reason="unsupported")
            else:
                handler(parsed.device_id, payload, now)
        except DecodeError as exc:
            self._reject(channel, exc.reason, topic, exc)
            return False
        with self._lock:
            self.accepted[channel] += 1
        return True

    def _reject(self, channel: str, reason: str, topic: str, exc: Exception) -> None:
        with self._lock:
            self.rejected[(channel, reason)] += 1
            n = self.rejected[(channel, reason)]
        self.store.count_rejection(channel, reason)
        if n <= _LOG_FIRST or n % _LOG_EVERY == 0:
            log.warning("rejected message on %s (%s, #%d): %s", topic, reason, n, exc)

    @staticmethod
    def _same_device(topic_device: str, payload_device: str) -> None:
        if topic_device != payload_device:
            raise DecodeError(
                f"payload names device {payload_device!r} on {topic_device!r}'s topic",
                reason="device_mismatch",
            )

    def _status(self, device_id: str, payload: bytes, now: float) -> None:
        status = decode_as(Status, payload, self.max_payload_bytes)
        self._same_device(device_id, status.device_id)
        if not self.store.apply_status(status, now):
            raise DecodeError("status from an older session", reason="stale")
        log.info(
            "device %s is %s%s",
            device_id,
            status.state,
            f" ({status.reason})" if status.reason else "",
        )

    def _telemetry(self, device_id: str, payload: bytes, now: float) -> None:
        telemetry = decode_as(Telemetry, payload, self.max_payload_bytes)
        self._same_device(device_id, telemetry.device_id)
        self.store.record_telemetry(telemetry, now)

    def _ack(self, device_id: str, payload: bytes, now: float) -> None:
        ack = decode_as(Ack, payload, self.max_payload_bytes)
        self.store.touch(device_id, now)
        if self.acks is not None:
            self.acks(device_id, ack)
        log.info(
            "device %s acknowledged %s: %s %s",
            device_id,
            ack.ref,
            "ok" if ack.ok else "failed",
            ack.reason,
        )

    def _update(self, device_id: str, payload: bytes, now: float) -> None:
        assert self.training is not None
        self.store.touch(device_id, now)
        self.training.on_update(device_id, payload, self.max_payload_bytes)

    def _blob_request(self, device_id: str, payload: bytes, now: float) -> None:
        assert self.blobs is not None
        self.blobs.serve(device_id, payload, self.max_payload_bytes)
