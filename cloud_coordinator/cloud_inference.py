"""The cloud half of hybrid inference: devices offload low-confidence inputs here.

A device publishes an `InferenceRequest` on ``dev/{id}/infer/req`` (MQTT 5: with a Response
Topic and Correlation Data). The ingest thread checks it and queues it; a worker answers
with the newest registered fp32 ``model.onnx`` of the named model (skipping versions whose
latest rollout was rolled back: the canary found them unhealthy), on the device's own
``dev/{id}/infer/resp`` (echoing the correlation data), before the request's deadline or not
at all. A request 5 s (``SKEW_TOLERANCE_S``) or more past its deadline when a worker gets to
it is answered ``expired`` and counted; a full queue answers ``busy`` at once, so the device
falls back to its local answer without waiting. A reply address other than the device's own
response topic is refused (``bad_reply_to``): the coordinator never publishes where a device
asks.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cloud_coordinator.bundles import LOGITS_NAME, run_logits, session
from cloud_coordinator.errors import StoreError
from cloud_coordinator.model_registry import ModelRegistry, VersionRecord
from protocols.errors import DecodeError
from protocols.messages import (
    InferenceRequest,
    InferenceResponse,
    ModelManifest,
    decode_as,
    encode,
)
from protocols.model_format import MODEL_FILE
from protocols.mqtt_types import MqttError
from protocols.tensors import decode_tensor, encode_dense
from protocols.topics import DeviceChannel, device_topic

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

MAX_BATCH = 1024
#: Elements of one input row at most, where the model's input shape leaves them free.
MAX_ROW_ELEMENTS = 1 << 16
QUEUE_LIMIT = 64
#: Requests one device may have waiting at once (the rest are answered "busy" at once).
PER_DEVICE_QUEUED = 4
#: Seconds past a request's deadline (the device's clock) it is still served: clock skew.
SKEW_TOLERANCE_S = 5.0


class Responder(Protocol):
    """Where answers go (the MQTT client, or a fake in tests)."""

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
        response_topic: str = "", correlation: bytes = b"",
    ) -> object:  # fmt: skip
        """Queue one message."""


def _row_elements(manifest: ModelManifest) -> int:
    """Elements in one input row of the model (`MAX_ROW_ELEMENTS` where a size is free)."""
    if not manifest.inputs:
        return MAX_ROW_ELEMENTS
    dims = manifest.inputs[0].shape[1:]
    if any(d <= 0 for d in dims):
        return MAX_ROW_ELEMENTS
    return min(math.prod(dims), MAX_ROW_ELEMENTS)


@dataclass(frozen=True, slots=True)
class _Job:
    device_id: str
    request: InferenceRequest
    correlation: bytes


class CloudInference:
    """Answers offloaded predictions with the newest fp32 version of the named model that
    was not rolled back (`rolled_back(name)` names those)."""

    def __init__(
        self,
        models: ModelRegistry,
        responder: Responder,
        clock: Callable[[], float] = time.time,
        rolled_back: Callable[[str], Collection[str]] = lambda name: (),
    ) -> None:
        self.models = models
        self.responder = responder
        self.clock = clock
        self.rolled_back = rolled_back
        self.counts: Counter[str] = Counter()
        self._queue: queue.Queue[_Job | None] = queue.Queue(QUEUE_LIMIT)
        self._queued: Counter[str] = Counter()  # requests waiting, by device
        self._sessions: dict[tuple[str, str], ort.InferenceSession] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="cloud-inference", daemon=True)

    def start(self) -> None:
        """Start the worker."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the request it is on."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)

    def on_request(
        self, device_id: str, payload: bytes, max_bytes: int,
        response_topic: str = "", correlation: bytes = b"",
    ) -> None:  # fmt: skip
        """Check and queue one request (ingest thread); DecodeError with the reason if bad."""
        request = decode_as(InferenceRequest, payload, max_bytes)
        own = device_topic(device_id, DeviceChannel.INFER_RESPONSE)
        for asked in (response_topic, request.reply_to):
            if asked and asked != own:
                raise DecodeError(f"reply address {asked!r} is not {own}", reason="bad_reply_to")
        if len(request.inputs) != 1:
            raise DecodeError("a request carries exactly one input tensor", reason="bad_field")
        job = _Job(device_id, request, correlation)
        with self._lock:  # one device may not fill the queue the whole fleet shares
            mine = self._queued[device_id]
            if mine < PER_DEVICE_QUEUED:
                self._queued[device_id] = mine + 1
        if mine >= PER_DEVICE_QUEUED:
            self._count("busy")
            self._answer(job, error="busy: this device has requests waiting; answer locally")
            return
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._done(device_id)
            self._count("busy")
            self._answer(job, error="busy: the cloud model is saturated; answer locally")

    def _done(self, device_id: str) -> None:
        with self._lock:
            left = self._queued[device_id] - 1
            if left > 0:
                self._queued[device_id] = left
            else:
                del self._queued[device_id]

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            self._done(job.device_id)
            try:
                self._serve(job)
            except Exception:  # the supervisor of the worker: log, answer, keep serving
                log.exception("cloud inference failed for %s", job.device_id)
                self._count("error")
                self._answer(job, error="internal error in the cloud model")

    def _serve(self, job: _Job) -> None:
        request = job.request
        # The deadline is the device's clock: past it by more than a clock's likely skew,
        # the device has answered locally long ago (said, so it need not wait)
        if self.clock() >= request.deadline + SKEW_TOLERANCE_S:
            self._count("expired")
            self._answer(job, error="expired: the request's deadline passed; answer locally")
            return
        record = self._version_for(request.model_name)
        if record is None:
            self._count("unknown_model")
            self._answer(job, error=f"no model {request.model_name!r} in the cloud")
            return
        try:  # (bounded first: a sparse tensor of a few bytes can claim any shape)
            limit = MAX_BATCH * _row_elements(record.manifest)
            x = np.asarray(decode_tensor(request.inputs[0], limit), dtype=np.float32)
        except DecodeError as exc:
            self._count("bad_input")
            self._answer(job, error=f"bad input: {exc}")
            return
        if x.ndim < 1 or len(x) > MAX_BATCH:
            self._count("bad_input")
            self._answer(job, error=f"input shape {x.shape}: a batch of 1..{MAX_BATCH} rows")
            return
        runner = self._session(record.name, record.version)
        try:
            logits = run_logits(runner, x)
        except ValueError as exc:
            self._count("bad_input")
            self._answer(job, error=str(exc))
            return
        self._count("answered")
        self._answer(job, version=record.version, logits=logits)

    def _version_for(self, name: str) -> VersionRecord | None:
        """The newest version of `name` not rolled back (the newest of all if every one was)."""
        latest = self.models.latest(name)
        skipped = self.rolled_back(name) if latest is not None else ()
        if latest is None or latest.version not in skipped:
            return latest
        good = [r for r in self.models.versions(name) if r.version not in skipped]
        return good[-1] if good else latest

    def _session(self, name: str, version: str) -> ort.InferenceSession:
        key = (name, version)
        if key not in self._sessions:
            try:
                model = self.models.files(name, version)[MODEL_FILE]
            except (KeyError, StoreError) as exc:
                raise StoreError(f"model {name} {version} has no {MODEL_FILE}") from exc
            self._sessions = {key: session(model)}  # keep only the newest
        return self._sessions[key]

    def _answer(
        self, job: _Job, *, version: str = "", logits: np.ndarray | None = None, error: str = ""
    ) -> None:
        outputs = () if logits is None else (encode_dense(LOGITS_NAME, logits),)
        response = InferenceResponse(job.request.request_id, version, outputs, error)
        try:
            self.responder.publish(
                device_topic(job.device_id, DeviceChannel.INFER_RESPONSE), encode(response),
                qos=0, correlation=job.correlation,
            )  # fmt: skip
        except MqttError as exc:  # offline: the device answers locally; the worker goes on
            log.debug("answer to %s not sent: %s", job.device_id, exc)
