"""Blob chunking: split, reassemble in any order with duplicates, resume, verify."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest

from protocols import chunks, messages
from protocols.chunks import Reassembly, sha256_hex, split_blob
from protocols.errors import DecodeError
from protocols.messages import BlobChunk


def _blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize(
    ("size", "chunk_size", "count"),
    [(0, 10, 1), (1, 10, 1), (10, 10, 1), (11, 10, 2), (95, 10, 10), (100, 10, 10), (5, 1, 5)],
)
def test_split_blob(size: int, chunk_size: int, count: int) -> None:
    blob = _blob(size)
    parts = list(split_blob(blob, chunk_size))
    assert len(parts) == count
    assert [p.index for p in parts] == list(range(count))
    assert {(p.blob_sha256, p.count, p.size, p.chunk_size) for p in parts} == {
        (hashlib.sha256(blob).hexdigest(), count, size, chunk_size)
    }
    assert b"".join(bytes(p.data) for p in parts) == blob
    assert all(len(bytes(p.data)) == chunk_size for p in parts[:-1])


def test_split_blob_is_zero_copy_and_rejects_bad_sizes() -> None:
    blob = bytearray(_blob(100))
    first = next(split_blob(blob, 40))
    assert isinstance(first.data, memoryview)
    assert first.data.obj is blob
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            next(split_blob(blob, bad))


def test_default_chunk_size() -> None:
    assert chunks.DEFAULT_CHUNK_SIZE == 256 * 1024
    assert len(list(split_blob(bytes(chunks.DEFAULT_CHUNK_SIZE + 1)))) == 2


@pytest.mark.parametrize("seed", range(10))
def test_reassemble_in_random_order_with_duplicates(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randrange(0, 5000)
    blob = _blob(size, seed)
    parts = list(split_blob(blob, rng.randrange(1, 700)))
    feed = parts + rng.choices(parts, k=len(parts))
    rng.shuffle(feed)
    r = Reassembly(feed[0])
    seen: set[int] = set()
    for part in feed:
        wire_part = messages.decode_as(BlobChunk, messages.encode(part))
        assert r.add(wire_part) == (part.index not in seen)
        seen.add(part.index)
        assert r.missing() == [i for i in range(len(parts)) if i not in seen]
        assert r.received_bytes() == sum(len(bytes(parts[i].data)) for i in seen)
    assert r.complete
    assert r.result() == blob


def test_missing_reports_and_resume() -> None:
    blob = _blob(1000)
    parts = list(split_blob(blob, 100))
    r = Reassembly(parts[3])
    assert r.missing() == list(range(10))
    assert not r.complete
    assert r.received_bytes() == 0
    for i in (0, 2, 9):
        assert r.add(parts[i])
    assert r.missing() == [1, 3, 4, 5, 6, 7, 8]
    assert r.received_bytes() == 300
    with pytest.raises(DecodeError) as info:
        r.result()
    assert info.value.reason == "incomplete"
    assert "7" in str(info.value)
    # Resume after a reconnect: the sender re-sends only what is missing, in any order.
    for i in reversed(r.missing()):
        r.add(parts[i])
    assert r.missing() == []
    assert r.result() == blob


def test_added_chunk_data_is_copied() -> None:
    blob = _blob(64)
    buffer = bytearray(blob)
    parts = list(split_blob(buffer, 16))
    r = Reassembly(parts[0])
    for part in parts:
        r.add(part)
    buffer[:] = bytes(64)  # the receive buffer is reused
    assert r.result() == blob


def test_hash_mismatch() -> None:
    blob = _blob(300)
    parts = list(split_blob(blob, 100))
    r = Reassembly(parts[0])
    r.add(parts[0])
    r.add(dataclasses.replace(parts[1], data=bytes(100)))
    r.add(parts[2])
    assert r.complete
    with pytest.raises(DecodeError) as info:
        r.result()
    assert info.value.reason == "hash_mismatch"


def test_first_copy_of_a_duplicate_wins() -> None:
    blob = _blob(200)
    parts = list(split_blob(blob, 100))
    r = Reassembly(parts[0])
    assert r.add(parts[0])
    assert not r.add(dataclasses.replace(parts[0], data=bytes(100)))
    r.add(parts[1])
    assert r.result() == blob


@pytest.mark.parametrize(
    ("index", "length"), [(0, 99), (0, 101), (2, 100), (2, 49), (2, 0), (1, 0)]
)
def test_wrong_chunk_sizes(index: int, length: int) -> None:
    parts = list(split_blob(_blob(250), 100))
    r = Reassembly(parts[0])
    with pytest.raises(DecodeError) as info:
        r.add(dataclasses.replace(parts[0], index=index, data=bytes(length)))
    assert info.value.reason == "bad_chunk"
    assert r.missing() == [0, 1, 2]


@pytest.mark.parametrize(
    "changes",
    [
        {"index": 3},
        {"index": -1},
        {"count": 4},
        {"size": 251},
        {"chunk_size": 99},
        {"blob_sha256": "0" * 64},
    ],
)
def test_chunk_of_another_blob_is_rejected(changes: dict[str, object]) -> None:
    parts = list(split_blob(_blob(250), 100))
    r = Reassembly(parts[0])
    with pytest.raises(DecodeError) as info:
        r.add(dataclasses.replace(parts[1], **changes))  # type: ignore[arg-type]
    assert info.value.reason == "bad_chunk"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"size": -1}, "too_large"),
        ({"size": 1001, "count": 11}, "too_large"),
        ({"chunk_size": 0}, "bad_chunk"),
        ({"chunk_size": -100}, "bad_chunk"),
        ({"count": 2}, "bad_chunk"),
        ({"count": 0}, "bad_chunk"),
        ({"blob_sha256": "ab"}, "bad_chunk"),
        ({"blob_sha256": "AB" * 32}, "bad_chunk"),
        ({"blob_sha256": "zz" * 32}, "bad_chunk"),
    ],
)
def test_bad_headers_are_rejected(changes: dict[str, object], reason: str) -> None:
    first = next(split_blob(_blob(1000), 100))
    with pytest.raises(DecodeError) as info:
        Reassembly(dataclasses.replace(first, **changes), max_size=1000)  # type: ignore[arg-type]
    assert info.value.reason == reason


def test_hostile_header_allocates_nothing_up_front() -> None:
    header = BlobChunk(sha256_hex(b"x"), 0, 1, chunks.MAX_BLOB_SIZE, chunks.MAX_BLOB_SIZE, b"")
    r = Reassembly(header)
    assert r.missing() == [0]
    assert r.received_bytes() == 0


def test_empty_blob() -> None:
    (only,) = split_blob(b"", 10)
    r = Reassembly(only)
    assert r.add(only)
    assert r.result() == b""


def test_a_blob_in_more_than_max_chunks_is_refused_before_any_bookkeeping() -> None:
    size = chunks.MAX_CHUNKS + 1
    one_byte = BlobChunk("ab" * 32, 0, size, size, 1, b"x")  # tiny chunks: a huge index list
    with pytest.raises(DecodeError, match="chunks too small") as refused:
        Reassembly(one_byte)
    assert refused.value.reason == "too_large"
    fine = BlobChunk("ab" * 32, 0, chunks.MAX_CHUNKS, chunks.MAX_CHUNKS, 1, b"x")
    assert len(Reassembly(fine).missing()) == chunks.MAX_CHUNKS
