"""The learner against trouble from outside: a failed publish (a full outgoing queue) does
not end its thread, and a replayed older manifest does not downgrade the device."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent import blob_fetch, learning
from agent.compression import JobCompressors
from agent.learning import Learner, TaskFailedError
from agent.trust import ManifestTrust
from protocols.chunks import split_blob
from protocols.errors import DecodeError
from protocols.messages import Ack, TrainTask
from protocols.mqtt import PublishError
from protocols.signing import generate_private_key, public_key, sign_manifest
from tests.agent_inference.conftest import make_bundles, put


class _FlakyTransport:
    """Refuses the first blob request, as a full outgoing queue would."""

    connected = True

    def __init__(self) -> None:
        self.failed = False
        self.published: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        if not self.failed and topic.endswith("blob/req"):
            self.failed = True
            raise PublishError("outgoing queue full (1000 messages)")
        self.published.append(topic)
        return None

    def subscribe(self, topic: str, qos: int = 1) -> None:
        pass


def test_a_failed_publish_does_not_end_the_learner_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blob_fetch, "FETCH_RETRY_S", 0.05)
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    wire = _FlakyTransport()
    learner = Learner("dev-1", tmp_path, tmp_path / "data", wire, 1 << 20,  # type: ignore[arg-type]
                      ManifestTrust((), tmp_path))  # fmt: skip
    learner.fetches.want(hashlib.sha256(b"x").hexdigest())
    learner.start()
    try:
        deadline = time.monotonic() + 10
        while "fedge/v1/dev/dev-1/blob/req" not in wire.published:
            assert time.monotonic() < deadline, "the blob was never asked for again"
            time.sleep(0.05)
        assert wire.failed
        assert learner._thread.is_alive()
        assert escaped == []
    finally:
        learner.stop()


def test_a_replayed_older_manifest_is_kept_but_not_switched_to(tmp_path: Path) -> None:
    key = generate_private_key()
    bundles = make_bundles()
    v1, v2 = (sign_manifest(b.manifest, key) for b in (bundles.v1, bundles.v2))
    learner = Learner("dev-1", tmp_path, tmp_path / "data", _FlakyTransport(), 1 << 20,  # type: ignore[arg-type]
                      ManifestTrust((public_key(key),), tmp_path))  # fmt: skip
    learner.start()
    try:
        for bundle, manifest in ((bundles.v1, v1), (bundles.v2, v2)):
            put(learner.store, dataclasses.replace(bundle, manifest=manifest), activate=False)
        learner.on_manifest(v2)
        assert learner.store.current(v2.name) == v2
        with pytest.raises(DecodeError, match="older than v2") as stale:
            learner.on_manifest(v1)  # a captured, validly signed manifest sent again
        assert stale.value.reason == "stale"
        assert learner.store.current(v2.name) == v2
        assert learner.store.manifest(v1.name, "v1") == v1  # kept: a task may start from it
    finally:
        learner.stop()


def test_an_update_over_the_brokers_limit_fails_its_task_instead_of_being_resent(
    tmp_path: Path,
) -> None:
    """The coordinator can never accept (so never acknowledge) such an update: queued, it
    was sent again every 10 s for the outbox's whole lifetime."""
    key = generate_private_key()
    bundles = make_bundles()
    v1 = dataclasses.replace(bundles.v1, manifest=sign_manifest(bundles.v1.manifest, key))
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("train.npz", slice(0, 60)), ("val.npz", slice(60, 80))):
        np.savez(data / name, x=bundles.pixels[rows], y=bundles.labels[rows])
    learner = Learner("dev-1", tmp_path, data, _FlakyTransport(), 4096,  # type: ignore[arg-type]
                      ManifestTrust((public_key(key),), tmp_path))  # fmt: skip
    learner.start()
    try:
        put(learner.store, v1)
        task = TrainTask("t1", "job-1", 1, v1.manifest.name, v1.manifest.version,
                         time.time() + 60, "f32", {"epochs": 1, "max_seconds": 5.0})  # fmt: skip
        with pytest.raises(TaskFailedError, match="over the broker's limit of 4096"):
            learner._train(task)
        assert learner.outbox.depth() == 0
    finally:
        learner.stop()


class _SlowLinkTransport:
    """Hands out publish handles that stay 'queued' until `deliver` (a slow uplink)."""

    connected = True

    def __init__(self) -> None:
        self.copies: list[str] = []
        self.delivered = False

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        self.copies.append(topic)
        transport = self

        class Handle:
            def done(self) -> bool:
                return transport.delivered

        return Handle()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        pass


def test_an_update_still_queued_in_the_client_is_not_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire = _SlowLinkTransport()
    learner = Learner("dev-1", tmp_path, tmp_path / "data", wire, 1 << 20,  # type: ignore[arg-type]
                      ManifestTrust((), tmp_path))  # fmt: skip
    try:
        learner.outbox.put("u1", "fedge/v1/dev/dev-1/update", b"update")
        now = [time.time()]
        due = learner.outbox.due
        monkeypatch.setattr(learner.outbox, "due", lambda after, skip=(): due(0, now[0], skip))
        learner.sender.resend_due()
        assert len(wire.copies) == 1
        for _ in range(5):  # due again and again, but the first copy has not left yet
            now[0] += 60
            learner.sender.resend_due()
        assert len(wire.copies) == 1
        wire.delivered = True  # taken by the broker, still not acknowledged: sent again
        now[0] += 60
        learner.sender.resend_due()
        assert len(wire.copies) == 2
        learner.on_update_ack(Ack("u1", True, now[0]))
        now[0] += 60
        learner.sender.resend_due()
        assert len(wire.copies) == 2
        assert learner.sender.copies == {}
    finally:
        learner.outbox.close()  # (the learner thread was never started)


