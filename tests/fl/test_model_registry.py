"""The model registry on a real directory: blobs, versions, lineage, metrics, restarts."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_coordinator.errors import StoreError
from cloud_coordinator.model_registry import ModelRegistry, VersionRecord
from protocols.messages import FileEntry, ModelManifest, TensorSpec


@dataclass(frozen=True)
class FakeBundle:
    """Files and manifest, as `cloud_coordinator.bundles.Bundle` has them (without torch)."""

    files: dict[str, bytes]
    manifest: ModelManifest


def make_bundle(
    version: str, parent: str | None = None, name: str = "digits", head: bytes = b""
) -> FakeBundle:
    files = {"backbone.onnx": b"backbone", "head.tensors": head or version.encode() * 100}
    entries = tuple(
        FileEntry(n, hashlib.sha256(d).hexdigest(), len(d)) for n, d in sorted(files.items())
    )
    manifest = ModelManifest(
        name=name,
        version=version,
        created=float(len(version)),
        files=entries,
        inputs=(TensorSpec("input", "float32", (-1, 64)),),
        outputs=(TensorSpec("logits", "float32", (-1, 10)),),
        parent_version=parent,
        labels=("a", "b"),
        preprocessing={"scale": 0.0625},
    )
    return FakeBundle(files, manifest)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    reg = ModelRegistry(tmp_path / "models")
    yield reg
    reg.close()


def test_put_stores_blobs_by_hash_and_the_manifest(registry: ModelRegistry) -> None:
    bundle = make_bundle("v1")
    record = registry.put(bundle, metrics={"accuracy": 0.25})
    assert record == VersionRecord(
        "digits", "v1", None, 2.0, bundle.manifest, metrics={"accuracy": 0.25}
    )
    assert registry.manifest("digits", "v1") == bundle.manifest
    for entry in bundle.manifest.files:
        assert registry.has_blob(entry.sha256)
        assert (registry.root / "blobs" / entry.sha256).read_bytes() == bundle.files[entry.name]
        assert registry.blob(entry.sha256) == bundle.files[entry.name]
    assert registry.files("digits", "v1") == bundle.files
    assert not list((registry.root / "blobs").glob(".tmp-*"))


def test_shared_files_are_stored_once(registry: ModelRegistry) -> None:
    registry.put(make_bundle("v1"))
    registry.put(make_bundle("v2", parent="v1"))
    assert len(list((registry.root / "blobs").iterdir())) == 3  # one backbone, two heads


def test_versions_follow_the_lineage_and_latest_is_the_newest(registry: ModelRegistry) -> None:
    assert registry.latest("digits") is None
    assert registry.versions("digits") == []
    registry.put(make_bundle("v1"))
    registry.put(make_bundle("v2", parent="v1"), job_id="job-1", round=1, devices=["agent-01"])
    registry.put(make_bundle("v3", parent="v2"), job_id="job-1", round=2, devices=["a", "b"])
    registry.put(make_bundle("v1", name="other"))
    records = registry.versions("digits")
    assert [(r.version, r.parent) for r in records] == [("v1", None), ("v2", "v1"), ("v3", "v2")]
    assert (records[2].job_id, records[2].round, records[2].devices) == ("job-1", 2, ("a", "b"))
    latest = registry.latest("digits")
    assert latest is not None
    assert latest.version == "v3"
    assert registry.names() == ["digits", "other"]


def test_a_version_needs_its_parent_and_cannot_be_replaced(registry: ModelRegistry) -> None:
    with pytest.raises(StoreError, match="parent v0"):
        registry.put(make_bundle("v1", parent="v0"))
    registry.put(make_bundle("v1"))
    registry.put(make_bundle("v1"))  # the same bytes again: accepted, nothing changes
    assert len(registry.versions("digits")) == 1
    with pytest.raises(StoreError, match="already registered"):
        registry.put(make_bundle("v1", head=b"different"))


def test_a_bundle_whose_files_do_not_match_its_manifest_is_refused(
    registry: ModelRegistry,
) -> None:
    good = make_bundle("v1")
    tampered = FakeBundle({**good.files, "head.tensors": b"tampered"}, good.manifest)
    with pytest.raises(ValueError, match=r"head\.tensors"):
        registry.put(tampered)
    extra = FakeBundle({**good.files, "model.onnx": b"x"}, good.manifest)
    with pytest.raises(ValueError, match="manifest lists"):
        registry.put(extra)
    assert registry.versions("digits") == []


def test_missing_and_corrupt_blobs_raise_store_errors(registry: ModelRegistry) -> None:
    bundle = make_bundle("v1")
    registry.put(bundle)
    absent = hashlib.sha256(b"nothing").hexdigest()
    assert not registry.has_blob(absent)
    with pytest.raises(StoreError, match="not in the registry"):
        registry.blob(absent)
    entry = bundle.manifest.files[0]
    (registry.root / "blobs" / entry.sha256).write_bytes(b"bit rot")
    with pytest.raises(StoreError, match="corrupt"):
        registry.blob(entry.sha256)
    assert registry.put_blob(bundle.files[entry.name]) == entry.sha256  # repaired
    assert registry.blob(entry.sha256) == bundle.files[entry.name]
    with pytest.raises(ValueError, match="sha256"):
        registry.blob("../models.db")


def test_unknown_versions_raise_store_errors(registry: ModelRegistry) -> None:
    with pytest.raises(StoreError, match="no version 'v9'"):
        registry.manifest("digits", "v9")
    with pytest.raises(StoreError, match="no version"):
        registry.record_metrics("digits", "v9", {"accuracy": 1.0})


def test_metrics_are_json_scalars_and_are_merged(registry: ModelRegistry) -> None:
    registry.put(make_bundle("v1"), metrics={"accuracy": 0.5, "loss": 2.0, "device": "cpu"})
    registry.record_metrics("digits", "v1", {"accuracy": 0.75, "n": 360, "loss": float("nan")})
    assert registry.record("digits", "v1").metrics == {
        "accuracy": 0.75,
        "loss": None,
        "device": "cpu",
        "n": 360,
    }
    with pytest.raises(ValueError, match="not a JSON scalar"):
        registry.record_metrics("digits", "v1", {"per_class": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="not a JSON scalar"):
        registry.put(make_bundle("v2", parent="v1"), metrics={"x": b"1"})  # type: ignore[dict-item]
    assert [r.version for r in registry.versions("digits")] == ["v1"]


def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    root = tmp_path / "models"
    with ModelRegistry(root) as first:
        first.put(make_bundle("v1"))
        first.put(make_bundle("v2", parent="v1"), job_id="j", round=3, devices=["d"])
        first.record_metrics("digits", "v2", {"accuracy": 0.9})
        before = first.versions("digits")
    with ModelRegistry(root) as second:
        assert second.versions("digits") == before
        assert second.files("digits", "v2") == make_bundle("v2", parent="v1").files
        second.put(make_bundle("v3", parent="v2"))
        latest = second.latest("digits")
        assert latest is not None
        assert latest.parent == "v2"
    with sqlite3.connect(root / "models.db") as db:
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    db.close()
    assert mode == "wal"


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "models"
    ModelRegistry(root).close()
    with sqlite3.connect(root / "models.db") as db:
        db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        ModelRegistry(root)


def test_an_unusable_root_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open"):
        ModelRegistry(tmp_path / "file")
    (tmp_path / "garbage" / "blobs").mkdir(parents=True)
    (tmp_path / "garbage" / "models.db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot use"):
        ModelRegistry(tmp_path / "garbage")


def test_threads_sharing_the_registry_lose_no_update(registry: ModelRegistry) -> None:
    """Jobs, ingest, HTTP and rollouts use one registry: each merge must see the last."""
    registry.put(make_bundle("v1"), job_id="j", round=0, devices=(), metrics={})
    errors: list[BaseException] = []

    def merge(worker: int) -> None:
        try:
            for i in range(40):
                registry.record_metrics("digits", "v1", {f"w{worker}.{i}": i})
                registry.versions("digits")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=merge, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for i in range(2, 12):  # registrations meanwhile, from this thread
        registry.put(make_bundle(f"v{i}", f"v{i - 1}"), job_id="j", round=i, devices=(),
                     metrics={})  # fmt: skip
    for t in threads:
        t.join()
    assert errors == []
    metrics = registry.record("digits", "v1").metrics
    assert sorted(metrics) == sorted(f"w{w}.{i}" for w in range(4) for i in range(40))
    assert len(registry.versions("digits")) == 11
