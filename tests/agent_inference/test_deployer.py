"""The deployment lifecycle table, and the deployer against fakes: fetch, load, ack."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.deployer import DeployDone, Deployer
from agent.deployment import DeployEvent, DeployState, next_deploy_state
from agent.errors import IllegalTransitionError
from agent.model_store import ModelStore
from agent.trust import ManifestTrust
from protocols.messages import Ack, ModelManifest, decode_as
from protocols.signing import SignatureError, generate_private_key, public_key, sign_manifest
from tests.agent_inference.conftest import Bundles

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
