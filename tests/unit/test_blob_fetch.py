"""BlobFetches: what a device asks for, when it asks again, and what it keeps across a cut.

The publisher is a list (the integration test `test_blob_resume` runs the same code against
a real Mosquitto and agent process)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from agent import blob_fetch
from agent.blob_fetch import BlobFetches
from protocols.chunks import piece_digests, split_blob
from protocols.errors import DecodeError
from protocols.messages import BlobChunk, BlobRequest, decode_as

BLOB = bytes(range(256)) * 40  # 10,240 bytes: 10 chunks of 1 KiB
SHA = hashlib.sha256(BLOB).hexdigest()


class Wire:
    """Records what would be published; `connected` can be switched off."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        self.sent.append((topic, payload))
        return None

    def requests(self) -> list[BlobRequest]:
        return [decode_as(BlobRequest, payload) for _, payload in self.sent]


def _chunks() -> list[BlobChunk]:
    return list(split_blob(BLOB, 1024))


def test_a_wanted_blob_is_asked_for_whole_once_then_again_after_the_retry_time() -> None:
    wire = Wire()
    now = [100.0]
    fetches = BlobFetches("dev-1", wire, clock=lambda: now[0])
    fetches.want(SHA)
    fetches.want(SHA)  # wanted twice: one fetch
    fetches.send_due()
    fetches.send_due()  # not due yet
    [request] = wire.requests()
    assert (request.device_id, request.blob_sha256, request.indices) == ("dev-1", SHA, ())
    assert wire.sent[0][0] == "fedge/v1/dev/dev-1/blob/req"
    now[0] += blob_fetch.FETCH_RETRY_S - 0.5
    fetches.send_due()
    assert len(wire.requests()) == 1
    now[0] += 1.0
    fetches.send_due()
    assert len(wire.requests()) == 2


def test_after_a_cut_it_asks_only_for_the_missing_chunks_and_returns_the_blob() -> None:
    wire = Wire()
    fetches = BlobFetches("dev-1", wire)
    fetches.want(SHA)
    fetches.send_due()
    chunks = _chunks()
    for chunk in chunks[:4]:
        assert fetches.add_chunk(chunk) is None
    fetches.restart()  # reconnected
    fetches.send_due()
    assert wire.requests()[-1].indices == tuple(range(4, 10))
    for chunk in chunks[4:9]:
        assert fetches.add_chunk(chunk) is None
    assert fetches.add_chunk(chunks[9]) == BLOB
    fetches.stored(SHA)  # (what the caller says once the blob is in the store)
    assert fetches.add_chunk(chunks[0]) is None  # complete: no longer fetched
    fetches.restart()
    fetches.send_due()
    assert len(wire.requests()) == 2  # nothing left to ask for


def test_a_blob_the_caller_could_not_store_is_asked_for_again() -> None:
    # (a full disk: the reassembled blob is lost, and the deployment waiting for it was
    # stuck for good)
    wire = Wire()
    now = [100.0]
    fetches = BlobFetches("dev-1", wire, clock=lambda: now[0])
    fetches.want(SHA, len(BLOB))
    fetches.send_due()
    assert [fetches.add_chunk(c) for c in _chunks()][-1] == BLOB  # ... not stored
    fetches.send_due()
    assert len(wire.requests()) == 1  # not at once
    now[0] += blob_fetch.FETCH_RETRY_S + 1
    fetches.send_due()
    assert wire.requests()[-1].indices == ()  # the whole blob again
    assert [fetches.add_chunk(c) for c in _chunks()][-1] == BLOB
    fetches.stored(SHA)
    now[0] += blob_fetch.FETCH_RETRY_S + 1
    fetches.send_due()
    assert len(wire.requests()) == 2


def test_a_corrupt_blob_is_refused_and_fetched_whole_again() -> None:
    wire = Wire()
    fetches = BlobFetches("dev-1", wire)
    fetches.want(SHA)
    chunks = _chunks()
    bad = dataclasses.replace(chunks[3], data=bytes(len(chunks[3].data)))  # zeros
    for chunk in [*chunks[:3], bad, *chunks[4:9]]:
        assert fetches.add_chunk(chunk) is None
    with pytest.raises(DecodeError):
        fetches.add_chunk(chunks[9])
    fetches.send_due()
    assert wire.requests()[-1].indices == ()  # whole, from scratch
    for chunk in chunks[:9]:
        assert fetches.add_chunk(chunk) is None
    assert fetches.add_chunk(chunks[9]) == BLOB


def test_unrequested_chunks_are_ignored_and_nothing_is_sent_offline() -> None:
    wire = Wire()
    fetches = BlobFetches("dev-1", wire)
    assert fetches.add_chunk(_chunks()[0]) is None
    wire.connected = False
    fetches.want(SHA)
    fetches.send_due()
    assert wire.sent == []


