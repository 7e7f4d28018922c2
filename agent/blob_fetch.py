"""Model blobs fetched from the coordinator in chunks: asked for, asked for again until they
arrive, and resumed after a reconnect from the chunks already verified.

A request names the blob and the chunks still missing (none: all of them, also when more
than `MAX_LISTED` are missing); the coordinator answers on ``dev/{id}/blob``
(`protocols.chunks` reassembles and checks each blob's sha256).

Chunks are not signed, the manifest is: anyone on the broker can send chunks. A chunk
must claim the size the signed manifest gives, and where the manifest lists piece digests
(`FileEntry.pieces`), each piece is checked as soon as its bytes are in, so a forged chunk
is refused (`bad_piece`) and the genuine one still taken. Chunks of another layout (chunk
size) are kept apart, at most `MAX_LAYOUTS` per blob: a layout is kept once its first chunk
is taken, and a new one replaces the layout holding the fewest bytes, so forged chunks
cannot make the genuine ones unacceptable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from protocols.chunks import Reassembly
from protocols.errors import DecodeError
from protocols.messages import BlobChunk, BlobRequest, encode
from protocols.topics import DeviceChannel, device_topic

#: Seconds before a blob that has not arrived is asked for again.
FETCH_RETRY_S = 3.0
#: Chunk layouts (count, size, chunk size) collected at once for one blob.
MAX_LAYOUTS = 4
#: Missing chunks a request names at most; past that it asks for the whole blob.
MAX_LISTED = 512


class Publisher(Protocol):
    """The part of the MQTT connection blob requests need."""

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        """Publish `payload` on `topic`."""
        ...


_Layout = tuple[int, int, int]


@dataclass
class _Fetch:
    sha256: str
    size: int | None  # from the signed manifest (None: not known)
    piece_size: int = 0  # and its piece digests (none: the blob is checked whole only)
    pieces: bytes = b""
    requested_at: float = 0.0
    layouts: dict[_Layout, Reassembly] = field(default_factory=dict)

    def missing(self) -> tuple[int, ...]:
        """What to ask for: the missing chunks of the fullest layout; () for all of them."""
        if not self.layouts:
            return ()
        fullest = max(self.layouts.values(), key=Reassembly.received_bytes)
        missing = fullest.missing()
        return tuple(missing) if len(missing) <= MAX_LISTED else ()


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

    def want(
        self, sha256: str, size: int | None = None, piece_size: int = 0, pieces: bytes = b""
    ) -> None:
        """Fetch `sha256`, of `size` bytes and with the digests of its `piece_size`-byte
        pieces when known (asked for at the next `send_due`), unless it is already wanted."""
        with self._lock:
            fetch = self._fetches.get(sha256)
            if fetch is None:
                self._fetches[sha256] = _Fetch(sha256, size, piece_size, pieces)
                return
            if fetch.size is None:
                fetch.size = size
            if pieces and not fetch.pieces:  # (layouts begun without them stay unchecked)
                fetch.piece_size, fetch.pieces = piece_size, pieces

    def add_chunk(self, chunk: BlobChunk) -> bytes | None:
        """Add a chunk; the verified blob once it is complete, else None. The blob is still
        wanted (asked for again after `FETCH_RETRY_S`) until the caller, having stored it,
        calls `stored`. DecodeError for a chunk that cannot belong (counted by the caller),
        or if the complete blob is corrupt: its chunks are then fetched again."""
        with self._lock:
            fetch = self._fetches.get(chunk.blob_sha256)
            if fetch is None:
                return None  # unrequested or already complete
            if fetch.size is not None and chunk.size != fetch.size:
                raise DecodeError(
                    f"chunk claims a blob of {chunk.size} bytes; its manifest says {fetch.size}",
                    reason="bad_chunk",
                )
            layout = (chunk.count, chunk.size, chunk.chunk_size)
            reassembly = fetch.layouts.get(layout)
            if reassembly is None:
                reassembly = Reassembly(chunk, piece_size=fetch.piece_size, pieces=fetch.pieces)
                reassembly.add(chunk)  # (a forged first chunk of a new layout leaves no trace)
                if len(fetch.layouts) >= MAX_LAYOUTS:  # the one with the fewest bytes goes
                    least = min(fetch.layouts, key=lambda k: fetch.layouts[k].received_bytes())
                    del fetch.layouts[least]
                fetch.layouts[layout] = reassembly
            else:
                reassembly.add(chunk)
            if not reassembly.complete:
                return None
            try:
                blob = reassembly.result()
            except DecodeError:
                del fetch.layouts[layout]
                fetch.requested_at = 0.0
                raise
            fetch.layouts.clear()  # (complete: its chunks are no longer needed)
            fetch.requested_at = self.clock()
            return blob

    def stored(self, sha256: str) -> None:
        """The blob is stored: stop fetching it."""
        with self._lock:
            self._fetches.pop(sha256, None)

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
            device = self.device_id
            requests = [BlobRequest(device, f.sha256, f.missing(), f.sha256[:8]) for f in due]
        if not self.transport.connected:
            return
        topic = device_topic(self.device_id, DeviceChannel.BLOB_REQUEST)
        for request in requests:
            self.transport.publish(topic, encode(request), qos=1)


__all__ = ["FETCH_RETRY_S", "MAX_LAYOUTS", "MAX_LISTED", "BlobFetches", "Publisher"]
