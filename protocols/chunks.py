"""Split blobs into `BlobChunk` messages and put them back together, verifying sha256.

`Reassembly` is pure state: feed it chunks in any order, duplicates included; it knows
which indices are still missing (so a transfer can resume after a reconnect) and hands
out the blob only once every chunk is in and the hash matches. It holds only the bytes
received so far, never a buffer of the size a (possibly hostile) header claims.

Given the signed piece digests of its file (`FileEntry.pieces`), it also checks each
piece as soon as its bytes are in: a chunk holding whole pieces is refused on arrival if
one does not match (so a forged chunk never takes the place of the genuine one), and
chunks smaller than a piece are dropped together when their piece does not match. What
is kept is verified, and a resumed transfer asks only for the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from protocols.errors import DecodeError
from protocols.field_checks import valid_sha256
from protocols.messages import PIECE_DIGEST_BYTES, BlobChunk

DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_BLOB_SIZE = 2 * 1024**3
#: Chunks one blob may be split into (64 Ki: a 64 MiB blob in 1 KiB chunks, 2 GiB in 32 KiB).
MAX_CHUNKS = 1 << 16


#: Bytes per piece digest the coordinator writes into manifests (a power of two).
PIECE_SIZE = 64 * 1024


def piece_digests(blob: bytes | bytearray | memoryview, piece_size: int = PIECE_SIZE) -> bytes:
    """The sha256 digests of `blob`'s consecutive `piece_size`-byte slices, joined (one
    digest, of nothing, for an empty blob)."""
    if piece_size <= 0:
        raise ValueError("piece_size must be positive")
    view = memoryview(blob).cast("B")
    count = max(1, -(-view.nbytes // piece_size))
    return b"".join(
        hashlib.sha256(view[i * piece_size : (i + 1) * piece_size]).digest() for i in range(count)
    )


def serving_chunk_size(chunk_size: int, piece_size: int = PIECE_SIZE) -> int:
    """`chunk_size` lowered to whole pieces, or (below one piece) to a power of two, so
    every chunk holds whole pieces or lies inside one (`piece_size` a power of two)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if chunk_size >= piece_size:
        return chunk_size - chunk_size % piece_size
    return 1 << (chunk_size.bit_length() - 1)


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Lowercase hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def split_blob(
    blob: bytes | bytearray | memoryview,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    digest: str | None = None,
) -> Iterator[BlobChunk]:
    """Yield the chunks of `blob`, each carrying at most `chunk_size` bytes (zero-copy views);
    `digest`, when given, is the blob's sha256 as the caller has already verified it."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    view = memoryview(blob).cast("B")
    if digest is None:
        digest = sha256_hex(view)
    count = max(1, -(-view.nbytes // chunk_size))
    for index in range(count):
        part = view[index * chunk_size : (index + 1) * chunk_size]
        yield BlobChunk(digest, index, count, view.nbytes, chunk_size, part)


class Reassembly:
    """Collects the chunks of one blob; `result` returns it once complete and verified."""

    def __init__(
        self,
        first: BlobChunk,
        max_size: int = MAX_BLOB_SIZE,
        piece_size: int = 0,
        pieces: bytes = b"",
    ) -> None:
        """Collect the chunks of `first`'s blob; with `pieces` (the signed digests of its
        `piece_size`-byte slices), check each piece as it completes."""
        _check_header(first, max_size)
        self.sha256 = first.blob_sha256
        self.count = first.count
        self.size = first.size
        self.chunk_size = first.chunk_size
        self._parts: dict[int, bytes] = {}
        self._received = 0
        self.piece_size = piece_size if pieces else 0
        self._pieces = pieces
        if self.piece_size:
            cs, ps = self.chunk_size, self.piece_size
            if cs % ps and ps % cs:
                raise DecodeError(
                    f"chunks of {cs} bytes neither hold whole pieces of {ps} bytes nor lie"
                    " inside one",
                    reason="bad_chunk",
                )
            if len(pieces) != PIECE_DIGEST_BYTES * max(1, -(-self.size // ps)):
                raise DecodeError("piece digests do not match the blob's size", reason="bad_chunk")

    @property
    def complete(self) -> bool:
        """True once every chunk has arrived."""
        return len(self._parts) == self.count

    def missing(self) -> list[int]:
        """Indices not yet received, in order."""
        return [i for i in range(self.count) if i not in self._parts]

    def received_bytes(self) -> int:
        """Bytes received so far (each chunk counted once)."""
        return self._received

    def _expected_len(self, index: int) -> int:
        start = index * self.chunk_size
        return min(self.chunk_size, self.size - start)

    def add(self, chunk: BlobChunk) -> bool:
        """Store `chunk`; return True if it was new. DecodeError if it does not belong here."""
        if (chunk.blob_sha256, chunk.count, chunk.size, chunk.chunk_size) != (
            self.sha256,
            self.count,
            self.size,
            self.chunk_size,
        ):
            raise DecodeError("chunk does not match its blob's header", reason="bad_chunk")
        if not 0 <= chunk.index < self.count:
            raise DecodeError(
                f"chunk index {chunk.index} outside 0..{self.count - 1}", reason="bad_chunk"
            )
        data = memoryview(chunk.data)
        expected = self._expected_len(chunk.index)
        if data.nbytes != expected:
            raise DecodeError(
                f"chunk {chunk.index} has {data.nbytes} bytes, expected {expected}",
                reason="bad_chunk",
            )
        if chunk.index in self._parts:
            return False
        if not self.piece_size or self.piece_size > self.chunk_size:
            self._parts[chunk.index] = data.tobytes()  # the chunk's buffer may be reused
            self._received += data.nbytes
            if self.piece_size:
                self._check_piece_of(chunk.index)
            return True
        # whole pieces: each checked before the chunk is kept
        ps, first = self.piece_size, chunk.index * self.chunk_size // self.piece_size
        for k in range(max(1, -(-data.nbytes // ps))):
            if not self._piece_matches(first + k, data[k * ps : (k + 1) * ps]):
                raise DecodeError(
                    f"chunk {chunk.index}: piece {first + k} does not match its signed digest",
                    reason="bad_piece",
                )
        self._parts[chunk.index] = data.tobytes()
        self._received += data.nbytes
        return True

    def _piece_matches(self, piece: int, data: bytes | memoryview) -> bool:
        at = piece * PIECE_DIGEST_BYTES
        return hashlib.sha256(data).digest() == self._pieces[at : at + PIECE_DIGEST_BYTES]

    def _check_piece_of(self, index: int) -> None:
        """Check the piece chunk `index` lies in once all its chunks are in; a piece that
        does not match loses them all (DecodeError)."""
        per = self.piece_size // self.chunk_size
        first = index - index % per
        indices = range(first, min(first + per, self.count))
        if any(i not in self._parts for i in indices):
            return
        piece = b"".join(self._parts[i] for i in indices)
        if self._piece_matches(first // per, piece):
            return
        for i in indices:
            self._received -= len(self._parts.pop(i))
        raise DecodeError(
            f"piece {first // per} (chunks {first}..{indices[-1]}) does not match its signed"
            " digest; its chunks are fetched again",
            reason="bad_piece",
        )

    def result(self) -> bytes:
        """The verified blob; DecodeError if chunks are missing or the hash does not match."""
        if not self.complete:
            raise DecodeError(f"{len(self.missing())} chunks still missing", reason="incomplete")
        blob = b"".join(self._parts[i] for i in range(self.count))
        if sha256_hex(blob) != self.sha256:
            raise DecodeError("reassembled blob does not match its sha256", reason="hash_mismatch")
        return blob


def _check_header(chunk: BlobChunk, max_size: int) -> None:
    if not 0 <= chunk.size <= max_size:
        raise DecodeError(
            f"blob of {chunk.size} bytes exceeds the cap of {max_size}", reason="too_large"
        )
    if chunk.chunk_size <= 0 or chunk.count != max(1, -(-chunk.size // chunk.chunk_size)):
        raise DecodeError("chunk count does not match size and chunk size", reason="bad_chunk")
    if chunk.count > MAX_CHUNKS:
        raise DecodeError(
            f"a blob in {chunk.count} chunks (more than {MAX_CHUNKS}): chunks too small",
            reason="too_large",
        )
    if not valid_sha256(chunk.blob_sha256):
        raise DecodeError("blob sha256 must be 64 lowercase hex digits", reason="bad_chunk")
