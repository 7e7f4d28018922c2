"""The deployment lifecycle table, and the deployer against fakes: fetch, load, ack; and
every deployment it refuses (forged, for another device, replayed)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from agent.deploy_sequence import SEQUENCE_FILE, DeploySequence
from agent.deployer import BLOCKED, DeployDone, Deployer
from agent.deployment import DeployEvent, DeployState, next_deploy_state
from agent.errors import IllegalTransitionError
from agent.inference_service import InferenceService
from agent.model_store import ModelStore
from agent.trust import ManifestTrust
from protocols.errors import DecodeError
from protocols.messages import Ack, Deployment, ModelManifest, decode_as, encode
from protocols.signing import (
    SignatureError,
    generate_private_key,
    public_key,
    sign_deployment,
    sign_manifest,
)
from tests.agent_inference.conftest import Bundles, agent_config, put

KEY = generate_private_key()
_SEQ = itertools.count(1)


def deployment(
    manifest: ModelManifest, seq: int | None = None, device: str = "dev-1", key: bytes = KEY
) -> Deployment:
    """`manifest` deployed to `device`, numbered `seq` (else the next number), signed by `key`."""
    number = next(_SEQ) if seq is None else seq
    return sign_deployment(Deployment(device, number, 1_700_000_000.0, manifest), key)


def deployer_on(tmp_path: Path, fakes: _Fakes, keys: tuple[bytes, ...] = (public_key(KEY),),
                allow_unsigned: bool = False) -> Deployer:  # fmt: skip
    """A deployer of device ``dev-1`` over fakes, its state under `tmp_path`."""
    trust = ManifestTrust(keys, tmp_path, allow_unsigned)
    return Deployer("dev-1", ModelStore(tmp_path / "models"), trust,
                    fakes, fakes, fakes, DeploySequence(tmp_path))  # fmt: skip


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
    deployer = Deployer("dev-1", store, trust, fakes, fakes, fakes, DeploySequence(tmp_path))
    manifest = sign_manifest(bundles.v1.manifest, KEY)
    first = deployment(manifest)
    deployer.on_deploy(first)
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
    deployer.on_deploy(first)  # the retained message again: the same answer, no reload
    assert (len(fakes.loads), fakes.acks[-1].duplicate, fakes.acks[-1].ok) == (1, True, False)
    with pytest.raises(SignatureError):
        deployer.on_deploy(deployment(bundles.v2.manifest))  # its manifest unsigned
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
    sequence = DeploySequence(tmp_path)
    return service, Deployer("dev-1", store, trust, front, service, front, sequence), front


def _v2_deployed_over_v1(
    tmp_path: Path, bundles: Bundles
) -> tuple[InferenceService, Deployer, _Storefront, Deployment]:
    """A device serving v1 (signed, stored), then deployed v2; v2's deployment."""
    store = ModelStore(Path(agent_config(tmp_path).data_dir) / "models")
    v1, v2 = (dataclasses.replace(b, manifest=sign_manifest(b.manifest, KEY))
              for b in (bundles.v1, bundles.v2))  # fmt: skip
    put(store, v1)
    put(store, v2, activate=False)
    service, deployer, front = _boot(tmp_path)
    deployed = deployment(v2.manifest)
    deployer.on_deploy(deployed)
    assert service.wait_idle(60)
    return service, deployer, front, deployed


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
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes)
    store = deployer.store
    a, b = (sign_manifest(x.manifest, KEY) for x in (bundles.v1, bundles.v2))
    deployer.on_deploy(deployment(a))
    for name, data in bundles.v1.files.items():
        store.put_blob(next(f.sha256 for f in a.files if f.name == name), data)
    deployer.blob_stored()
    assert fakes.loads == [a]  # A is loading
    deployer.on_deploy(deployment(b))  # B: its blobs not here yet
    deployer.on_deploy(deployment(a))  # A again: a new deployment, fetching
    deployer.deploy_finished(a, True, "")  # the first load of A ends: not this deployment's
    assert deployer.state is DeployState.FETCHING
    assert fakes.acks == []
    deployer.blob_stored()
    assert fakes.loads == [a, a]
    deployer.deploy_finished(a, True, "")  # its own load
    assert deployer.state is DeployState.SERVED
    assert [(x.ref, x.ok) for x in fakes.acks] == [("deploy/digits-mlp/v1", True)]


