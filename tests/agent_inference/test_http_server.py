"""The local API's HTTP/1.1 handling on real sockets: framing, persistence, refusals.

A stand-in backend keeps these fast; `test_api.py` runs the same server over the real
inference service, and the curl test here talks to the real service too. The client's
side is in `test_http_client.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time

import pytest

from agent.client import ClientError, InferenceClient
from agent.http_api import ApiServer
from agent.inference_service import InferenceService
from agent.predictions import ModelUnavailableError
from tests.agent_inference.api_stub import (
    StubBackend,
    backend,
    connect_raw,
    own_server,
    read_answer,
    server,
)
from tests.agent_inference.conftest import Bundles

__all__ = ["backend", "server"]  # (the fixtures, from api_stub)


def _exchange(server: ApiServer, data: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """Send `data`, read one answer, then whatever follows until the server closes."""
    with connect_raw(server) as sock:
        sock.sendall(data)
        stream = sock.makefile("rb")
        status, headers, body = read_answer(stream)
        sock.settimeout(2)
        return status, headers, body, stream.read()


def test_pipelined_requests_are_answered_in_order_on_one_connection(server: ApiServer) -> None:
    with connect_raw(server) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET /v1/model HTTP/1.1\r\nHost: localhost:80\r\n\r\n"
        )
        stream = sock.makefile("rb")
        first, second = read_answer(stream), read_answer(stream)
        assert json.loads(first[2]) == {"status": "ok"}
        assert json.loads(second[2])["version"] == "v1"
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")  # still open
        status, headers, body = read_answer(stream)
        assert (status, body) == (200, b"up 1\n")
        assert headers["content-type"].startswith("text/plain")
        assert "connection" not in headers


def test_http_1_0_is_answered_then_closed(server: ApiServer) -> None:
    status, headers, body, rest = _exchange(server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (status, headers["connection"], rest) == (200, "close", b"")
    assert json.loads(body) == {"status": "ok"}


def test_expect_100_continue_is_honoured(server: ApiServer) -> None:
    with connect_raw(server) as sock:
        sock.sendall(
            b"POST /v1/feedback HTTP/1.1\r\nHost: localhost\r\n"
            b"Expect: 100-continue\r\nContent-Length: 36\r\n\r\n"
        )
        stream = sock.makefile("rb")
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        sock.sendall(b'{"prediction_id": "p-1", "label": 3}')
        status, _, body = read_answer(stream)
        assert (status, json.loads(body)) == (200, {"prediction_id": "p-1"})


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (
            b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999\r\n\r\n",
            413,
            "body over",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
            "Content-Length",
        ),
        (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/1.1"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "request line"),
        (
            b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"A: b\r\n" * 101 + b"\r\n",
            431,
            "header lines",
        ),
        (b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414, "request line"),
    ],
)
def test_broken_requests_get_their_status_and_a_closed_connection(
    server: ApiServer, request_bytes: bytes, status: int, says: str
) -> None:
    got, headers, body, rest = _exchange(server, request_bytes)
    assert (got, headers["connection"], rest) == (status, "close", b"")
    assert says in json.loads(body)["error"]


@pytest.mark.parametrize(
    ("request_line", "allow"),
    [(b"PUT /v1/model", "GET, HEAD"), (b"GET /v1/predict", "POST"), (b"POST /healthz", "GET, HEAD"),
     (b"PATCH /v1/rollback", "POST"), (b"DELETE /metrics", "GET, HEAD")],
)  # fmt: skip
def test_another_method_on_an_endpoint_is_405_with_its_allow_and_the_connection_stays(
    server: ApiServer, request_line: bytes, allow: str
) -> None:
    with connect_raw(server) as sock:
        sock.sendall(request_line + b" HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
                     b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")  # fmt: skip
        stream = sock.makefile("rb")
        status, headers, body = read_answer(stream)
        assert (status, headers["allow"]) == (405, allow)
        method = request_line.split()[0].decode()
        assert f"takes {allow}, not {method}" in json.loads(body)["error"]
        assert read_answer(stream)[0] == 200


@pytest.mark.parametrize("method", [b"GET", b"POST", b"PUT"])
def test_an_unknown_path_is_404_whatever_the_method(server: ApiServer, method: bytes) -> None:
    with connect_raw(server) as sock:
        sock.sendall(
            method + b" /v2/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
        )
        status, headers, body = read_answer(sock.makefile("rb"))
    assert (status, "allow" in headers) == (404, False)
    assert "no endpoint /v2/predict: see /openapi.json" in json.loads(body)["error"]


def test_a_post_without_content_length_has_no_body(server: ApiServer) -> None:
    with connect_raw(server) as sock:  # as `curl -X POST` sends it (RFC 9112 6.3)
        sock.sendall(b"POST /v1/rollback HTTP/1.1\r\nHost: localhost\r\n\r\n"
                     b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\n\r\n")  # fmt: skip
        stream = sock.makefile("rb")
        assert read_answer(stream)[:1] == (200,)
        status, headers, body = read_answer(stream)
        assert (status, "connection" in headers) == (400, False)  # kept open
        assert "body is not valid JSON" in json.loads(body)["error"]


def test_a_failing_backend_is_a_logged_500_not_a_dropped_connection(
    server: ApiServer, backend: StubBackend, caplog: pytest.LogCaptureFixture
) -> None:
    client = InferenceClient.connect(server.url)
    assert client.model()["version"] == "v1"
    conn = client._local.conn
    backend.fail = True
    try:
        with (
            caplog.at_level(logging.ERROR, logger="agent.http_api"),
            pytest.raises(ClientError) as e,
        ):
            client.model()
    finally:
        backend.fail = False
    assert e.value.status == 500
    assert "RuntimeError" in str(e.value)
    assert any(r.exc_info and "describe broke" in str(r.exc_info[1]) for r in caplog.records)
    assert client.model()["version"] == "v1"
    assert client._local.conn is conn  # the same connection throughout
    client.close()


def test_http_1_0_keep_alive_is_confirmed(server: ApiServer) -> None:
    with connect_raw(server) as sock:
        stream = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = read_answer(stream)
            assert (status, headers["connection"]) == (200, "keep-alive")


def test_head_answers_the_get_headers_without_a_body(server: ApiServer) -> None:
    with connect_raw(server) as sock:
        sock.sendall(
            b"HEAD /v1/model HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        stream = sock.makefile("rb")
        assert stream.readline() == b"HTTP/1.1 200 OK\r\n"
        headers = {}
        while (line := stream.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert int(headers["content-length"]) == len(b'{"model":"m","version":"v1"}')
        assert read_answer(stream)[2] == b'{"status":"ok"}'  # next, with no body between


def test_a_get_with_a_body_keeps_the_connection_in_step(server: ApiServer) -> None:
    with connect_raw(server) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nHELLO"
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        stream = sock.makefile("rb")
        assert read_answer(stream)[0] == 200
        assert read_answer(stream)[2] == b"up 1\n"


def test_a_rejected_body_still_lets_the_client_read_its_413(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.api_codec.MAX_BODY_BYTES", 1 << 20)
    body = b"x" * (3 << 19)  # sent whole before the answer is read, as simple clients do
    with connect_raw(server) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        sock.sendall(body)
        status, headers, answer = read_answer(sock.makefile("rb"))
    assert (status, headers["connection"]) == (413, "close")
    assert "body over 1048576 bytes" in json.loads(answer)["error"]


def test_a_request_sent_a_byte_at_a_time_runs_out_of_time(backend: StubBackend) -> None:
    with own_server(backend, request_timeout_s=0.5) as server, connect_raw(server) as sock:
        stream = sock.makefile("rb")
        for byte in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: yes\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        status, headers, body = read_answer(stream)
        assert (status, headers["connection"]) == (408, "close")
        assert "within 0.5 s" in json.loads(body)["error"]  # (not the 120-s idle timeout)


def test_connections_over_the_cap_are_answered_503(backend: StubBackend) -> None:
    with own_server(backend, max_connections=2) as server:
        held = [InferenceClient.connect(server.url) for _ in range(2)]
        for c in held:
            assert c.health() == {"status": "ok"}  # two connections open and kept
        with connect_raw(server) as sock:
            status, headers, body = read_answer(sock.makefile("rb"))
        assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
        assert b"too many connections" in body
        with InferenceClient.connect(server.url) as third, pytest.raises(ClientError) as busy:
            third.health()
        assert busy.value.status == 503  # busy, not ModelUnavailableError ("no model")
        assert not isinstance(busy.value, ModelUnavailableError)
        held[0].close()
        deadline = time.monotonic() + 5
        while True:  # the server frees the slot once it sees the close
            with InferenceClient.connect(server.url) as fresh:
                try:
                    answer = fresh.health()
                except ClientError as exc:
                    refused = exc.status
                else:
                    break
            assert refused == 503
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert answer == {"status": "ok"}
        held[1].close()


def test_stopping_the_server_ends_its_open_connections(backend: StubBackend) -> None:
    with own_server(backend) as server:
        sock = connect_raw(server)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        stream = sock.makefile("rb")
        assert read_answer(stream)[0] == 200
    with sock, stream:  # stopped: the kept-alive connection is closed, not served on
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert stream.read() == b""


def test_a_line_end_after_a_body_is_not_a_request(backend: StubBackend) -> None:
    with own_server(backend, request_timeout_s=0.2) as server, connect_raw(server) as sock:
        body = b'{"prediction_id": "p-1", "label": 3}'
        sock.sendall(b"POST /v1/feedback HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Length: %d\r\n\r\n%s\r\n" % (len(body), body))  # fmt: skip
        stream = sock.makefile("rb")
        assert read_answer(stream)[0] == 200
        sock.settimeout(0.6)  # three request deadlines: no 408 for the stray CRLF
        with pytest.raises(TimeoutError):
            sock.recv(1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_predicts_through_the_real_service(
    service: InferenceService, bundles: Bundles
) -> None:
    assert service.server is not None
    body = json.dumps({"input": bundles.pixels[:3].tolist()})
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-H", "Content-Type: application/json",
         "-H", "Expect: 100-continue", "--data-binary", "@-", "-w", "\n%{http_code}",
         f"http://{service.server.url}/v1/predict"],
        input=body.encode(), capture_output=True, check=True,
    )  # fmt: skip
    answer, _, code = out.stdout.decode().rpartition("\n")
    assert code == "200"
    assert len(json.loads(answer)["predictions"]) == 3
