"""The coordinator service: MQTT ingest into the registry, training jobs, and the HTTP API.

Threads: paho's network thread only enqueues; one ingest thread owns the registry writer
and hands training traffic to the job runner; the job runner's thread drives rounds; the
HTTP server answers from read-only connections. `run` blocks until `request_stop`.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from pathlib import Path

from cloud_coordinator import checked_sums
from cloud_coordinator.aggregation import set_threads
from cloud_coordinator.blob_server import BlobServer
from cloud_coordinator.cloud_inference import CloudInference
from cloud_coordinator.config import CoordinatorConfig
from cloud_coordinator.deployments import DeploymentSigner
from cloud_coordinator.http_api import ApiServer, ApiState
from cloud_coordinator.ingest import SUBSCRIBED, Ingest
from cloud_coordinator.job_store import JobStore
from cloud_coordinator.jobs import JobRunner
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.registry import Registry, read_devices
from cloud_coordinator.rollouts import RolloutManager, RolloutStore
from cloud_coordinator.selection import Candidate
from cloud_coordinator.signing_key import load_or_create_key
from protocols import __version__
from protocols.mqtt import InboundMessage, MqttClient, settings_from_config
from protocols.topics import all_devices_filter

log = logging.getLogger(__name__)
# The ONNX exporter's helpers log every pass at INFO; keep the coordinator's log readable.
for _noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
QUEUE_LIMIT = 100_000
#: Seconds the training candidates read from the registry are reused.
CANDIDATES_TTL_S = 1.0


class Coordinator:
    """One coordinator process."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.registry = Registry(config.db_path)
        self._inbox: queue.Queue[InboundMessage | None] = queue.Queue(QUEUE_LIMIT)
        self._stop = threading.Event()
        self.dropped = 0
        self._candidates_cache: tuple[float, list[Candidate]] = (-math.inf, [])
        self.mqtt = MqttClient(
            settings_from_config(
                config.mqtt, client_id=f"fedge-coordinator-{config.coordinator_id}"
            ),
            on_message=self._enqueue,
            on_connection=self._on_connection,
        )
        if config.aggregation_threads:
            set_threads(config.aggregation_threads)
        signing_key = load_or_create_key(Path(config.data_dir))
        self.models = ModelRegistry(Path(config.data_dir) / "models")
        self.job_store = JobStore(config.db_path)
        self.runner = JobRunner(
            self.job_store,
            self.models,
            self.mqtt,
            self._candidates,
            device=config.aggregation_device,
            chunk_size=config.effective_chunk_size,
            signing_key=signing_key,
        )
        self.rollout_store = RolloutStore(config.db_path)
        self.deployments = DeploymentSigner(config.db_path, signing_key)
        self.rollouts = RolloutManager(self.rollout_store, self.models, self.mqtt,
                                       lambda: read_devices(config.db_path),
                                       self.deployments)  # fmt: skip
        self.inference = CloudInference(
            self.models, self.mqtt, rolled_back=self.rollouts.rolled_back
        )
        self.blobs = BlobServer(self.models, self.mqtt, config.effective_chunk_size)
        self.ingest = Ingest(self.registry, config.mqtt.max_payload_bytes, training=self.runner,
                             inference=self.inference, acks=self.rollouts.on_ack,
                             blobs=self.blobs)  # fmt: skip
        for channel in SUBSCRIBED:
            self.mqtt.subscribe(all_devices_filter(channel), qos=1)
        state = ApiState(
            config.db_path,
            lambda: self.mqtt.connected,
            lambda: dict(self.ingest.accepted),
            jobs=self.runner,
            rollouts=self.rollouts,
            host_names=(config.http_host.lower(),),  # (as bound: a name, or an address)
        )
        self.api = ApiServer(config.http_host, config.http_port, state)
        self._worker = threading.Thread(target=self._drain, name="ingest", daemon=True)

    def _on_connection(self, up: bool) -> None:
        if up:  # (paho's thread: the runner's lock keeps it apart from its ticker)
            self.runner.connected()

    def _candidates(self) -> list[Candidate]:
        # A device that reported it cannot train (agent --no-train) is never selected. The
        # registry is read at most once a second (a job waiting for its quorum asks on every
        # tick, 50 times a second: the whole fleet parsed each time).
        now = time.monotonic()
        cached_at, cached = self._candidates_cache
        if now - cached_at < CANDIDATES_TTL_S:
            return list(cached)
        fresh = [
            Candidate(d.device_id, d.online)
            for d in read_devices(self.config.db_path)
            if (d.telemetry or {}).get("extra.train", 1.0) != 0
        ]
        self._candidates_cache = (now, fresh)
        return list(fresh)

    def _enqueue(self, message: InboundMessage) -> None:
        try:
            self._inbox.put(message, timeout=1.0)
        except queue.Full:
            self.dropped += 1
            log.error("ingest queue full (%d); dropped a message on %s", QUEUE_LIMIT, message.topic)

    def _drain(self) -> None:
        while (message := self._inbox.get()) is not None:
            try:
                self.ingest.handle(message.topic, message.payload, time.time(),
                                   response_topic=message.response_topic,
                                   correlation=message.correlation)  # fmt: skip
            except Exception:  # the supervisor of the ingest loop: log, keep serving
                log.exception("unexpected error ingesting %s", message.topic)

    def request_stop(self) -> None:
        """Ask `run` to return (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> int:
        """Serve until stopped; return the exit status."""
        fold = ""
        if self.runner.device.type == "cpu":
            fold = (
                " (one-pass C kernel)"
                if checked_sums.kernel_built()
                else " (torch only: the C kernel cloud_coordinator._fold is not built)"
            )
        log.info(
            "fedge-coordinator %s: broker %s:%d, API http://%s:%d, state %s, aggregation on %s%s",
            __version__,
            self.config.mqtt.host,
            self.config.mqtt.port,
            self.config.http_host,
            self.api.port,
            self.config.data_dir,
            self.runner.device,
            fold,
        )
        self._worker.start()
        self.inference.start()
        self.rollouts.start()
        self.api.start()
        # Resume jobs before connecting, so updates the broker kept for us find their round.
        self.runner.start()
        self.mqtt.start()
        self._stop.wait()
        log.info("stopping")
        self.runner.stop()
        self.mqtt.stop()
        self._inbox.put(None)
        self._worker.join(timeout=10)
        self.inference.stop()
        self.rollouts.stop()
        self.api.stop()
        self.registry.close()
        self.job_store.close()
        self.rollout_store.close()
        self.deployments.close()
        self.models.close()
        return 0