def _learner_with_a_task(
    tmp_path: Path, transport: object, max_payload: int, compression: str
) -> tuple[Learner, TrainTask]:
    """A started learner holding v1 and local digits data, and a task to train on it."""
    bundles = make_bundles()
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("train.npz", slice(0, 60)), ("val.npz", slice(60, 80))):
        np.savez(data / name, x=bundles.pixels[rows], y=bundles.labels[rows])
    learner = Learner("dev-1", tmp_path, data, transport, max_payload,  # type: ignore[arg-type]
                      ManifestTrust((), tmp_path, allow_unsigned=True))  # fmt: skip
    learner.start()
    put(learner.store, bundles.v1)
    task = TrainTask("t1", "job-1", 1, bundles.v1.manifest.name, bundles.v1.manifest.version,
                     time.time() + 60, compression, {"epochs": 1, "max_seconds": 5.0})  # fmt: skip
    return learner, task


def test_a_task_whose_update_is_not_queued_leaves_the_residuals_as_they_were(
    tmp_path: Path,
) -> None:
    """Error feedback: what top-k leaves out is carried to the next round. It used to be
    saved before the update was known to fit, so a task failing after compression lost it."""
    learner, task = _learner_with_a_task(tmp_path, _FlakyTransport(), 200, "topk")
    try:
        with pytest.raises(TaskFailedError, match="over the broker's limit of 200"):
            learner._train(task)
        assert learner.compressors.get("job-1").residuals == {}
        assert not (tmp_path / "residuals" / "job-1.npz").exists()
    finally:
        learner.stop()


def test_feature_cache_and_job_residuals_are_bounded(tmp_path: Path) -> None:
    bundles = make_bundles()
    learner = Learner("dev-1", tmp_path, tmp_path / "data", _FlakyTransport(), 1 << 20,  # type: ignore[arg-type]
                      ManifestTrust((), tmp_path, allow_unsigned=True))  # fmt: skip
    try:
        put(learner.store, bundles.v1)
        for n in range(10):  # new feedback each round: new training data each time
            learner._features(bundles.v1.manifest, bundles.pixels[n : n + 20])
        assert len(learner._feature_cache) <= learning.FEATURE_CACHE_ENTRIES
        for n in range(10):
            learner.compressors.get(f"job-{n}").save()
        assert len(learner.compressors) == learning.KEPT_JOBS
        kept = sorted(p.name for p in (tmp_path / "residuals").glob("*.npz"))
        assert len(kept) <= learning.KEPT_JOBS
        assert "job-9.npz" in kept
    finally:
        learner.outbox.close()


class _FullQueueTransport(_FlakyTransport):
    """Refuses every update: the client's outgoing queue is full."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        if topic.endswith("/update"):
            raise PublishError("outgoing queue full (10000 messages)")
        return super().publish(topic, payload, qos, retain)


def test_an_update_queued_but_not_yet_sendable_is_a_task_done(tmp_path: Path) -> None:
    learner, task = _learner_with_a_task(tmp_path, _FullQueueTransport(), 1 << 20, "f32")
    try:
        learner._train(task)  # no TaskFailedError: the update waits in the outbox
        assert learner.outbox.depth() == 1
    finally:
        learner.stop()


def test_job_residuals_are_kept_for_the_jobs_trained_most_recently(tmp_path: Path) -> None:
    compressors = JobCompressors(tmp_path / "residuals", keep=4)
    for job in ("A", "B", "C", "D", "A", "E"):  # A trains again before E arrives
        compressors.get(job).save()
    on_disk = sorted(p.stem for p in (tmp_path / "residuals").glob("*.npz"))
    assert on_disk == ["A", "C", "D", "E"]  # B, the least recently trained, is gone
    assert len(compressors) == 4


def test_a_blob_that_cannot_be_stored_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk as the last chunk arrives: the blob is asked for again, not lost for good
    # (a deployment waiting for it used to be stuck until a restart).
    blob = bytes(range(256)) * 64
    sha = hashlib.sha256(blob).hexdigest()
    learner = Learner("dev-1", tmp_path, tmp_path / "data", _FlakyTransport(), 1 << 20,  # type: ignore[arg-type]
                      ManifestTrust((), tmp_path))  # fmt: skip
    learner.fetches.want(sha, len(blob))
    real_put = learner.store.put_blob

    def disk_full(digest: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(learner.store, "put_blob", disk_full)
    for chunk in split_blob(blob, 4096):
        learner.on_chunk(chunk)
    assert not learner.store.has_blob(sha)
    assert sha in learner.fetches._fetches  # still wanted: asked for again
    monkeypatch.setattr(learner.store, "put_blob", real_put)
    for chunk in split_blob(blob, 4096):
        learner.on_chunk(chunk)
    assert learner.store.read_blob(sha) == blob
    assert sha not in learner.fetches._fetches
    learner.outbox.close()
