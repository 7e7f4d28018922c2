"""The agent's side of federated learning: tasks in, model blobs fetched, head trained in
the child process, compressed delta out through the durable outbox.

Threads: MQTT callbacks only record what arrived (`on_*`); one learner thread runs tasks
one at a time and re-sends unacknowledged updates. torch never loads in this process.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.blob_fetch import FETCH_RETRY_S, BlobFetches, Publisher
from agent.compression import Compressor, JobCompressors, clip_by_norm
from agent.errors import AgentError
from agent.lineage import newest_descendant, wants_latest
from agent.local_data import load_local_data
from agent.model_store import ModelStore
from agent.onnx_runtime import OnnxModel
from agent.outbox import Outbox
from agent.trainer import TrainerProcess
from agent.trust import ManifestTrust
from agent.update_sender import UpdateSender
from protocols.errors import DecodeError
from protocols.messages import (
    Ack,
    BlobChunk,
    ModelManifest,
    ModelUpdate,
    TrainTask,
    encode,
)
from protocols.model_format import BACKBONE_FILE, HEAD_FILE, unpack_tensors
from protocols.mqtt import MqttError
from protocols.topics import DeviceChannel, ModelChannel, device_topic, model_topic

log = logging.getLogger(__name__)
#: Backbone features kept in memory (the train and validation sets of the last two rounds).
FEATURE_CACHE_ENTRIES = 4
#: Jobs whose error-feedback residuals are kept (in memory and in files), the newest.
KEPT_JOBS = 4


class Transport(Publisher, Protocol):
    """What the learner needs from the MQTT client: publishing, and subscriptions."""

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and after reconnects."""


class ModelListener(Protocol):
    """Told when a model version becomes current (the inference service implements it)."""

    def model_activated(self, manifest: ModelManifest) -> None:
        """`manifest` is now the current version of its model; return at once."""


class BlobListener(Protocol):
    """Told when a blob arrived (the deployer implements it)."""

    def blob_stored(self) -> None:
        """A blob is now in the model cache; return at once."""


class TaskFailedError(AgentError):
    """A training task could not be completed; the message says why."""


