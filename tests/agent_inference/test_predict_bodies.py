"""Predict bodies at and past their limits, over HTTP to the real service: a body larger
than the model's largest batch needs is refused before it is read, a large one holding
more lists or values than that batch is refused without building them, a batch of
``inference_max_batch`` rows is still answered, and malformed tensor maps are 400s."""

from __future__ import annotations

import http.client
import json
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest

from agent import api_codec
from agent.api_codec import JSON, MSGPACK, BadRequestError, InputLimits
from agent.inference_service import InferenceService
from tests.agent_inference.conftest import Bundles

_DIGITS = InputLimits.of((64,), 1024)  # the digits model's input, the default max_batch


def _post(
    service: InferenceService, body: bytes, content_type: str = JSON
) -> tuple[int, str, bytes]:
    assert service.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", service.server.address.port, timeout=30)
    try:
        conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": content_type})
        answer = conn.getresponse()
        return answer.status, answer.getheader("Content-Type") or "", answer.read()
    finally:
        conn.close()


def _invalid(service: InferenceService) -> float:
    return service.metrics.snapshot().get("inference_invalid", 0.0)


def _empty_lists(n: int) -> bytes:
    """A msgpack predict body whose input is a list of `n` empty lists (1 byte each)."""
    return b"\x81\xa5input\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def test_a_body_larger_than_the_largest_batch_needs_is_413_before_it_is_read(
    service: InferenceService,
) -> None:
    before = _invalid(service)
    most = _DIGITS.body_bytes(MSGPACK)
    status, _, body = _post(service, _empty_lists(most + 1), MSGPACK)
    assert status == 413
    message = json.loads(body)["error"]
    assert f"needs at most {most}" in message
    assert "1024 rows" in message
    most = _DIGITS.body_bytes(JSON)
    status, _, body = _post(service, b'{"input":[' + b"[]," * (most // 3) + b"[]]}")
    assert status == 413
    assert f"needs at most {most}" in json.loads(body)["error"]
    assert _invalid(service) == before + 2


@pytest.mark.parametrize(
    ("body", "kind"),
    [(_empty_lists(400_000), MSGPACK),  # one list far longer than any the model takes
     (b"\x81\xa5input\xdc\x04\x00" + (b"\xdc\x01\x40" + b"\x90" * 320) * 1024, MSGPACK),
     (b'{"input":[' + b"[]," * 400_000 + b"[]]}", JSON),
     (b'{"input":[' + b"-9," * 400_000 + b"1]}", JSON)],
    ids=["msgpack-long-list", "msgpack-nested", "json-lists", "json-values"],
)  # fmt: skip
def test_a_large_body_holding_more_than_a_batch_is_refused_without_building_it(
    service: InferenceService, body: bytes, kind: str
) -> None:
    assert api_codec.SMALL_BODY_BYTES < len(body) <= _DIGITS.body_bytes(kind)
    tracemalloc.start()
    try:
        with pytest.raises(BadRequestError) as refused:
            api_codec.decode_body(body, kind, _DIGITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.status == 400
    assert peak < 2 * len(body)  # (built as it is: about 20 to 70 bytes per byte)
    before = _invalid(service)
    status, content_type, answer = _post(service, body, kind)
    assert (status, content_type) == (400, kind)
    assert "error" in (msgpack.unpackb(answer) if kind == MSGPACK else json.loads(answer))
    assert _invalid(service) == before + 1


@pytest.mark.parametrize("kind", [JSON, MSGPACK])
def test_a_batch_of_max_batch_rows_is_answered_however_it_is_written(
    service: InferenceService, bundles: Bundles, kind: str
) -> None:
    rows = np.resize(bundles.pixels, (1024, 64)).astype(np.float64) + 1 / 3  # long decimals
    value = {"input": rows.tolist()}
    body = msgpack.packb(value) if kind == MSGPACK else json.dumps(value, indent=2).encode()
    assert len(body) > api_codec.SMALL_BODY_BYTES
    status, _, answer = _post(service, body, kind)
    assert status == 200
    decoded = msgpack.unpackb(answer) if kind == MSGPACK else json.loads(answer)
    assert len(decoded["predictions"]) == 1024
    tensor = {"input": {"dtype": "float64", "shape": [1024, 64], "data": rows.tobytes()}}
    assert _post(service, msgpack.packb(tensor), MSGPACK)[0] == 200


@pytest.mark.parametrize(
    "tensor",
    [{"dtype": [], "shape": [1, 64], "data": b"\0" * 256},
     {"dtype": {}, "shape": [1, 64], "data": b"\0" * 256},
     {"dtype": "float32", "shape": [1] * 65, "data": b"\0" * 4},
     {"dtype": "float32", "shape": [2**62, 2**62, 0], "data": b""},
     {"dtype": "float32", "shape": [True, 64], "data": b"\0" * 256},
     {"dtype": "float32", "shape": [1, 64.0], "data": b"\0" * 256}],
    ids=["dtype-list", "dtype-map", "65-dims", "huge-dims", "bool-dim", "float-dim"],
)  # fmt: skip
def test_a_malformed_tensor_map_is_a_counted_400_in_the_requests_format(
    service: InferenceService, tensor: dict[str, Any]
) -> None:
    before = _invalid(service)
    status, content_type, body = _post(service, msgpack.packb({"input": tensor}), MSGPACK)
    assert (status, content_type) == (400, MSGPACK)
    assert "input tensor" in msgpack.unpackb(body)["error"]
    assert _invalid(service) == before + 1
    if isinstance(tensor["dtype"], list):  # (JSON has no bytes: any tensor map is a 400)
        assert _post(service, json.dumps({"input": {**tensor, "data": "x"}}).encode())[0] == 400
