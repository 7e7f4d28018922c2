"""Hybrid inference: a local prediction whose confidence is below ``offload_threshold`` is
asked of the cloud model, and answered with the cloud's prediction when it arrives before
``offload_timeout_ms``, else with the local one.

The low-confidence rows (preprocessed, as the model takes them) go out as one
`InferenceRequest` on ``dev/{id}/infer/req`` with MQTT 5 request/response (Response Topic
``dev/{id}/infer/resp``, Correlation Data = the request id); the coordinator answers there
with the logits. Outcomes are counted (``answered``, ``timeout``, ``error``). With
``keep_low_confidence`` those rows are also kept, unlabelled, in
``<dataset_dir>/candidates.npz`` (array ``x``, at most ``low_confidence_max_rows``, oldest
dropped first, written atomically) as candidates for local training.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.atomic_file import write_atomically
from agent.config import AgentConfig
from agent.feedback import FeedbackError, RecentInputs
from agent.predictions import Predictions
from protocols.errors import DecodeError
from protocols.messages import InferenceRequest, InferenceResponse, encode
from protocols.mqtt import MqttError
from protocols.tensors import decode_tensor, encode_dense
from protocols.topics import DeviceChannel, device_topic

log = logging.getLogger(__name__)
CANDIDATES_FILE = "candidates.npz"
OUTCOMES = ("answered", "timeout", "error", "skipped")
#: Offload requests waiting for the cloud at once; past that, rows are answered locally.
MAX_IN_FLIGHT = 8
#: Classes a cloud answer may have per row where the local model does not say.
MAX_CLASSES = 1 << 16
#: Candidate rows written to the file together (or after `FLUSH_S` seconds).
FLUSH_ROWS = 64
FLUSH_S = 5.0


class Requester(Protocol):
    """What the offloader needs from the MQTT client."""

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
        response_topic: str = "", correlation: bytes = b"",
    ) -> object:  # fmt: skip
        """Queue one message (with MQTT 5 request/response properties)."""


@dataclass(frozen=True, slots=True)
class OffloadedPredictions(Predictions):
    """Predictions of which some rows may come from the cloud model (`sources`)."""

    sources: tuple[str, ...] = ()
    cloud_version: str = ""

    def as_json(self) -> dict[str, Any]:
        """The API's answer, each row with its ``source`` (``cloud`` or ``local``)."""
        answer = Predictions.as_json(self)
        if self.single:
            answer["source"] = self.sources[0]
        else:
            for row, source in zip(answer["predictions"], self.sources, strict=True):
                row["source"] = source
            kinds = set(self.sources)
            answer["source"] = kinds.pop() if len(kinds) == 1 else "mixed"
        if self.cloud_version:
            answer["cloud_version"] = self.cloud_version
        return answer


class _Waiter:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.response: InferenceResponse | None = None


class CandidateLog:
    """Unlabelled low-confidence inputs in ``candidates.npz`` (bounded, thread-safe).

    Rows are written to the file in batches (every `FLUSH_ROWS` rows or `FLUSH_S` seconds,
    and at `flush`), not one fsync'd rewrite per prediction: a crash loses at most the
    rows not yet written, candidates being best-effort training data."""

    def __init__(self, path: Path, max_rows: int) -> None:
        self.path = path
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._pending = 0  # rows kept in memory since the last write
        self._written_at = time.monotonic()
        self._x: npt.NDArray[np.float32] | None = None
        if path.is_file():
            try:
                with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
                    self._x = np.asarray(data["x"], np.float32)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                log.warning("ignoring unreadable %s: %s", path, exc)

    def append(self, rows: npt.NDArray[Any]) -> int:
        """Keep `rows`; return the number of rows now kept (a new input shape starts afresh)."""
        rows = np.asarray(rows, np.float32)
        with self._lock:
            old = self._x
            if old is None or old.shape[1:] != rows.shape[1:]:
                xs = rows[-self.max_rows :]
            else:
                xs = np.concatenate([old, rows])[-self.max_rows :]
            self._x = xs
            self._pending += len(rows)
            due = self._pending >= FLUSH_ROWS or time.monotonic() - self._written_at >= FLUSH_S
            if due:
                self._write()
            return len(xs)

    def flush(self) -> None:
        """Write the rows kept in memory (at stop)."""
        with self._lock:
            if self._pending:
                self._write()

    def _write(self) -> None:
        """Write every kept row atomically (the caller holds the lock)."""
        rows = self._x
        assert rows is not None
        write_atomically(self.path, lambda f: np.savez(f, x=rows))
        self._pending = 0
        self._written_at = time.monotonic()