class Learner:
    """Runs training tasks for one device."""

    def __init__(
        self,
        device_id: str,
        data_dir: Path,
        dataset_dir: Path,
        transport: Transport,
        max_payload_bytes: int,
        trust: ManifestTrust,
        train_threads: int = 1,
        train_nice: int = 10,
        listener: ModelListener | None = None,
    ) -> None:
        self.device_id = device_id
        self.transport = transport
        self.dataset_dir = dataset_dir
        self.max_payload_bytes = max_payload_bytes
        self.store = ModelStore(data_dir / "models")
        self.listener = listener
        self.trust = trust
        self.blob_listener: BlobListener | None = None
        self.outbox = Outbox(data_dir / "outbox.db")
        self.sender = UpdateSender(self.outbox, transport)
        self.compressors = JobCompressors(data_dir / "residuals", KEPT_JOBS)
        self.trainer = TrainerProcess(threads=train_threads, nice=train_nice)
        self.tasks_done = 0
        self.tasks_failed = 0
        self._tasks: queue.Queue[TrainTask | None] = queue.Queue()
        self.fetches = BlobFetches(device_id, transport)
        self._models: set[str] = set()
        self._latest: dict[str, ModelManifest] = {}
        self._cond = threading.Condition()
        self._feature_cache: dict[str, np.ndarray[Any, Any]] = {}
        self._thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self._stop = threading.Event()
        self._busy = False

    def model_versions(self) -> dict[str, str]:
        """The active version of every model this device has trained."""
        versions = {}
        for name in sorted(self._models):
            manifest = self.store.current(name)
            if manifest is not None:
                versions[name] = manifest.version
        return versions

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the learner thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current task; close the trainer child and the outbox."""
        self._stop.set()
        self._tasks.put(None)
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self.trainer.close()
        self.outbox.close()

    @property
    def busy(self) -> bool:
        """True while a task is running."""
        return self._busy

    # --- inbound (MQTT thread) ---------------------------------------------------------
    def on_task(self, task: TrainTask) -> None:
        """Queue a task (its model topic is subscribed at once so the manifest arrives)."""
        self._watch_model(task.model_name)
        self.sender.heard_from_coordinator()
        self._tasks.put(task)

    def watch(self, name: str) -> None:
        """Follow model `name` (its manifests, hence its versions) without a task for it."""
        self._watch_model(name)

    def _watch_model(self, name: str) -> None:
        if name not in self._models:
            self._models.add(name)
            self.transport.subscribe(model_topic(name, ModelChannel.MANIFEST), qos=1)

    def on_manifest(self, manifest: ModelManifest) -> None:
        """Verify a published manifest (SignatureError if refused), keep it, fetch its missing
        blobs, and switch to it once complete.

        One created before the newest this device knows of is kept but not switched to (a
        replayed, validly signed old manifest must not downgrade the device); DecodeError
        (``stale``) says so.
        """
        self.trust.verify(manifest)
        self.store.put_manifest(manifest)
        with self._cond:
            newest = self._latest.get(manifest.name) or self.store.current(manifest.name)
            if newest is not None and manifest.created < newest.created:
                raise DecodeError(
                    f"{manifest.name} {manifest.version} is older than {newest.version}: "
                    "kept, not switched to",
                    reason="stale",
                )
            self._latest[manifest.name] = manifest
        self.fetch(manifest)
        self._activate_latest()
        with self._cond:
            self._cond.notify_all()

    def _activate_latest(self) -> None:
        with self._cond:
            ready = [m for m in self._latest.values() if not self.store.missing(m)]
        for manifest in ready:
            current = self.store.current(manifest.name)
            if current is not None and current.version == manifest.version:
                continue
            if manifest.version in self.store.blocked(manifest.name):
                continue  # it failed to load here, or was rolled back
            if self.store.deployed(manifest.name) is not None:
                continue  # deployments choose the served version, not training
            self.store.activate(manifest)
            log.info("model %s: now running version %s", manifest.name, manifest.version)
            if self.listener is not None:
                self.listener.model_activated(manifest)

    def on_chunk(self, chunk: BlobChunk) -> None:
        """Add a chunk; a complete, verified blob goes into the model cache."""
        blob = self.fetches.add_chunk(chunk)  # DecodeError: corrupt, fetched again
        if blob is None:
            return
        try:
            self.store.put_blob(chunk.blob_sha256, blob)
        except OSError as exc:  # a full disk, say: still wanted, so asked for again later
            log.error("cannot store blob %s (%s): it is fetched again in %.0fs",
                      chunk.blob_sha256[:12], exc, FETCH_RETRY_S)  # fmt: skip
            return
        self.fetches.stored(chunk.blob_sha256)
        self._activate_latest()
        if self.blob_listener is not None:
            self.blob_listener.blob_stored()
        with self._cond:
            self._cond.notify_all()

    def on_update_ack(self, ack: Ack) -> None:
        """Forget an update the coordinator has acknowledged (or refused for good)."""
        self.sender.acked(ack.ref)
        if not ack.ok:
            log.warning("coordinator refused update %s: %s", ack.ref, ack.reason)

    def on_connected(self) -> None:
        """After a (re)connect: resume blob transfers and re-send pending updates at once."""
        self.outbox.reset_sent()
        self.fetches.restart()
        with self._cond:
            self._cond.notify_all()

    # --- blobs -------------------------------------------------------------------------
    def fetch(self, manifest: ModelManifest) -> bool:
        """Request `manifest`'s missing blobs (re-requested until they arrive); True if none
        is missing."""
        missing = self.store.missing(manifest)
        for entry in missing:
            self.fetches.want(entry.sha256, entry.size, entry.piece_size, entry.pieces)
        if missing:
            self.fetches.send_due()
        return not missing

    def _newest_base(self, task: TrainTask) -> ModelManifest | None:
        """For ``base = "latest"``: the newest complete version descending from the base."""
        name = task.model_name
        heads = (self._latest.get(name), self.store.current(name))
        return newest_descendant(
            heads,
            task.base_version,
            lambda version: self.store.manifest(name, version),
            lambda manifest: not self.store.missing(manifest),
        )

    def _wait_for_model(self, task: TrainTask) -> ModelManifest:
        deadline = min(task.deadline, time.time() + 60)
        latest = wants_latest(task)
        with self._cond:
            while True:
                newest = self._newest_base(task) if latest else None
                if newest is not None:
                    return newest
                manifest = self.store.manifest(task.model_name, task.base_version)
                if manifest is not None:
                    missing = self.store.missing(manifest)
                    if not missing:
                        return manifest
                    for entry in missing:
                        self.fetches.want(entry.sha256, entry.size, entry.piece_size, entry.pieces)
                if time.time() >= deadline or self._stop.is_set():
                    raise TaskFailedError(
                        f"model {task.model_name} {task.base_version} not here in time"
                    )
                self._cond.release()
                try:
                    self.fetches.send_due()
                finally:
                    self._cond.acquire()
                self._cond.wait(0.2)

    # --- tasks -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                task = self._tasks.get(timeout=1.0)
            except queue.Empty:
                task = None
            try:
                self.sender.resend_due()
                self.fetches.send_due()  # blobs asked for outside a task are re-requested too
            except Exception:  # (a full outgoing queue, say): retried on the next pass
                log.exception("re-sending updates or blob requests failed")
            if task is None:
                continue
            self._busy = True
            try:
                self._train(task)
                self.tasks_done += 1
            except (AgentError, DecodeError, OSError) as exc:
                self.tasks_failed += 1
                log.warning("task %s failed: %s", task.task_id, exc)
            except Exception:  # supervisor of the learner thread: log with traceback, go on
                self.tasks_failed += 1
                log.exception("task %s failed unexpectedly", task.task_id)
            finally:
                self._busy = False

    def _features(self, manifest: ModelManifest, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        names = {f.name: f.sha256 for f in manifest.files}
        if BACKBONE_FILE not in names:
            return x.reshape(len(x), -1).astype(np.float32)
        key = names[BACKBONE_FILE] + hashlib.blake2b(x.tobytes(), digest_size=16).hexdigest()
        cached = self._feature_cache.pop(key, None)
        if cached is None:
            backbone = OnnxModel.from_bytes(self.store.read_blob(names[BACKBONE_FILE]))
            cached = backbone.run(x).reshape(len(x), -1)
        self._feature_cache[key] = cached  # (the newest last)
        while len(self._feature_cache) > FEATURE_CACHE_ENTRIES:
            del self._feature_cache[next(iter(self._feature_cache))]
        return cached

    def _train(self, task: TrainTask) -> None:
        started = time.time()
        if task.deadline <= started:
            raise TaskFailedError("task arrived after its deadline")
        manifest = self._wait_for_model(task)
        data = load_local_data(self.dataset_dir)
        head = unpack_tensors(self.store.file(manifest, HEAD_FILE))
        hp = task.hyperparams
        budget = max(
            0.5, min(float(hp.get("max_seconds", 20.0)), task.deadline - time.time() - 0.5)
        )
        request = {
            "features": self._features(manifest, data.x_train),
            "labels": data.y_train,
            "val_features": self._features(manifest, data.x_val),
            "val_labels": data.y_val,
            "head": head,
            "layers": manifest.head_layers,
            "lr": float(hp.get("lr", 0.05)),
            "momentum": float(hp.get("momentum", 0.9)),
            "epochs": int(hp.get("epochs", 2)),
            "batch_size": int(hp.get("batch_size", 16)),
            "prox_mu": float(hp.get("prox_mu", 0.0)),
            "max_seconds": budget,
            "seed": int(hp.get("seed", 0)) + task.round,
        }
        result = self.trainer.train(request, timeout=budget + 30.0)
        delta = {name: result["head"][name] - head[name] for name in head}
        clip = float(hp.get("clip_norm", 0.0))
        if clip > 0:
            delta, _ = clip_by_norm(delta, clip)
        compressor = self.compressors.get(task.job_id)
        before = compressor.snapshot()  # put back unless the update reaches the outbox
        try:
            key, topic, payload, update = self._queue_update(
                task, manifest, data.y_train, delta, result, compressor
            )
        except BaseException:
            compressor.restore(before)
            raise
        compressor.save()
        try:
            self.sender.send(key, topic, payload)
        except MqttError as exc:  # queued all the same: the task is done, the copy goes later
            log.warning("task %s: update queued but not sent yet (%s); it will be re-sent",
                        task.task_id, exc)  # fmt: skip
        log.info("task %s: trained %d samples from %s in %.2fs, sent %d bytes (%s)",
                 task.task_id, update.num_samples, manifest.version, time.time() - started,
                 len(payload), task.compression)  # fmt: skip

    def _queue_update(
        self,
        task: TrainTask,
        manifest: ModelManifest,
        labels: np.ndarray[Any, Any],
        delta: dict[str, np.ndarray[Any, Any]],
        result: dict[str, Any],
        compressor: Compressor,
    ) -> tuple[str, str, bytes, ModelUpdate]:
        """Compress `delta` into an update and store it in the outbox; (key, topic,
        payload, update). TaskFailedError if it could never be sent."""
        hp = task.hyperparams
        tensors = compressor.compress(
            delta, task.compression, topk_fraction=float(hp.get("topk_fraction", 0.01))
        )
        metrics = {k: float(v) for k, v in result["metrics"].items()
                   if isinstance(v, int | float) and math.isfinite(v)}  # fmt: skip
        update = ModelUpdate(
            device_id=self.device_id,
            job_id=task.job_id,
            round=task.round,
            base_version=manifest.version,  # newer than the task's when base = "latest"
            seq=int(time.time() * 1000) % (1 << 31),
            num_samples=len(labels),
            tensors=tensors,
            metrics=metrics,
        )
        payload = encode(update)
        if len(payload) > self.max_payload_bytes:  # the coordinator could never accept it
            raise TaskFailedError(
                f"update of {len(payload)} bytes is over the broker's limit of "
                f"{self.max_payload_bytes} (mqtt.max_payload_bytes): not sent; the job "
                "needs compression ('topk' or 'int8') for a model this size"
            )
        key = update.ack_ref
        topic = device_topic(self.device_id, DeviceChannel.UPDATE)
        self.outbox.put(key, topic, payload)
        return key, topic, payload, update
