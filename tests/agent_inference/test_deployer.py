"""The deployment lifecycle table, and the deployer against fakes: fetch, load, ack."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.deployer import BLOCKED, DeployDone, Deployer
from agent.deployment import DeployEvent, DeployState, next_deploy_state
from agent.errors import IllegalTransitionError
from agent.inference_service import InferenceService
from agent.model_store import ModelStore
from agent.trust import ManifestTrust
from protocols.messages import Ack, ModelManifest, decode_as
from protocols.signing import SignatureError, generate_private_key, public_key, sign_manifest
from tests.agent_inference.conftest import Bundles, agent_config, put

KEY = generate_private_key()


class _Fakes:
    def __init__(self) -> None:
        self.loads: list[ModelManifest] = []
        self.acks: list[Ack] = []
        self.fetched: list[str] = []

    def fetch(self, manifest: ModelManifest) -> bool:
        self.fetched.append(manifest.version)
        return False  # the blobs arrive later

    def deploy(self, manifest: ModelManifest, done: DeployDone) -> str | None:
        self.loads.append(manifest)
        return None

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        self.acks.append(decode_as(Ack, payload))
        return None


def test_the_table_allows_only_its_cells() -> None:
    state = next_deploy_state(DeployState.FETCHING, DeployEvent.BLOBS_READY)
    assert next_deploy_state(state, DeployEvent.LOAD_FAILED) is DeployState.FAILED
    with pytest.raises(IllegalTransitionError):
        next_deploy_state(DeployState.SERVED, DeployEvent.LOADED)


def test_a_deployment_loads_once_its_blobs_are_here_and_is_acknowledged(
    tmp_path: Path, bundles: Bundles
) -> None:
    store = ModelStore(tmp_path / "models")
    fakes = _Fakes()
    trust = ManifestTrust((public_key(KEY),), tmp_path)
    deployer = Deployer("dev-1", store, trust, fakes, fakes, fakes)
    manifest = sign_manifest(bundles.v1.manifest, KEY)
    deployer.on_deploy(manifest)
    assert (deployer.state, fakes.fetched, fakes.loads) == (DeployState.FETCHING, ["v1"], [])
    assert store.deployed("digits-mlp") == "v1"
    for name, data in bundles.v1.files.items():
        store.put_blob(next(f.sha256 for f in manifest.files if f.name == name), data)
        deployer.blob_stored()
    assert fakes.loads == [manifest]
    deployer.deploy_finished(manifest, False, "warmup: boom")
    assert [(a.ref, a.ok, a.reason) for a in fakes.acks] == [
        ("deploy/digits-mlp/v1", False, "warmup: boom")
    ]
    deployer.on_deploy(manifest)  # the retained message again: the same answer, no reload
    assert (len(fakes.loads), fakes.acks[-1].duplicate, fakes.acks[-1].ok) == (1, True, False)
    with pytest.raises(SignatureError):
        deployer.on_deploy(bundles.v2.manifest)  # unsigned
    assert (fakes.acks[-1].ref, fakes.acks[-1].reason) == (
        "deploy/digits-mlp/v2", "manifest_rejected_unsigned",
    )  # fmt: skip


class _Storefront:
    """Fetcher (blobs already stored) and publisher (acks kept) for the real service."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.acks: list[Ack] = []

    def fetch(self, manifest: ModelManifest) -> bool:
        return not self.store.missing(manifest)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        self.acks.append(decode_as(Ack, payload))
        return None


def _boot(tmp_path: Path) -> tuple[InferenceService, Deployer, _Storefront]:
    config = agent_config(tmp_path)
    store = ModelStore(Path(config.data_dir) / "models")
    service = InferenceService(config, store, tmp_path / "data")
    service.start()
    assert service.wait_idle(60)
    front = _Storefront(store)
    trust = ManifestTrust((public_key(KEY),), tmp_path)
    return service, Deployer("dev-1", store, trust, front, service, front), front


def _v2_deployed_over_v1(
    tmp_path: Path, bundles: Bundles
) -> tuple[InferenceService, Deployer, _Storefront, ModelManifest]:
    """A device serving v1 (signed, stored), then deployed v2; v2's manifest."""
    store = ModelStore(Path(agent_config(tmp_path).data_dir) / "models")
    v1, v2 = (dataclasses.replace(b, manifest=sign_manifest(b.manifest, KEY))
              for b in (bundles.v1, bundles.v2))  # fmt: skip
    put(store, v1)
    put(store, v2, activate=False)
    service, deployer, front = _boot(tmp_path)
    deployer.on_deploy(v2.manifest)
    assert service.wait_idle(60)
    return service, deployer, front, v2.manifest


def _serving(service: InferenceService) -> str | None:
    return service.runtime.serving.version if service.runtime.serving else None


def test_a_deployed_version_is_served_again_after_a_restart_offline(
    tmp_path: Path, bundles: Bundles
) -> None:
    service, _, front, _ = _v2_deployed_over_v1(tmp_path, bundles)
    assert (_serving(service), front.acks[-1].ok) == ("v2", True)
    service.stop()
    service, _, _ = _boot(tmp_path)  # no broker: no deploy message arrives
    try:
        assert _serving(service) == "v2"
        assert service.health()[0]
    finally:
        service.stop()


def test_a_local_rollback_is_not_undone_by_the_retained_deploy(
    tmp_path: Path, bundles: Bundles
) -> None:
    service, deployer, front, v2 = _v2_deployed_over_v1(tmp_path, bundles)
    service.rollback()  # an operator, on the device
    deployer.on_deploy(v2)  # the retained message again, after a reconnect
    assert service.wait_idle(60)
    last = front.acks[-1]
    assert (last.ok, last.duplicate, last.reason) == (False, True, BLOCKED)  # not "served"
    assert _serving(service) == "v1"
    service.stop()
    service, deployer, front = _boot(tmp_path)  # a restart, then the retained message
    try:
        deployer.on_deploy(v2)
        assert service.wait_idle(60)
        assert _serving(service) == "v1"
        assert (front.acks[-1].ok, front.acks[-1].reason) == (False, BLOCKED)
    finally:
        service.stop()


def test_a_load_finishing_for_an_earlier_deployment_of_the_version_is_ignored(
    tmp_path: Path, bundles: Bundles
) -> None:
    """A, then B, then A again while A's first load is still queued: that load's end must
    not be taken for the new A deployment (it is still fetching), nor crash the loader."""
    store = ModelStore(tmp_path / "models")
    fakes = _Fakes()
    deployer = Deployer("dev-1", store, ManifestTrust((public_key(KEY),), tmp_path),
                        fakes, fakes, fakes)  # fmt: skip
    a, b = (sign_manifest(x.manifest, KEY) for x in (bundles.v1, bundles.v2))
    deployer.on_deploy(a)
    for name, data in bundles.v1.files.items():
        store.put_blob(next(f.sha256 for f in a.files if f.name == name), data)
    deployer.blob_stored()
    assert fakes.loads == [a]  # A is loading
    deployer.on_deploy(b)  # B: its blobs not here yet
    deployer.on_deploy(a)  # A again: a new deployment, fetching
    deployer.deploy_finished(a, True, "")  # the first load of A ends: not this deployment's
    assert deployer.state is DeployState.FETCHING
    assert fakes.acks == []
    deployer.blob_stored()
    assert fakes.loads == [a, a]
    deployer.deploy_finished(a, True, "")  # its own load
    assert deployer.state is DeployState.SERVED
    assert [(x.ref, x.ok) for x in fakes.acks] == [("deploy/digits-mlp/v1", True)]