class Offloader:
    """Asks the cloud about low-confidence predictions (request threads wait, MQTT thread
    answers)."""

    def __init__(
        self, device_id: str, requester: Requester, config: AgentConfig, dataset_dir: Path
    ) -> None:
        self.requester = requester
        self.threshold = config.offload_threshold
        self.timeout_s = config.offload_timeout_ms / 1000
        self._request_topic = device_topic(device_id, DeviceChannel.INFER_REQUEST)
        self._response_topic = device_topic(device_id, DeviceChannel.INFER_RESPONSE)
        self.candidates = (
            CandidateLog(dataset_dir / CANDIDATES_FILE, config.low_confidence_max_rows)
            if config.keep_low_confidence
            else None
        )
        self.counts: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self.kept = 0
        self._lock = threading.Lock()
        self._pending: dict[str, _Waiter] = {}
        self._ids = 0
        self._prefix = os.urandom(4).hex()

    def refine(self, answer: Predictions, recent: RecentInputs) -> OffloadedPredictions:
        """`answer` with its low-confidence rows answered by the cloud when it answers in time."""
        sources = ["local"] * len(answer.classes)
        low = [i for i, c in enumerate(answer.confidences) if c < self.threshold]
        classes, confidences = list(answer.classes), list(answer.confidences)
        cloud_version = ""
        if low:
            try:
                rows = np.stack([recent.get(answer.row_id(i))[0] for i in low])
            except FeedbackError:  # evicted already: nothing to send
                rows = None
            if rows is not None:
                self._keep(rows)
                response = self._ask(answer.model, rows)
                logits = self._logits(response, len(low), len(answer.label_names))
                if logits is not None and response is not None:
                    cloud_version = response.model_version
                    for i, row in zip(low, logits.tolist(), strict=True):
                        top = max(row)
                        classes[i] = row.index(top)
                        confidences[i] = 1.0 / math.fsum(math.exp(v - top) for v in row)
                        sources[i] = "cloud"
        return OffloadedPredictions(answer.prediction_id, answer.model, answer.version,
                                    classes, confidences, answer.label_names, answer.single,
                                    tuple(sources), cloud_version)  # fmt: skip

    def _keep(self, rows: npt.NDArray[Any]) -> None:
        if self.candidates is None:
            return
        try:
            self.candidates.append(rows)
        except OSError as exc:
            log.warning("could not keep low-confidence inputs: %s", exc)
            return
        with self._lock:
            self.kept += len(rows)

    def _ask(self, model: str, rows: npt.NDArray[Any]) -> InferenceResponse | None:
        with self._lock:
            if len(self._pending) >= MAX_IN_FLIGHT:  # the cloud is slow or away: local now
                self.counts["skipped"] += 1
                return None
            self._ids += 1
            request_id = f"{self._prefix}-{self._ids}"
            waiter = self._pending[request_id] = _Waiter()
        deadline = time.time() + self.timeout_s
        request = InferenceRequest(request_id, model, (encode_dense("input", rows),),
                                   self._response_topic, deadline)  # fmt: skip
        try:
            self.requester.publish(self._request_topic, encode(request), qos=0,
                                   response_topic=self._response_topic,
                                   correlation=request_id.encode())  # fmt: skip
            arrived = waiter.event.wait(self.timeout_s)
        except MqttError as exc:
            log.debug("offload request not sent: %s", exc)
            self._count("error")
            return None
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        if not arrived:
            self._count("timeout")
            return None
        return waiter.response

    def _logits(
        self, response: InferenceResponse | None, n: int, classes: int
    ) -> npt.NDArray[Any] | None:
        """The cloud's logits as (n, classes) (`classes` 0: any number, at least one), or
        None (counted an error) for an answer of another shape or with NaN/Inf."""
        if response is None:
            return None
        try:
            if response.error or len(response.outputs) != 1:
                raise DecodeError(response.error or "no output", reason="cloud_error")
            # (bounded first: a sparse tensor of a few bytes can claim any shape)
            limit = n * (classes or MAX_CLASSES)
            logits = np.asarray(decode_tensor(response.outputs[0], limit), np.float64)
            if logits.ndim != 2 or len(logits) != n or logits.shape[1] < 1:
                raise DecodeError(
                    f"logits of shape {logits.shape} for {n} rows", reason="cloud_error"
                )
            if classes and logits.shape[1] != classes:
                raise DecodeError(
                    f"{logits.shape[1]} classes in the cloud's answer, {classes} here",
                    reason="cloud_error",
                )
            if not np.all(np.isfinite(logits)):
                raise DecodeError("non-finite logits", reason="cloud_error")
        except (DecodeError, ValueError) as exc:
            log.debug("offload answer not used: %s", exc)
            self._count("error")
            return None
        self._count("answered")
        return logits

    def on_response(self, response: InferenceResponse, correlation: bytes) -> None:
        """An answer arrived (MQTT thread): wake the request waiting for it, if any."""
        request_id = correlation.decode(errors="replace") if correlation else response.request_id
        with self._lock:
            waiter = self._pending.get(request_id)
        if waiter is None or response.request_id != request_id:
            return  # too late, or not ours
        waiter.response = response
        waiter.event.set()

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def telemetry_extra(self) -> dict[str, float]:
        """``offload_<outcome>`` and ``low_confidence_kept`` for telemetry's ``extra``."""
        with self._lock:
            out = {f"offload_{o}": float(n) for o, n in sorted(self.counts.items())}
            out["low_confidence_kept"] = float(self.kept)
        return out

    def metrics_lines(self) -> list[str]:
        """Prometheus lines: ``offload_requests_total{outcome}``, ``low_confidence_kept_total``."""
        p = "fedge_agent_"
        with self._lock:
            lines = [f"# HELP {p}offload_requests_total Low-confidence predictions offloaded to"
                     " the cloud model, by outcome (answered, timeout, error, skipped).",
                     f"# TYPE {p}offload_requests_total counter"]  # fmt: skip
            lines += [f'{p}offload_requests_total{{outcome="{o}"}} {n}'
                      for o, n in sorted(self.counts.items())]  # fmt: skip
            lines += [f"# HELP {p}low_confidence_kept_total Low-confidence inputs kept as"
                      " candidates for local training.",
                      f"# TYPE {p}low_confidence_kept_total counter",
                      f"{p}low_confidence_kept_total {self.kept}"]  # fmt: skip
        return lines