# --- refused deployments ---------------------------------------------------------------------


def _refused(deployer: Deployer, fakes: _Fakes, refused: Deployment) -> str:
    """The reason `deployer` refuses `refused` with; it must also acknowledge it not ok."""
    acks = len(fakes.acks)
    with pytest.raises(DecodeError) as info:
        deployer.on_deploy(refused)
    (ack,) = fakes.acks[acks:]
    assert (ack.ok, ack.reason) == (False, f"deployment_rejected_{info.value.reason}")
    assert ack.ref == f"deploy/{refused.manifest.name}/{refused.manifest.version}"
    return info.value.reason


def test_forged_deployments_are_refused(tmp_path: Path, bundles: Bundles) -> None:
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes)
    v1 = sign_manifest(bundles.v1.manifest, KEY)
    theirs = deployment(v1, key=generate_private_key())
    assert _refused(deployer, fakes, theirs) == "untrusted_key"
    unsigned = dataclasses.replace(deployment(v1), signature=b"")
    assert _refused(deployer, fakes, unsigned) == "unsigned"
    renumbered = dataclasses.replace(deployment(v1, 7), seq=8)  # (the signature is for 7)
    assert _refused(deployer, fakes, renumbered) == "bad_signature"
    assert (fakes.fetched, deployer.sequence.seq) == ([], 0)  # nothing acted on


def test_a_deployment_for_another_device_is_refused(tmp_path: Path, bundles: Bundles) -> None:
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes)
    other = deployment(sign_manifest(bundles.v1.manifest, KEY), device="dev-2")
    assert _refused(deployer, fakes, other) == "wrong_device"
    assert (fakes.fetched, deployer.sequence.seq) == ([], 0)


def test_a_replayed_older_deployment_is_refused_also_after_a_restart(
    tmp_path: Path, bundles: Bundles
) -> None:
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes)
    v1, v2 = (sign_manifest(b.manifest, KEY) for b in (bundles.v1, bundles.v2))
    old, new = deployment(v1, 5), deployment(v2, 6)
    deployer.on_deploy(old)
    deployer.on_deploy(new)
    assert _refused(deployer, fakes, old) == "replayed"
    assert (fakes.fetched, deployer.store.deployed("digits-mlp")) == (["v1", "v2"], "v2")
    same_number = deployment(v1, 6)  # signed, but not the deployment 6 this device took
    assert _refused(deployer, fakes, same_number) == "replayed"
    restarted = deployer_on(tmp_path, fakes)  # the number is kept in the data dir
    assert restarted.sequence.seq == 6
    assert _refused(restarted, fakes, old) == "replayed"
    restarted.on_deploy(new)  # the retained deployment after the restart: taken again
    assert fakes.fetched == ["v1", "v2", "v2"]
    restarted.on_deploy(deployment(v1, 7))  # a genuine rollback: a newer number
    assert (restarted.store.deployed("digits-mlp"), restarted.sequence.seq) == ("v1", 7)


def test_the_retained_deployment_again_is_a_duplicate_not_a_replay(
    tmp_path: Path, bundles: Bundles
) -> None:
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes)
    retained = deployment(sign_manifest(bundles.v1.manifest, KEY))
    deployer.on_deploy(retained)
    for name, data in bundles.v1.files.items():
        manifest = retained.manifest
        deployer.store.put_blob(next(f.sha256 for f in manifest.files if f.name == name), data)
    deployer.blob_stored()
    deployer.deploy_finished(retained.manifest, True, "")
    again = decode_as(Deployment, encode(retained))  # as the broker delivers it again
    deployer.on_deploy(again)
    assert [(a.ok, a.duplicate, a.reason) for a in fakes.acks] == [(True, False, ""),
                                                                   (True, True, "")]  # fmt: skip
    assert len(fakes.loads) == 1


