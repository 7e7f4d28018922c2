"""Serves model blobs to devices as chunks over MQTT, all of them or only those asked for."""

from __future__ import annotations

from typing import Protocol

from cloud_coordinator.model_registry import ModelRegistry
from protocols.chunks import serving_chunk_size, split_blob
from protocols.errors import DecodeError
from protocols.messages import BlobRequest, decode_as, encode
from protocols.topics import DeviceChannel, device_topic


class Publisher(Protocol):
    """Where messages go (the MQTT client, or a fake in tests)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        """Queue one message."""


def serve_blob_request(
    models: ModelRegistry,
    publisher: Publisher,
    chunk_size: int,
    device_id: str,
    payload: bytes,
    max_bytes: int,
) -> None:
    """Publish the chunks a device asked for on its blob topic; DecodeError to refuse."""
    request = decode_as(BlobRequest, payload, max_bytes)
    if request.device_id != device_id:
        raise DecodeError("blob request names another device", reason="device_mismatch")
    if not models.has_blob(request.blob_sha256):
        raise DecodeError(f"no blob {request.blob_sha256[:12]}", reason="unknown_blob")
    wanted = set(request.indices)
    topic = device_topic(device_id, DeviceChannel.BLOB)
    # (chunks hold whole pieces of the manifest's piece digests, or lie inside one)
    for chunk in split_blob(models.blob(request.blob_sha256), serving_chunk_size(chunk_size)):
        if not wanted or chunk.index in wanted:
            publisher.publish(topic, encode(chunk), qos=1)
