"""The agent's model cache on a real directory: verified blobs, manifests, versions, eviction."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest

from agent.model_store import ModelStore, ModelStoreError
from protocols.messages import FileEntry, ModelManifest, TensorSpec


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(version: str, files: dict[str, bytes], name: str = "digits") -> ModelManifest:
    return ModelManifest(
        name=name,
        version=version,
        created=1.0,
        files=tuple(FileEntry(n, sha(d), len(d)) for n, d in files.items()),
        inputs=(TensorSpec("input", "float32", (-1, 64)),),
        outputs=(TensorSpec("logits", "float32", (-1, 10)),),
    )


def put_all(store: ModelStore, files: dict[str, bytes]) -> None:
    for data in files.values():
        store.put_blob(sha(data), data)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_blobs_are_verified_against_their_hash(store: ModelStore) -> None:
    data = b"head tensors"
    with pytest.raises(ModelStoreError, match="does not match"):
        store.put_blob(sha(b"something else"), data)
    assert not store.has_blob(sha(b"something else"))
    assert list((store.root / "blobs").iterdir()) == []  # nothing (not even a temp file) left
    store.put_blob(sha(data), data)
    assert store.has_blob(sha(data))
    assert store.read_blob(sha(data)) == data


def test_reading_a_missing_blob_raises(store: ModelStore) -> None:
    with pytest.raises(ModelStoreError, match="not cached"):
        store.read_blob(sha(b"absent"))


@pytest.mark.parametrize("damage", ["other bytes", "truncated"])
def test_a_blob_damaged_on_disk_is_refused_and_removed(store: ModelStore, damage: str) -> None:
    data = bytes(range(256)) * 8
    store.put_blob(sha(data), data)
    path = store.blob_path(sha(data))
    path.write_bytes(bytes(len(data)) if damage == "other bytes" else data[:100])
    with pytest.raises(ModelStoreError, match="damaged on disk"):
        store.read_blob(sha(data))
    assert not store.has_blob(sha(data))  # so that it is fetched again
    m = manifest("v1", {"model.onnx": data})
    assert store.missing(m) == list(m.files)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABC", "0" * 63, "g" * 64, "0" * 65])
def test_blob_names_must_be_sha256_hex(store: ModelStore, bad: str) -> None:
    with pytest.raises(ModelStoreError, match="not a sha256"):
        store.blob_path(bad)
    with pytest.raises(ModelStoreError):
        store.put_blob(bad, b"x")


def test_manifests_are_stored_and_read_back(store: ModelStore) -> None:
    m = manifest("v1", {"head.tensors": b"h1", "model.onnx": b"m1"})
    assert store.manifest("digits", "v1") is None
    store.put_manifest(m)
    assert store.manifest("digits", "v1") == m
    assert store.manifest("digits", "v2") is None
    assert store.manifest("digits", "../v1") is None  # never a path outside the model dir
    with pytest.raises(ModelStoreError, match="invalid model name"):
        store.manifest("../digits", "v1")
    assert ModelStore(store.root).manifest("digits", "v1") == m  # on disk, not in memory


def test_missing_lists_the_files_not_cached_yet(store: ModelStore) -> None:
    files = {"backbone.onnx": b"b", "head.tensors": b"h", "model.onnx": b"m"}
    m = manifest("v1", files)
    assert [f.name for f in store.missing(m)] == ["backbone.onnx", "head.tensors", "model.onnx"]
    store.put_blob(sha(b"h"), b"h")
    assert [f.name for f in store.missing(m)] == ["backbone.onnx", "model.onnx"]
    put_all(store, files)
    assert store.missing(m) == []
    assert store.file(m, "model.onnx") == b"m"
    with pytest.raises(ModelStoreError, match="no file"):
        store.file(m, "other.bin")


def test_activate_refuses_an_incomplete_version(store: ModelStore) -> None:
    files = {"head.tensors": b"h", "model.onnx": b"m"}
    m = manifest("v1", files)
    store.put_manifest(m)
    store.put_blob(sha(b"h"), b"h")
    with pytest.raises(ModelStoreError, match="not fully downloaded"):
        store.activate(m)
    assert store.current("digits") is None
    put_all(store, files)
    store.activate(m)
    assert store.current("digits") == m
    assert store.previous("digits") is None


def test_activate_keeps_the_previous_version(store: ModelStore) -> None:
    heads = [f"head {n}".encode() for n in (1, 2, 3)]
    versions = [manifest(f"v{n}", {"head.tensors": h}) for n, h in enumerate(heads, 1)]
    for m, head in zip(versions, heads, strict=True):
        store.put_manifest(m)
        store.put_blob(sha(head), head)
    v1, v2, v3 = versions
    store.activate(v1)
    store.activate(v2)
    assert (store.current("digits"), store.previous("digits")) == (v2, v1)
    store.activate(v2)  # again: no change, previous is not lost
    assert (store.current("digits"), store.previous("digits")) == (v2, v1)
    store.activate(v3)
    assert (store.current("digits"), store.previous("digits")) == (v3, v2)
    reopened = ModelStore(store.root)
    assert (reopened.current("digits"), reopened.previous("digits")) == (v3, v2)


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00junk", b"../../etc", b"v1 v2"])
def test_a_damaged_version_pointer_is_ignored(store: ModelStore, garbage: bytes) -> None:
    head = b"head 1"
    v1 = manifest("v1", {"head.tensors": head})
    store.put_manifest(v1)
    store.put_blob(sha(head), head)
    store.activate(v1)
    (store.root / "models" / "digits" / "current").write_bytes(garbage)
    (store.root / "models" / "digits" / "deployed").write_bytes(garbage)
    (store.root / "models" / "digits" / "blocked").write_bytes(garbage + b"\nv7\n")
    assert store.current("digits") is None
    assert store.deployed("digits") is None
    assert store.blocked("digits") == {"v7"} | ({"v1", "v2"} if b" " in garbage else set())
    store.activate(v1)
    assert store.current("digits") == v1


def test_models_are_kept_apart(store: ModelStore) -> None:
    a = manifest("v1", {"f": b"a"}, name="alpha")
    b = manifest("v1", {"f": b"b"}, name="beta")
    for m, data in ((a, b"a"), (b, b"b")):
        store.put_manifest(m)
        store.put_blob(sha(data), data)
        store.activate(m)
    assert store.current("alpha") == a
    assert store.current("beta") == b


def test_eviction_drops_oldest_unpinned_blobs_and_never_pinned_ones(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", max_bytes=10**6)
    old = manifest("v1", {"head.tensors": b"P" * 100})  # will be previous
    new = manifest("v2", {"head.tensors": b"C" * 100})  # will be current
    for m in (old, new):
        store.put_manifest(m)
    put_all(store, {"p": b"P" * 100, "c": b"C" * 100})
    store.activate(old)
    store.activate(new)
    stale = [bytes([ord("a") + n]) * 100 for n in range(4)]  # unpinned, from older downloads
    put_all(store, {str(n): data for n, data in enumerate(stale)})
    # The pinned blobs are the oldest on disk; the stale ones get increasing ages after them.
    for age, data in enumerate([b"P" * 100, b"C" * 100, *stale]):
        os.utime(store.blob_path(sha(data)), (1000 + age, 1000 + age))

    store.max_bytes = 350  # 600 bytes held: must shed at least 250, pinned ones excluded
    assert store.evict() == 3
    assert store.has_blob(sha(b"P" * 100))
    assert store.has_blob(sha(b"C" * 100))
    assert [store.has_blob(sha(d)) for d in stale] == [False, False, False, True]

    store.max_bytes = 10  # even far over the cap, the current and previous stay
    assert store.evict() == 1
    assert store.has_blob(sha(b"P" * 100))
    assert store.has_blob(sha(b"C" * 100))
    assert store.current("digits") == new
    assert store.missing(new) == []
    assert store.previous("digits") == old
    assert store.missing(old) == []


def _serving(tmp_path: Path, max_bytes: int, head: bytes) -> ModelStore:
    """A store capped at `max_bytes` whose current version v1 is one file, `head`."""
    store = ModelStore(tmp_path / "models", max_bytes=max_bytes)
    current = manifest("v1", {"head.tensors": head})
    store.put_manifest(current)
    put_all(store, {"h": head})
    store.activate(current)
    return store


def test_put_blob_evicts_over_the_cap(tmp_path: Path) -> None:
    store = _serving(tmp_path, 250, b"H" * 200)
    store.put_blob(sha(b"x" * 40), b"x" * 40)  # 240: fits
    assert store.has_blob(sha(b"x" * 40))
    store.put_blob(sha(b"y" * 40), b"y" * 40)  # 280: something unpinned must go
    assert store.has_blob(sha(b"H" * 200))
    held = sum(p.stat().st_size for p in (store.root / "blobs").iterdir())
    assert held <= 250


@pytest.mark.parametrize("version", ["current", "previous", "deployed", "blocked", ".", ".."])
def test_a_version_named_like_the_stores_own_files_is_refused(
    store: ModelStore, version: str
) -> None:
    files = {"model.onnx": b"onnx"}
    put_all(store, files)
    store.put_manifest(manifest("v1", files))
    store.activate(manifest("v1", files))
    store.block("digits", "v0")
    with pytest.raises(ModelStoreError, match="reserved"):
        store.put_manifest(manifest(version, files))
    assert store.manifest("digits", version) is None
    current = store.current("digits")
    assert current is not None
    assert current.version == "v1"  # the pointer files are intact
    assert store.blocked("digits") == {"v0"}


def test_a_version_being_fetched_keeps_its_blobs_over_the_cap(tmp_path: Path) -> None:
    store = _serving(tmp_path, 250, b"H" * 100)
    served = manifest("v1", {"head.tensors": b"H" * 100})
    files = {"head.tensors": b"N" * 100, "model.onnx": b"M" * 100}
    fetching = dataclasses.replace(manifest("v2", files), created=2.0)  # newer, not current
    store.put_manifest(fetching)
    store.put_blob(sha(b"N" * 100), b"N" * 100)
    store.put_blob(sha(b"M" * 100), b"M" * 100)  # 300 bytes held: over the cap, yet
    assert store.missing(fetching) == []  # nothing of it evicted (it used to lose a blob
    assert store.missing(served) == []  # and fetch it again, each time)


def test_temp_files_a_crash_left_are_removed_at_start(tmp_path: Path) -> None:
    blobs = tmp_path / "models" / "blobs"
    blobs.mkdir(parents=True)
    leftover = blobs / f".{'ab' * 32}.{os.getpid() + 1}.tmp"
    leftover.write_bytes(b"half a blob")
    model_dir = tmp_path / "models" / "models" / "digits"
    model_dir.mkdir(parents=True)
    half_manifest = model_dir / f".v3.{os.getpid() + 1}.tmp"
    half_manifest.write_bytes(b"half a manifest")
    (model_dir / "v2").write_bytes(b"not a temp file")
    ModelStore(tmp_path / "models")
    assert not leftover.exists()
    assert not half_manifest.exists()
    assert (model_dir / "v2").exists()


def test_a_write_cut_short_by_a_full_disk_leaves_no_temp_file(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    data = b"a model"
    with pytest.raises(OSError, match="No space left"):
        store.put_blob(sha(data), data)
    assert list((store.root / "blobs").iterdir()) == []
