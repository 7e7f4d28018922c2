"""Deployments: the coordinator names, on the retained ``dev/{id}/deploy`` topic, the
version this device is to serve (a signed, numbered `Deployment` carrying its signed
manifest); the deployer verifies both, has the learner fetch its blobs, has the
inference service load, warm and swap it in, and answers with an `Ack` (``ref =
deploy/{model}/{version}``): ``ok``, or not ok with the reason the version could not be
served (the previous one keeps serving). From the first deployment
on, the served version follows deployments, not the newest training version (the store's
``deployed`` pointer, kept across restarts). A version this device blocked (it failed to
load here, or was rolled back here) is refused, not served again: the retained deploy
message, seen again after a reconnect or a restart, does not undo a local rollback.
Lifecycle: `agent.deployment`.

A deployment is refused, acknowledged not ok as ``deployment_rejected_<reason>`` and
raised (the daemon counts it), when it is not signed by the trusted key (the signature
reasons), is for another device (``wrong_device``), or is older than, or differs from
with the same number, the highest one this device accepted (``replayed``,
`agent.deploy_sequence`): an old, validly signed deployment replayed on the topic cannot
downgrade the device. The same deployment again (the retained message) is not a replay.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from agent.deploy_sequence import DeploySequence
from agent.deployment import FINISHED, DeployEvent, DeployState, ack_ref, next_deploy_state
from agent.model_store import ModelStore
from agent.trust import ManifestTrust
from protocols.errors import DecodeError, RefusedMessageError
from protocols.messages import Ack, Deployment, ModelManifest, encode
from protocols.mqtt import MqttError
from protocols.signing import SignatureError
from protocols.topics import DeviceChannel, device_topic

log = logging.getLogger(__name__)
#: The reason a deployment of a blocked version is refused with.
BLOCKED = "blocked: rolled back on this device or failed to load here; deploy another version"


class Publisher(Protocol):
    """Where acknowledgements go (the MQTT client)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        """Queue one message."""


class Fetcher(Protocol):
    """Fetches a version's blobs (the learner)."""

    def fetch(self, manifest: ModelManifest) -> bool:
        """Request missing blobs; True if none is missing."""


class Server(Protocol):
    """Loads and serves versions (the inference service)."""

    def deploy(self, manifest: ModelManifest, done: DeployDone) -> str | None:
        """Queue `manifest` to be served, calling `done` after; a reason if it cannot be."""


class DeployDone(Protocol):
    """Told how loading a deployed version ended."""

    def deploy_finished(self, manifest: ModelManifest, ok: bool, reason: str) -> None:
        """`manifest` is served (`ok`), or not, because of `reason`."""


@dataclass
class _Deployment:
    manifest: ModelManifest
    state: DeployState = DeployState.FETCHING
    reason: str = ""


class Deployer:
    """Follows this device's deploy topic (MQTT thread in, loader thread out)."""

    def __init__(self, device_id: str, store: ModelStore, trust: ManifestTrust,
                 fetcher: Fetcher, server: Server, publisher: Publisher,
                 sequence: DeploySequence) -> None:  # fmt: skip
        self.device_id = device_id
        self.sequence = sequence
        self.store = store
        self.trust = trust
        self.fetcher = fetcher
        self.server = server
        self.publisher = publisher
        self._ack_topic = device_topic(device_id, DeviceChannel.ACK)
        self._lock = threading.Lock()
        self._current: _Deployment | None = None

    @property
    def state(self) -> DeployState | None:
        """The latest deployment's state (None before the first)."""
        return self._current.state if self._current else None

    def on_deploy(self, deployment: Deployment) -> None:
        """Start deploying what `deployment` names (DecodeError, acknowledged not ok, if
        refused: SignatureError, or RefusedMessageError for another device or a replay)."""
        manifest = deployment.manifest
        try:
            self.trust.verify_deployment(deployment)
            if deployment.device_id != self.device_id:
                raise RefusedMessageError(
                    f"deployment {deployment.seq} is for {deployment.device_id!r}, not this"
                    f" device ({self.device_id!r})",
                    reason="wrong_device",
                )
            if deployment.signer_key:  # (verified above; an unsigned fleet's keep no number)
                self.sequence.check(deployment)
        except DecodeError as exc:
            self._ack(manifest, False, f"deployment_rejected_{exc.reason}")
            raise
        try:
            self.trust.verify(manifest)
        except SignatureError as exc:
            self._ack(manifest, False, f"manifest_rejected_{exc.reason}")
            raise
        if deployment.signer_key:
            self.sequence.accept(deployment)
        with self._lock:
            old = self._current
            again = old is not None and old.manifest == manifest
            if manifest.version in self.store.blocked(manifest.name):
                log.warning("deployment of %s %s refused: this device rolled back from it or "
                            "could not load it", manifest.name, manifest.version)  # fmt: skip
                self._ack(manifest, False, BLOCKED, again)
                return
            if old is not None and again:
                if old.state in FINISHED:  # the retained message again (a reconnect)
                    self._ack(manifest, old.state is DeployState.SERVED, old.reason, True)
                return
            if old is not None and old.state is DeployState.FETCHING:
                old.state = next_deploy_state(old.state, DeployEvent.SUPERSEDE)
            self._current = _Deployment(manifest)
        log.info("deployment: %s %s to serve", manifest.name, manifest.version)
        self.store.put_manifest(manifest)
        self.store.set_deployed(manifest.name, manifest.version)
        if self.fetcher.fetch(manifest):
            self.blob_stored()

    def blob_stored(self) -> None:
        """A blob arrived: load the deployed version once all of its blobs are here."""
        with self._lock:
            deployment = self._current
            if deployment is None or deployment.state is not DeployState.FETCHING:
                return
            if self.store.missing(deployment.manifest):
                return
            deployment.state = next_deploy_state(deployment.state, DeployEvent.BLOBS_READY)
        refused = self.server.deploy(deployment.manifest, self)
        if refused is not None:
            self.deploy_finished(deployment.manifest, False, refused)

    def deploy_finished(self, manifest: ModelManifest, ok: bool, reason: str) -> None:
        """The inference service loaded `manifest` (or could not): record and acknowledge."""
        with self._lock:
            deployment = self._current
            if deployment is None or deployment.manifest != manifest:
                return
            if deployment.state is not DeployState.LOADING:  # the load an earlier deployment
                return  # of this version queued (A, B, A again): the latest is loaded anew
            event = DeployEvent.LOADED if ok else DeployEvent.LOAD_FAILED
            deployment.state = next_deploy_state(deployment.state, event)
            deployment.reason = reason
        if ok:
            log.info("deployment: serving %s %s", manifest.name, manifest.version)
        else:
            log.error("deployment of %s %s failed (%s); the previous version keeps serving",
                      manifest.name, manifest.version, reason)  # fmt: skip
        self._ack(manifest, ok, reason)

    def _ack(self, manifest: ModelManifest, ok: bool, reason: str, duplicate: bool = False) -> None:
        ack = Ack(ack_ref(manifest.name, manifest.version), ok, time.time(), reason, duplicate)
        try:
            self.publisher.publish(self._ack_topic, encode(ack), qos=1)
        except MqttError as exc:
            log.warning("could not acknowledge deployment %s: %s", ack.ref, exc)
