"""Hybrid inference under trouble: a cloud answer of the wrong shape is not used, a slow
or absent cloud does not hold more than a few requests, low-confidence inputs are written
in batches, and the coordinator serves devices fairly and tolerates clock skew."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import offload
from agent.offload import CandidateLog, Offloader
from cloud_coordinator import cloud_inference
from cloud_coordinator.cloud_inference import CloudInference
from cloud_coordinator.model_registry import ModelRegistry
from protocols.messages import InferenceRequest, InferenceResponse, decode_as, encode
from protocols.mqtt import NotConnectedError
from protocols.tensors import WireTensor, encode_dense
from tests.agent_inference.conftest import agent_config


class _Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                response_topic: str = "", correlation: bytes = b"") -> object:  # fmt: skip
        self.sent.append((topic, payload))
        return None


def _offloader(tmp_path: Path) -> Offloader:
    config = agent_config(tmp_path, offload=True, keep_low_confidence=False)
    return Offloader("dev-1", _Wire(), config, tmp_path / "data")


@pytest.mark.parametrize(
    "logits", [np.zeros(0, np.float32), np.zeros((2, 20), np.float32), np.zeros((2, 3), np.float32),
               np.zeros((1, 10), np.float32), np.full((2, 10), np.nan, np.float32)],
)  # fmt: skip
def test_a_cloud_answer_of_another_shape_is_not_used(tmp_path: Path, logits: Any) -> None:
    off = _offloader(tmp_path)
    response = InferenceResponse("r", "v1", (encode_dense("logits", logits),), "")
    assert off._logits(response, 2, 10) is None
    assert off.counts["error"] == 1
    good = InferenceResponse("r", "v1", (encode_dense("logits", np.ones((2, 10), np.float32)),))
    assert off._logits(good, 2, 10) is not None


def test_a_tiny_sparse_answer_claiming_a_huge_shape_is_refused_before_it_is_built(
    tmp_path: Path,
) -> None:
    off = _offloader(tmp_path)
    huge = WireTensor("logits", "f32", (2, 1 << 27), b"", indices=b"")  # 1 GiB if expanded
    tracemalloc.start()
    try:
        assert off._logits(InferenceResponse("r", "v1", (huge,), ""), 2, 10) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024
    assert off.counts["error"] == 1


def test_past_the_in_flight_cap_rows_are_answered_locally_at_once(tmp_path: Path) -> None:
    off = _offloader(tmp_path)
    for n in range(offload.MAX_IN_FLIGHT):
        off._pending[f"busy-{n}"] = offload._Waiter()
    assert off._ask("digits-mlp", np.zeros((1, 64), np.float32)) is None
    assert off.counts["skipped"] == 1
    assert off.requester.sent == []  # type: ignore[attr-defined]


def test_candidates_are_written_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = CandidateLog(tmp_path / "candidates.npz", max_rows=1000)
    writes: list[int] = []
    write = log._write
    monkeypatch.setattr(log, "_write", lambda: (writes.append(1), write())[1])
    for _ in range(offload.FLUSH_ROWS - 1):
        assert log.append(np.ones((1, 64))) >= 1
    assert writes == []  # not one rewrite and fsync per prediction
    log.append(np.ones((1, 64)))
    assert writes == [1]
    log.append(np.ones((1, 64)))
    log.flush()  # (at stop)
    assert len(writes) == 2
    with np.load(tmp_path / "candidates.npz") as data:
        assert len(data["x"]) == offload.FLUSH_ROWS + 1


def _request(request_id: str, deadline: float) -> bytes:
    x = encode_dense("input", np.zeros((1, 64), np.float32))
    reply = "fedge/v1/dev/{}/infer/resp"
    return encode(InferenceRequest(request_id, "m", (x,), reply.format("noisy"), deadline))


def test_one_device_cannot_fill_the_cloud_queue(tmp_path: Path) -> None:
    wire = _Wire()
    cloud = CloudInference(ModelRegistry(tmp_path / "models"), wire, clock=lambda: 0.0)
    for n in range(20):  # the worker is not started: everything waits
        cloud.on_request("noisy", _request(f"n{n}", 10.0), 1 << 20)
    assert cloud.counts["busy"] == 20 - cloud_inference.PER_DEVICE_QUEUED
    quiet = InferenceRequest("q1", "m", (encode_dense("input", np.zeros((1, 64), np.float32)),),
                             "fedge/v1/dev/quiet/infer/resp", 10.0)  # fmt: skip
    cloud.on_request("quiet", encode(quiet), 1 << 20)
    assert cloud.counts["busy"] == 20 - cloud_inference.PER_DEVICE_QUEUED  # quiet is queued


def test_a_request_past_its_deadline_by_more_than_clock_skew_is_answered_expired(
    tmp_path: Path,
) -> None:
    wire = _Wire()
    now = [100.0]
    cloud = CloudInference(ModelRegistry(tmp_path / "models"), wire, clock=lambda: now[0])
    cloud.start()
    try:
        now[0] = 100.0 + cloud_inference.SKEW_TOLERANCE_S - 1  # late by less than the skew
        cloud.on_request("noisy", _request("a", 100.0), 1 << 20)
        deadline = time.monotonic() + 10
        while not wire.sent:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        now[0] = 100.0 + cloud_inference.SKEW_TOLERANCE_S + 1  # far past it
        cloud.on_request("noisy", _request("b", 100.0), 1 << 20)
    finally:
        cloud.stop()
    answers = {
        r.request_id: r.error for r in (decode_as(InferenceResponse, p) for _, p in wire.sent)
    }
    assert answers["a"].startswith("no model")  # served (this registry has no model)
    assert answers["b"].startswith("expired")  # said, so the device need not wait


class _Offline(_Wire):
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                response_topic: str = "", correlation: bytes = b"") -> object:  # fmt: skip
        raise NotConnectedError("offline")


def test_the_cloud_worker_survives_answers_it_cannot_send(tmp_path: Path) -> None:
    cloud = CloudInference(ModelRegistry(tmp_path / "models"), _Offline(), clock=lambda: 1e9)
    cloud.start()
    try:
        for n in range(3):  # expired, answered: the broker is away
            cloud.on_request("noisy", _request(f"x{n}", 0.0), 1 << 20)
        deadline = time.monotonic() + 10
        while cloud.counts["expired"] < 3:
            assert time.monotonic() < deadline, cloud.counts
            time.sleep(0.01)
        assert cloud._thread.is_alive()
        assert cloud.counts["error"] == 0
        assert cloud._queued["noisy"] == 0  # nothing left counted against the device
    finally:
        cloud.stop()


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04truncated zip"])
def test_an_unreadable_candidates_file_is_ignored_not_fatal(tmp_path: Path, damage: bytes) -> None:
    path = tmp_path / offload.CANDIDATES_FILE
    path.write_bytes(damage)  # (a truncated file used to stop the agent at start)
    log = CandidateLog(path, 10)
    assert log.append(np.ones((2, 4), np.float32)) == 2


def test_the_offload_counts_are_prometheus_lines_with_help(tmp_path: Path) -> None:
    lines = _offloader(tmp_path).metrics_lines()
    types = [i for i, line in enumerate(lines) if line.startswith("# TYPE ")]
    assert len(types) == 2
    for i in types:
        assert lines[i - 1].startswith(f"# HELP {lines[i].split()[2]} ")
