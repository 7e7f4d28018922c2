"""Piece digests: a signed manifest lists the sha256 of each 64 KiB piece of a file, so a
device checks each chunk as it arrives instead of only the whole blob at the end."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest

from protocols import messages
from protocols.chunks import PIECE_SIZE, Reassembly, piece_digests, serving_chunk_size, split_blob
from protocols.errors import DecodeError
from protocols.messages import BlobChunk, FileEntry, ModelManifest, TensorSpec

SHA = "ab" * 32


def _blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _forged(chunk: BlobChunk) -> BlobChunk:
    """The same chunk header with other bytes (the first one flipped)."""
    data = bytearray(bytes(chunk.data))
    data[0] ^= 0xFF
    return dataclasses.replace(chunk, data=bytes(data))


@pytest.mark.parametrize(("size", "count"), [(0, 1), (1, 1), (10, 1), (11, 2), (40, 4), (41, 5)])
def test_piece_digests_are_the_sha256_of_each_slice(size: int, count: int) -> None:
    blob = _blob(size)
    digests = piece_digests(blob, 10)
    assert len(digests) == 32 * count
    assert [digests[32 * i : 32 * i + 32] for i in range(count)] == [
        hashlib.sha256(blob[10 * i : 10 * i + 10]).digest() for i in range(count)
    ]
    with pytest.raises(ValueError, match="positive"):
        piece_digests(blob, 0)


@pytest.mark.parametrize(
    ("asked", "served"),
    [(256 * 1024, 256 * 1024), (100_000, 65_536), (65_536, 65_536), (65_535, 32_768),
     (3000, 2048), (1024, 1024), (1, 1)],
)  # fmt: skip
def test_serving_chunks_hold_whole_pieces_or_lie_inside_one(asked: int, served: int) -> None:
    assert serving_chunk_size(asked) == served
    assert served % PIECE_SIZE == 0 or PIECE_SIZE % served == 0


def test_a_file_entry_without_pieces_is_written_as_before() -> None:
    plain = messages.schema.to_map(FileEntry("m.onnx", SHA, 5))
    assert list(plain) == ["name", "sha256", "size"]
    with_pieces = FileEntry("m.onnx", SHA, 5, 4, bytes(64))
    assert list(messages.schema.to_map(with_pieces)) == [
        "name", "sha256", "size", "piece_size", "pieces",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("piece_size", "pieces", "match"),
    [(0, bytes(32), "positive"), (-4, bytes(32), "positive"), (4, bytes(32), "need 64"),
     (4, bytes(96), "need 64"), (8, b"", "need 32")],
)  # fmt: skip
def test_a_file_entry_with_inconsistent_pieces_is_refused(
    piece_size: int, pieces: bytes, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        FileEntry("m.onnx", SHA, 5, piece_size, pieces)


def test_a_manifest_with_inconsistent_pieces_does_not_decode() -> None:
    entry = FileEntry("m.onnx", SHA, 5, 4, bytes(64))
    manifest = ModelManifest("m", "v1", 1.0, (entry,), (TensorSpec("x", "float32", (-1, 4)),), ())
    good = messages.encode(manifest)
    assert messages.decode_as(ModelManifest, good).files == (entry,)
    bad = good.replace(bytes(64), bytes(63) + b"\x01", 1)  # same length: still consistent
    assert messages.decode_as(ModelManifest, bad).files[0].pieces == bytes(63) + b"\x01"
    short = good.replace(b"\xc4\x40" + bytes(64), b"\xc4\x20" + bytes(32), 1)
    with pytest.raises(DecodeError, match="need 64"):
        messages.decode_as(ModelManifest, short)


@pytest.mark.parametrize("chunk_size", [64, 128, 192])
def test_a_forged_chunk_holding_whole_pieces_is_refused_and_the_genuine_one_taken(
    chunk_size: int,
) -> None:
    blob = _blob(1000)
    parts = list(split_blob(blob, chunk_size))
    r = Reassembly(parts[0], piece_size=64, pieces=piece_digests(blob, 64))
    for part in parts[1:-1]:
        assert r.add(part)
    for bad in (_forged(parts[0]), _forged(parts[-1])):  # a whole chunk, and the short last
        with pytest.raises(DecodeError, match="does not match its signed digest") as caught:
            r.add(bad)
        assert caught.value.reason == "bad_piece"
    assert r.missing() == [0, len(parts) - 1]
    assert r.received_bytes() == sum(len(bytes(p.data)) for p in parts[1:-1])
    assert r.add(parts[0])
    assert r.add(parts[-1])
    assert not r.add(_forged(parts[0]))  # what is kept is verified: a later copy is ignored
    assert r.result() == blob


def test_the_short_last_piece_is_checked_too() -> None:
    blob = _blob(1000)
    parts = list(split_blob(blob, 16))  # 63 chunks; the last piece is chunks 60 to 62
    r = Reassembly(parts[0], piece_size=64, pieces=piece_digests(blob, 64))
    for part in parts[:62]:
        assert r.add(part)
    with pytest.raises(DecodeError, match=r"piece 15 \(chunks 60\.\.62\)"):
        r.add(_forged(parts[62]))
    assert r.missing() == [60, 61, 62]
    assert r.add(parts[62])  # alone, its piece is not complete: kept, unchecked yet
    assert r.add(parts[60])
    assert r.add(parts[61])  # completes the piece, which matches
    assert r.result() == blob


def test_the_piece_holding_a_forged_small_chunk_is_fetched_again() -> None:
    blob = _blob(1000)
    parts = list(split_blob(blob, 16))
    r = Reassembly(parts[0], piece_size=64, pieces=piece_digests(blob, 64))
    for part in parts:
        if part.index != 5:
            r.add(part)
    with pytest.raises(DecodeError, match=r"piece 1 \(chunks 4\.\.7\)") as caught:
        r.add(_forged(parts[5]))
    assert caught.value.reason == "bad_piece"
    assert r.missing() == [4, 5, 6, 7]
    assert r.received_bytes() == 1000 - 64
    for i in (4, 5, 6, 7):
        r.add(parts[i])
    assert r.result() == blob


def test_a_layout_that_splits_pieces_is_refused() -> None:
    blob = _blob(1000)
    first = next(split_blob(blob, 48))  # neither a multiple nor a divisor of 64
    with pytest.raises(DecodeError, match="neither hold whole pieces") as caught:
        Reassembly(first, piece_size=64, pieces=piece_digests(blob, 64))
    assert caught.value.reason == "bad_chunk"
    with pytest.raises(DecodeError, match="do not match the blob's size"):
        Reassembly(first := next(split_blob(blob, 64)), piece_size=64, pieces=bytes(32))
    assert Reassembly(first).add(first)  # without digests: any layout, checked whole


def test_the_empty_blob_has_one_piece() -> None:
    [only] = split_blob(b"", 64)
    r = Reassembly(only, piece_size=64, pieces=piece_digests(b"", 64))
    assert r.add(only)
    assert r.result() == b""