@pytest.mark.parametrize("damage", [
    b"\xff\x00 garbage", b"", b"12", b"-3 " + b"a" * 64,
    b"9" * 5000 + b" " + b"a" * 64,  # (int() refuses over 4,300 digits: the agent did not start)
    str(1 << 63).encode() + b" " + b"a" * 64,  # past any number: every deployment refused
    b"0 " + b"a" * 64, b"12 " + b"z" * 64,  # (no deployment is numbered 0; not hex)
])  # fmt: skip
def test_a_damaged_sequence_file_resets_to_zero_and_is_counted(
    tmp_path: Path, bundles: Bundles, damage: bytes
) -> None:
    (tmp_path / SEQUENCE_FILE).parent.mkdir(parents=True)
    (tmp_path / SEQUENCE_FILE).write_bytes(damage)
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes)  # the agent starts
    assert (deployer.sequence.seq, deployer.sequence.resets) == (0, 1)
    deployer.on_deploy(deployment(sign_manifest(bundles.v1.manifest, KEY), 3))
    assert DeploySequence(tmp_path).seq == 3  # the file is whole again
    assert DeploySequence(tmp_path).resets == 0


def test_without_a_pinned_key_the_first_deployment_pins_its_signer(
    tmp_path: Path, bundles: Bundles
) -> None:
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes, keys=())
    other = generate_private_key()
    mixed = deployment(sign_manifest(bundles.v1.manifest, KEY), key=other)
    assert _refused(deployer, fakes, mixed) == "untrusted_key"  # two signers: neither pinned
    assert deployer.trust.keys == frozenset()
    deployer.on_deploy(deployment(sign_manifest(bundles.v1.manifest, KEY)))
    assert deployer.trust.keys == {public_key(KEY)}
    later = deployment(sign_manifest(bundles.v2.manifest, other), key=other)
    assert _refused(deployer, fakes, later) == "untrusted_key"


def test_with_unsigned_models_allowed_an_unsigned_deployment_cannot_pass_a_pinned_key(
    tmp_path: Path, bundles: Bundles
) -> None:
    # allow_unsigned_models let an unsigned envelope around an old, genuinely signed
    # manifest through, numbered 2**63-1: the device downgraded and refused every real
    # deployment after, for good
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes, (public_key(KEY),), allow_unsigned=True)
    v1, v2 = (sign_manifest(b.manifest, KEY) for b in (bundles.v1, bundles.v2))
    deployer.on_deploy(deployment(v2, 10))
    forged = Deployment("dev-1", (1 << 63) - 1, 1_700_000_000.0, v1)  # (not signed)
    assert _refused(deployer, fakes, forged) == "unsigned"
    assert (deployer.store.deployed("digits-mlp"), deployer.sequence.seq) == ("v2", 10)


def test_an_unsigned_fleet_takes_unsigned_deployments_and_keeps_no_number(
    tmp_path: Path, bundles: Bundles
) -> None:
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes, (), allow_unsigned=True)
    deployer.on_deploy(Deployment("dev-1", (1 << 63) - 1, 1.0, bundles.v1.manifest))
    deployer.on_deploy(Deployment("dev-1", 1, 2.0, bundles.v2.manifest))
    assert (deployer.store.deployed("digits-mlp"), deployer.sequence.seq) == ("v2", 0)


def test_a_half_signed_deployment_is_not_taken_for_an_unsigned_one(
    tmp_path: Path, bundles: Bundles
) -> None:
    # a signature without a signer key passed as "unsigned" in an unsigned fleet, and its
    # number (2**63-1) was kept: every real deployment after it was a "replay"
    fakes = _Fakes()
    deployer = deployer_on(tmp_path, fakes, (), allow_unsigned=True)
    junk = Deployment("dev-1", (1 << 63) - 1, 1.0, bundles.v1.manifest, signature=b"x")
    assert _refused(deployer, fakes, junk) == "unsigned"
    assert DeploySequence(tmp_path).seq == 0
    deployer.on_deploy(deployment(sign_manifest(bundles.v2.manifest, KEY), 5))
    assert (deployer.store.deployed("digits-mlp"), deployer.sequence.seq) == ("v2", 5)