def test_a_forged_first_chunk_of_another_layout_does_not_block_the_genuine_ones() -> None:
    wire = Wire()
    fetches = BlobFetches("dev-1", wire)
    fetches.want(SHA, len(BLOB))
    forged = BlobChunk(SHA, 0, 5, len(BLOB), 2048, bytes(2048))  # right hash and size
    assert fetches.add_chunk(forged) is None
    *first, last = _chunks()
    for chunk in first:
        assert fetches.add_chunk(chunk) is None
    assert fetches.add_chunk(last) == BLOB  # collected apart from the forged layout


def test_chunks_claiming_another_size_than_the_manifest_are_refused() -> None:
    fetches = BlobFetches("dev-1", Wire())
    fetches.want(SHA, len(BLOB))
    tiny = BlobChunk(SHA, 0, 1 << 16, 1 << 16, 1, b"x")  # would ask for 65,536 chunks
    with pytest.raises(DecodeError, match="manifest says 10240") as refused:
        fetches.add_chunk(tiny)
    assert refused.value.reason == "bad_chunk"
    assert [fetches.add_chunk(c) for c in _chunks()][-1] == BLOB


def test_layouts_per_blob_are_capped_and_a_new_one_replaces_the_emptiest() -> None:
    fetches = BlobFetches("dev-1", Wire())
    fetches.want(SHA)  # size not known: any self-consistent layout is kept apart
    for n in range(blob_fetch.MAX_LAYOUTS):
        fetches.add_chunk(BlobChunk(SHA, 0, -(-len(BLOB) // (100 + n)), len(BLOB), 100 + n,
                                    bytes(100 + n)))  # fmt: skip
    *first, last = _chunks()
    for chunk in first:  # a fifth layout: it replaces one, and is collected
        assert fetches.add_chunk(chunk) is None
    assert len(fetches._fetches[SHA].layouts) == blob_fetch.MAX_LAYOUTS
    assert fetches.add_chunk(last) == BLOB


def test_forged_chunks_of_new_layouts_leave_no_trace_with_piece_digests() -> None:
    # Four forged first chunks, each of its own chunk size (whole pieces), used to fill
    # every layout slot and make the genuine chunks unacceptable until a restart.
    fetches = BlobFetches("dev-1", Wire())
    fetches.want(SHA, len(BLOB), 1024, piece_digests(BLOB, 1024))
    for n in range(1, blob_fetch.MAX_LAYOUTS + 3):
        size = 1024 * n
        forged = BlobChunk(SHA, 0, -(-len(BLOB) // size), len(BLOB), size, bytes(size))
        with pytest.raises(DecodeError) as refused:
            fetches.add_chunk(forged)
        assert refused.value.reason == "bad_piece"
    assert fetches._fetches[SHA].layouts == {}
    assert [fetches.add_chunk(c) for c in _chunks()][-1] == BLOB


def test_a_request_lists_at_most_max_listed_chunks_else_asks_for_all() -> None:
    big = bytes(range(256)) * 4 * (blob_fetch.MAX_LISTED + 2)  # MAX_LISTED + 2 chunks of 1 KiB
    sha = hashlib.sha256(big).hexdigest()
    wire = Wire()
    now = [0.0]
    fetches = BlobFetches("dev-1", wire, clock=lambda: now[0])
    fetches.want(sha, len(big))
    chunks = list(split_blob(big, 1024))
    fetches.add_chunk(chunks[0])
    now[0] += 10
    fetches.send_due()
    assert wire.requests()[-1].indices == ()  # 513 missing: the whole blob instead
    fetches.add_chunk(chunks[1])
    now[0] += 10
    fetches.send_due()
    assert wire.requests()[-1].indices == tuple(range(2, blob_fetch.MAX_LISTED + 2))


def test_with_piece_digests_a_forged_chunk_is_refused_at_once_and_only_it_asked_for() -> None:
    # (the same corruption as above: without digests the whole blob was fetched again)
    wire = Wire()
    fetches = BlobFetches("dev-1", wire)
    fetches.want(SHA, len(BLOB), 1024, piece_digests(BLOB, 1024))
    chunks = _chunks()
    bad = dataclasses.replace(chunks[3], data=bytes(len(chunks[3].data)))
    for chunk in chunks[:3]:
        assert fetches.add_chunk(chunk) is None
    with pytest.raises(DecodeError, match="piece 3 does not match") as refused:
        fetches.add_chunk(bad)
    assert refused.value.reason == "bad_piece"
    for chunk in chunks[4:]:
        assert fetches.add_chunk(chunk) is None
    fetches.send_due()
    assert wire.requests()[-1].indices == (3,)  # the verified chunks are kept
    assert fetches.add_chunk(chunks[3]) == BLOB


def test_piece_digests_learnt_later_apply_to_layouts_begun_after() -> None:
    fetches = BlobFetches("dev-1", Wire())
    fetches.want(SHA)
    fetches.want(SHA, len(BLOB), 1024, piece_digests(BLOB, 1024))  # from a manifest
    bad = dataclasses.replace(_chunks()[0], data=bytes(1024))
    with pytest.raises(DecodeError, match="signed digest"):
        fetches.add_chunk(bad)
    assert [fetches.add_chunk(c) for c in _chunks()][-1] == BLOB
