"""Protocol edges over raw sockets to the real service: RFC 9112's Host rule, bare CRs and
absolute-form targets; true and false are not numbers; a rollback reads no body, so its
content type does not matter."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.inference_service import InferenceService
from tests.agent_inference.api_stub import read_answer
from tests.agent_inference.conftest import Bundles


def _exchange(service: InferenceService, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    assert service.server is not None
    address = (service.server.address.host, service.server.address.port)
    with socket.create_connection(address, timeout=10) as sock:
        length = b"Content-Length: %d\r\n" % len(body) if body else b""
        sock.sendall(head + length + b"Connection: close\r\n\r\n" + body)
        status, _, answer = read_answer(sock.makefile("rb"))
    return status, answer


@pytest.mark.parametrize(
    ("head", "status", "says"),
    [(b"GET /healthz HTTP/1.1\r\n", 400, "needs a Host"),
     (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n", 400, "one Host"),
     (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: a\rb\r\n", 400, "CR"),
     (b"GET /healthz HTTP/1.0\r\n", 200, "ok"),  # (HTTP/1.0 has no Host rule)
     (b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", 200, "ok"),
     (b"GET http://attacker.example/healthz HTTP/1.1\r\nHost: localhost\r\n", 403, "local"),
     (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n", 200, "ok")],
    ids=["no-host", "two-hosts", "bare-cr", "http-1.0", "absolute-form",
         "absolute-form-authority-is-the-host", "plain"],
)  # fmt: skip
def test_request_heads_follow_rfc_9112(
    service: InferenceService, head: bytes, status: int, says: str
) -> None:
    answer = _exchange(service, head)
    assert answer[0] == status
    assert says in answer[1].decode()


def test_true_and_false_are_not_numbers(service: InferenceService, bundles: Bundles) -> None:
    before = service.metrics.snapshot()["inference_invalid"]
    head = b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    status, body = _exchange(service, head, json.dumps({"input": [True] * 64}).encode())
    assert status == 400
    assert "must hold numbers, got bool" in json.loads(body)["error"]
    assert service.metrics.snapshot()["inference_invalid"] == before + 1
    assert service.server is not None
    mask = bundles.pixels[:2] > 8
    for use_msgpack in (False, True):  # the client sends a boolean array as 1 and 0
        with InferenceClient.connect(service.server.url, use_msgpack=use_msgpack) as client:
            answer = client.predict(mask)
        assert answer.classes == service.predict(mask.astype(np.float32)).classes


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/msgpack", None])
def test_a_rollback_reads_no_body_so_any_content_type_goes(
    service: InferenceService, content_type: bytes | None
) -> None:
    head = b"POST /v1/rollback HTTP/1.1\r\nHost: localhost\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\r\n"
    status, body = _exchange(service, head, b"ignored")
    assert status == 503  # (no previous version to roll back to): not 415
    assert b"no previous version" in body
