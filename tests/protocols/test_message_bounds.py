"""Values no encoder of ours produces are refused at decode, as `bad_field`.

A peer on the broker can send them anyway (msgpack carries NaN, Inf and integers up to
2**64-1): NaN in telemetry would poison the fleet's JSON, a counter past SQLite's INTEGER
would crash the coordinator's store, a malformed hash would reach the blob store.
"""

from __future__ import annotations

from typing import Any

import pytest

from protocols import messages, wire
from protocols.errors import DecodeError
from protocols.field_checks import MAX_COUNT
from protocols.messages import BlobRequest, ModelUpdate, Status, Telemetry


def _payload(kind: type[Any], **fields: Any) -> bytes:
    """A payload written without our encoder (which would refuse these values)."""
    return wire.pack_map({"v": kind.VERSION, "kind": kind.KIND, **fields})


_TELEMETRY = {"device_id": "d", "ts": 1.0, "seq": 1, "uptime_s": 2.0, "cpu_percent": 3.0,
              "mem_rss_bytes": 4, "mem_available_bytes": 5}  # fmt: skip
_UPDATE = {"device_id": "d", "job_id": "j", "round": 0, "base_version": "v", "seq": 0,
           "num_samples": 1, "tensors": []}  # fmt: skip
_SHA = "ab" * 32


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    ("kind", "fields", "where"),
    [(Telemetry, _TELEMETRY, {"uptime_s": None}), (Telemetry, _TELEMETRY, {"cpu_percent": None}),
     (Telemetry, _TELEMETRY, {"ts": None}), (Telemetry, _TELEMETRY, {"extra": {"temp": None}}),
     (Status, {"device_id": "d", "state": "online"}, {"ts": None}),
     (ModelUpdate, _UPDATE, {"metrics": {"loss": None}})],
)  # fmt: skip
def test_non_finite_numbers_are_a_bad_field(
    kind: type[Any], fields: dict[str, Any], where: dict[str, Any], bad: float
) -> None:
    placed = {k: ({n: bad for n in v} if isinstance(v, dict) else bad) for k, v in where.items()}
    with pytest.raises(DecodeError, match="finite") as info:
        messages.decode(_payload(kind, **{**fields, **placed}))
    assert info.value.reason == "bad_field"


@pytest.mark.parametrize("field", ["round", "seq", "num_samples"])
def test_update_counters_past_sqlite_integer_are_a_bad_field(field: str) -> None:
    assert messages.decode(_payload(ModelUpdate, **{**_UPDATE, field: MAX_COUNT}))
    with pytest.raises(DecodeError, match=field) as info:
        messages.decode(_payload(ModelUpdate, **{**_UPDATE, field: MAX_COUNT + 1}))
    assert info.value.reason == "bad_field"


@pytest.mark.parametrize(
    "fields",
    [{"blob_sha256": "../../keys/model-signing.key"}, {"blob_sha256": _SHA.upper()},
     {"blob_sha256": _SHA, "indices": [-1]}, {"blob_sha256": _SHA, "indices": [1 << 31]}],
)  # fmt: skip
def test_blob_requests_name_a_hash_and_sane_indices(fields: dict[str, Any]) -> None:
    with pytest.raises(DecodeError) as info:
        messages.decode(_payload(BlobRequest, device_id="d", **fields))
    assert info.value.reason == "bad_field"
    ok = messages.decode(_payload(BlobRequest, device_id="d", blob_sha256=_SHA, indices=[0, 7]))
    assert ok == BlobRequest("d", _SHA, (0, 7))


_MANIFEST = {"name": "m", "version": "v1", "created": 1.0, "files": [], "inputs": [],
             "outputs": []}  # fmt: skip


@pytest.mark.parametrize("seq", [0, -1, 1 << 63])
def test_deployment_sequence_numbers_start_at_one(seq: int) -> None:
    fields = {"device_id": "d", "issued": 1.0, "manifest": _MANIFEST}
    with pytest.raises(DecodeError) as info:
        messages.decode_as(messages.Deployment, _payload(messages.Deployment, seq=seq, **fields))
    assert info.value.reason == "bad_field"
    ok = messages.decode_as(messages.Deployment, _payload(messages.Deployment, seq=1, **fields))
    assert (ok.seq, ok.manifest.version) == (1, "v1")


def test_a_deployment_is_capped_like_a_manifest() -> None:
    caps = messages.KIND_MAX_BYTES
    assert caps[messages.Deployment] == caps[messages.ModelManifest]


def test_small_kinds_have_small_caps_whatever_the_caller_allows() -> None:
    # An unknown field of empty arrays: about 70 bytes of memory per byte once decoded.
    junk = [[] for _ in range(70_000)]
    bloated = _payload(Status, device_id="d", state="online", ts=1.0, junk=junk)
    with pytest.raises(DecodeError, match="exceeds the cap of 65536") as info:
        messages.decode_as(Status, bloated, 16 * 1024 * 1024)
    assert info.value.reason == "too_large"
    small = _payload(Status, device_id="d", state="online", ts=1.0, junk=junk[:100])
    assert messages.decode_as(Status, small, 16 * 1024 * 1024).device_id == "d"
    with pytest.raises(DecodeError, match="exceeds the cap of 1000"):  # a smaller one wins
        messages.decode_as(Status, bloated, 1000)
    update = _payload(ModelUpdate, **{**_UPDATE, "junk": junk})  # large kinds: the caller's
    assert messages.decode_as(ModelUpdate, update, 16 * 1024 * 1024).device_id == "d"


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (messages.Command, {"cmd_id": "c1", "action": "ping", "ts": 1.0, "ttl_s": float("nan")}),
        (messages.Ack, {"ref": "r", "ok": True, "ts": float("inf")}),
        (messages.TrainTask, {"task_id": "t", "job_id": "j", "round": 0, "model_name": "m",
                              "base_version": "v", "deadline": float("nan")}),
        (messages.InferenceRequest, {"request_id": "r", "model_name": "m", "inputs": [],
                                     "reply_to": "x", "deadline": float("nan")}),
        (messages.Deployment, {"device_id": "d", "seq": 1, "issued": float("inf"),
                               "manifest": _MANIFEST}),
    ],
)  # fmt: skip
def test_nan_times_are_refused(kind: type[Any], fields: dict[str, Any]) -> None:
    # (a NaN deadline or time-to-live compares false with every time: it would never pass)
    with pytest.raises(DecodeError) as info:
        messages.decode_as(kind, _payload(kind, **fields))
    assert info.value.reason == "bad_field"
