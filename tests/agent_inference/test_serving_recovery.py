"""The serving side after many failed versions and after a restart whose current version
is broken: a good version is still swapped in and acknowledged, and the previous version
is served rather than nothing (the real service, real ONNX models, a real store)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

from agent.inference_service import InferenceService
from agent.model_store import ModelStore
from agent.rollout import VersionEvent, VersionLog, VersionState
from cloud_coordinator.bundles import Bundle
from protocols.model_format import MODEL_FILE
from protocols.signing import sign_manifest
from tests.agent_inference.conftest import Bundles, agent_config, broken, put
from tests.agent_inference.test_deployer import KEY, _boot, _serving, deployment


def test_the_version_log_never_forgets_what_is_served() -> None:
    log = VersionLog(keep=3)
    log.begin("v1")
    log.apply("v1", VersionEvent.READY)
    for n in range(10):
        log.begin(f"bad{n}")
        log.apply(f"bad{n}", VersionEvent.FAIL)
    assert log.state("v1") is VersionState.SERVING
    assert len(log.as_dict()) == 3  # v1 and the two newest failures


def _signed(bundle: Bundle) -> Bundle:
    return dataclasses.replace(bundle, manifest=sign_manifest(bundle.manifest, KEY))


def test_a_good_version_after_many_failed_ones_is_served_and_acknowledged(
    tmp_path: Path, bundles: Bundles
) -> None:
    store = ModelStore(Path(agent_config(tmp_path).data_dir) / "models")
    put(store, _signed(bundles.v1))
    service, deployer, front = _boot(tmp_path)
    try:
        for n in range(20):  # more than the version log keeps
            bad = _signed(broken(bundles.v1, f"bad{n}", b"not an onnx model"))
            put(store, bad, activate=False)
            deployer.on_deploy(deployment(bad.manifest))
            assert service.wait_idle(60)
        assert _serving(service) == "v1"
        assert [a.ok for a in front.acks] == [False] * 20
        good = _signed(bundles.v2)
        put(store, good, activate=False)
        deployer.on_deploy(deployment(good.manifest))
        assert service.wait_idle(60)
        assert _serving(service) == "v2"
        assert (front.acks[-1].ref, front.acks[-1].ok) == ("deploy/digits-mlp/v2", True)
        assert service.rollback()["version"] == "v1"
    finally:
        service.stop()


def test_a_restart_whose_current_version_is_broken_serves_the_previous(
    tmp_path: Path, bundles: Bundles
) -> None:
    broken_v2 = broken(bundles.v2, "v2", b"not an onnx model")
    store = _store_with(tmp_path, bundles.v1, broken_v2)  # current v2, previous v1
    service = _started(tmp_path, store)
    try:
        assert _serving(service) == "v1"
        assert service.health()[0]
        assert len(service.predict(bundles.pixels[0]).classes) == 1
        current = store.current("digits-mlp")
        assert current is not None
        assert current.version == "v1"  # what the next restart serves straight away
    finally:
        service.stop()


def test_a_current_version_damaged_on_disk_is_fetched_again_not_blocked(
    tmp_path: Path, bundles: Bundles
) -> None:
    # Its bytes no longer match its hash: never served as that version, and not held
    # against the version either (it used to be blocked, so never deployed here again).
    store = _store_with(tmp_path, bundles.v1, bundles.v2)  # current v2, previous v1
    entry = next(f for f in bundles.v2.manifest.files if f.name == MODEL_FILE)
    store.blob_path(entry.sha256).write_bytes(b"\0" * entry.size)
    service = _started(tmp_path, store)
    try:
        assert _serving(service) == "v1"
        assert "v2" not in store.blocked("digits-mlp")
        assert store.missing(bundles.v2.manifest) == [entry]  # so a deployment fetches it
        store.put_blob(entry.sha256, bundles.v2.files[MODEL_FILE])
        assert service.install(bundles.v2.manifest)
        assert _serving(service) == "v2"
    finally:
        service.stop()


def test_a_damaged_feedback_file_is_set_aside_not_fatal(tmp_path: Path, bundles: Bundles) -> None:
    service = _started(tmp_path, _store_with(tmp_path, bundles.v1))
    try:
        path = service.feedback_log.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PK\x03\x04 cut short")
        pid = service.predict(bundles.pixels[0]).prediction_id
        assert service.feedback(pid, 3)["stored"]  # (it used to fail until deleted by hand)
        assert list(path.parent.glob("feedback.npz.damaged-*"))
    finally:
        service.stop()


def _store_with(tmp_path: Path, *versions: Bundle) -> ModelStore:
    """The agent's model store with `versions` put in order (the last one current)."""
    store = ModelStore(Path(agent_config(tmp_path).data_dir) / "models")
    for bundle in versions:
        put(store, bundle)
    return store


def _started(tmp_path: Path, store: ModelStore) -> InferenceService:
    """An inference service on `store`, started and done loading."""
    service = InferenceService(agent_config(tmp_path), store, tmp_path / "data")
    service.start()
    if not service.wait_idle(60):
        service.stop()
        raise AssertionError("the service did not finish loading in 60 s")
    return service


def test_a_rollback_during_the_loaders_pointer_write_is_what_a_restart_serves(
    tmp_path: Path, bundles: Bundles
) -> None:
    # The loader points the store at what is served after it keeps a standby; a rollback
    # then, while that write was on its way, was overwritten by it: the device served v1,
    # acknowledged the rollback, and a restart served v2 again.
    store = _store_with(tmp_path, bundles.v1, bundles.v2)
    service = _started(tmp_path, store)
    entered = threading.Event()
    point = store.point

    def slow_point(name: str, current: str, previous: str | None) -> None:
        if threading.current_thread().name == "loader-like":
            entered.set()
            time.sleep(0.5)  # (the write of what was served before the rollback, slow)
        point(name, current, previous)

    try:
        store.point = slow_point  # type: ignore[method-assign]
        loader = threading.Thread(target=service._point_store, name="loader-like")
        loader.start()
        assert entered.wait(10)
        assert service.rollback()["serving"]["version"] == "v1"
        loader.join(10)
    finally:
        service.stop()
    current = ModelStore(store.root).current("digits-mlp")
    assert current is not None
    assert current.version == "v1"
