"""The local API's HTTP/1.1 handling on real sockets: framing, persistence, refusals.

A stand-in backend keeps these fast; `test_api.py` runs the same server over the real
inference service, and the curl test here talks to the real service too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from agent.client import ClientError, InferenceClient
from agent.config import ListenAddress
from agent.http_api import ApiServer
from agent.inference_service import InferenceService
from agent.predictions import ModelUnavailableError, Predictions
from tests.agent_inference.conftest import Bundles


class _Backend:
    """Answers health and model; `describe` fails on demand."""

    def __init__(self) -> None:
        self.fail = False

    def predict(self, x: object) -> Predictions:
        raise NotImplementedError

    def count_invalid(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("describe broke")
        return {"model": "m", "version": "v1"}

    def feedback(self, prediction_id: str, label: str | int) -> dict[str, Any]:
        return {"prediction_id": prediction_id}

    def rollback(self) -> dict[str, Any]:
        return {}

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"status": "ok"}

    def metrics_text(self) -> str:
        return "up 1\n"


@pytest.fixture(scope="module")
def backend() -> _Backend:
    return _Backend()


@pytest.fixture(scope="module")  # (one for the module: stopping one takes half a second)
def server(backend: _Backend) -> Iterator[ApiServer]:
    s = ApiServer(backend, ListenAddress(host="127.0.0.1", port=0), idle_timeout_s=5.0)
    s.start()
    yield s
    s.stop()


@contextlib.contextmanager
def _own_server(backend: _Backend, **options: Any) -> Iterator[ApiServer]:
    """A server of its own with `options` (timeouts, connection cap), stopped afterwards."""
    server = ApiServer(backend, ListenAddress(host="127.0.0.1", port=0), **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _connect(server: ApiServer) -> socket.socket:
    sock = socket.create_connection((server.address.host, server.address.port), timeout=5)
    return sock


def _read_answer(stream: Any) -> tuple[int, dict[str, str], bytes]:
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, stream.read(int(headers["content-length"]))


def _exchange(server: ApiServer, data: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """Send `data`, read one answer, then whatever follows until the server closes."""
    with _connect(server) as sock:
        sock.sendall(data)
        stream = sock.makefile("rb")
        status, headers, body = _read_answer(stream)
        sock.settimeout(2)
        return status, headers, body, stream.read()


def test_pipelined_requests_are_answered_in_order_on_one_connection(server: ApiServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\nGET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n")
        stream = sock.makefile("rb")
        first, second = _read_answer(stream), _read_answer(stream)
        assert json.loads(first[2]) == {"status": "ok"}
        assert json.loads(second[2])["version"] == "v1"
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # still open
        status, headers, body = _read_answer(stream)
        assert (status, body) == (200, b"up 1\n")
        assert headers["content-type"].startswith("text/plain")
        assert "connection" not in headers


def test_http_1_0_is_answered_then_closed(server: ApiServer) -> None:
    status, headers, body, rest = _exchange(server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (status, headers["connection"], rest) == (200, "close", b"")
    assert json.loads(body) == {"status": "ok"}


def test_expect_100_continue_is_honoured(server: ApiServer) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/feedback HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 36\r\n\r\n"
        )
        stream = sock.makefile("rb")
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        sock.sendall(b'{"prediction_id": "p-1", "label": 3}')
        status, _, body = _read_answer(stream)
        assert (status, json.loads(body)) == (200, {"prediction_id": "p-1"})


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"POST /v1/predict HTTP/1.1\r\n\r\n", 411, "Content-Length"),
        (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413, "body over"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501, "Content-Length"),
        (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/1.1"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "request line"),
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n", 431, "header lines"),
        (b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "request line"),
    ],
)
def test_broken_requests_get_their_status_and_a_closed_connection(
    server: ApiServer, request_bytes: bytes, status: int, says: str
) -> None:
    got, headers, body, rest = _exchange(server, request_bytes)
    assert (got, headers["connection"], rest) == (status, "close", b"")
    assert says in json.loads(body)["error"]


def test_an_unknown_method_is_405_and_the_connection_stays(server: ApiServer) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"PUT /v1/model HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /healthz HTTP/1.1\r\n\r\n"
        )
        stream = sock.makefile("rb")
        status, _, body = _read_answer(stream)
        assert status == 405
        assert "use GET or POST" in json.loads(body)["error"]
        assert _read_answer(stream)[0] == 200


def test_a_failing_backend_is_a_logged_500_not_a_dropped_connection(
    server: ApiServer, backend: _Backend, caplog: pytest.LogCaptureFixture
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


def test_an_idle_connection_is_closed_and_the_client_reconnects(backend: _Backend) -> None:
    with _own_server(backend, idle_timeout_s=0.2) as server:
        with _connect(server) as sock:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed by the server once idle
        client = InferenceClient.connect(server.url)
        assert client.health() == {"status": "ok"}
        first = client._local.conn
        time.sleep(0.6)  # the server drops the kept-alive connection meanwhile
        # a POST, which is never sent twice: the closed connection is noticed before sending
        assert client.feedback("p-9", 1) == {"prediction_id": "p-9"}
        assert client._local.conn is not first
        client.close()


def test_http_1_0_keep_alive_is_confirmed(server: ApiServer) -> None:
    with _connect(server) as sock:
        stream = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = _read_answer(stream)
            assert (status, headers["connection"]) == (200, "keep-alive")


def test_head_answers_the_get_headers_without_a_body(server: ApiServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"HEAD /v1/model HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        stream = sock.makefile("rb")
        assert stream.readline() == b"HTTP/1.1 200 OK\r\n"
        headers = {}
        while (line := stream.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert int(headers["content-length"]) == len(b'{"model":"m","version":"v1"}')
        assert _read_answer(stream)[2] == b'{"status":"ok"}'  # next, with no body between


def test_a_get_with_a_body_keeps_the_connection_in_step(server: ApiServer) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nHELLOGET /metrics HTTP/1.1\r\n\r\n"
        )
        stream = sock.makefile("rb")
        assert _read_answer(stream)[0] == 200
        assert _read_answer(stream)[2] == b"up 1\n"


def test_a_rejected_body_still_lets_the_client_read_its_413(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.api_codec.MAX_BODY_BYTES", 1 << 20)
    body = b"x" * (3 << 19)  # sent whole before the answer is read, as simple clients do
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.sendall(body)
        status, headers, answer = _read_answer(sock.makefile("rb"))
    assert (status, headers["connection"]) == (413, "close")
    assert "body over 1048576 bytes" in json.loads(answer)["error"]


def test_the_client_refuses_a_body_over_the_limit_before_sending(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.api_codec.MAX_BODY_BYTES", 1000)
    client = InferenceClient.connect(server.url)
    with pytest.raises(ClientError, match="over the API's limit") as caught:
        client.predict(np.zeros((50, 64)))
    assert caught.value.status == 413
    assert getattr(client._local, "conn", None) is None  # nothing was sent
    client.close()


def test_a_request_sent_a_byte_at_a_time_runs_out_of_time(backend: _Backend) -> None:
    with _own_server(backend, request_timeout_s=0.5) as server, _connect(server) as sock:
        stream = sock.makefile("rb")
        for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: yes\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        status, headers, body = _read_answer(stream)
        assert (status, headers["connection"]) == (408, "close")
        assert "within 0.5 s" in json.loads(body)["error"]  # (not the 120-s idle timeout)


def test_connections_over_the_cap_are_answered_503(backend: _Backend) -> None:
    with _own_server(backend, max_connections=2) as server:
        held = [InferenceClient.connect(server.url) for _ in range(2)]
        for c in held:
            assert c.health() == {"status": "ok"}  # two connections open and kept
        with _connect(server) as sock:
            status, headers, body = _read_answer(sock.makefile("rb"))
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


def test_threads_that_end_give_their_connections_back(backend: _Backend) -> None:
    with _own_server(backend, max_connections=4) as server:
        client = InferenceClient.connect(server.url)
        answers: list[object] = []
        for _ in range(12):  # three times the cap, one short-lived thread after another
            t = threading.Thread(target=lambda: answers.append(client.model()))
            t.start()
            t.join()
        assert answers == [{"model": "m", "version": "v1"}] * 12
        client.close()


def test_close_closes_the_connections_of_every_thread(server: ApiServer) -> None:
    client = InferenceClient.connect(server.url)
    conns = []

    def call() -> None:
        client.health()
        conns.append(client._local.conn)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in conns}) == 3
    client.close()
    for conn in conns:  # ended: the agent's side sees the close, the owner's next call reopens
        assert conn.closed
        assert conn.sock.recv(1) == b""


def test_close_during_requests_in_other_threads_raises_only_client_errors(
    server: ApiServer,
) -> None:
    client = InferenceClient.connect(server.url)
    stop = threading.Event()
    unexpected: list[BaseException] = []
    done = [0]

    def load() -> None:
        while not stop.is_set():
            try:
                client.health()
                done[0] += 1
            except ClientError:
                pass
            except BaseException as exc:
                unexpected.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(200):
        client.close()
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join()
    client.close()
    assert not unexpected
    assert done[0] > 0


def test_stopping_the_server_ends_its_open_connections(backend: _Backend) -> None:
    with _own_server(backend) as server:
        sock = _connect(server)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        stream = sock.makefile("rb")
        assert _read_answer(stream)[0] == 200
    with sock, stream:  # stopped: the kept-alive connection is closed, not served on
        sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert stream.read() == b""


def test_a_line_end_after_a_body_is_not_a_request(backend: _Backend) -> None:
    with _own_server(backend, request_timeout_s=0.2) as server, _connect(server) as sock:
        body = b'{"prediction_id": "p-1", "label": 3}'
        sock.sendall(b"POST /v1/feedback HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s\r\n"
                     % (len(body), body))  # fmt: skip
        stream = sock.makefile("rb")
        assert _read_answer(stream)[0] == 200
        sock.settimeout(0.6)  # three request deadlines: no 408 for the stray CRLF
        with pytest.raises(TimeoutError):
            sock.recv(1)


def test_an_address_without_a_port_is_refused_at_once() -> None:
    for address in ("localhost", "127.0.0.1:", ":8790", "h:99999"):
        with pytest.raises(ClientError, match="HOST:PORT or unix:PATH"):
            InferenceClient.connect(address)


class _ScriptedServer:
    """Answers requests by `script` (None: read it, close, take the next connection)."""

    def __init__(self, script: list[bytes | None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.script = script
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        conn = None
        try:
            conn, _ = self.listener.accept()
            stream = conn.makefile("rb")
            for answer in self.script:
                line = stream.readline()
                if not line:
                    break
                while stream.readline() not in (b"\r\n", b""):
                    pass
                self.seen.append(line.split()[0])
                if answer is None:
                    stream.close()
                    conn.close()
                    conn, _ = self.listener.accept()
                    stream = conn.makefile("rb")
                    continue
                conn.sendall(answer)
            stream.close()
        except OSError:  # stopped
            pass
        finally:
            if conn is not None:
                conn.close()

    def stop(self) -> None:
        """Stop waiting for connections."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"


def test_a_post_is_not_sent_again_once_it_may_have_been_applied() -> None:
    agent = _ScriptedServer([_OK, None, _OK])  # (a second try would be answered)
    client = InferenceClient.connect(agent.address, timeout=5)
    assert client.model() == {}
    with pytest.raises(ClientError, match="without answering"):
        client.rollback()
    client.close()
    agent.stop()
    assert agent.seen == [b"GET", b"POST"]  # the rollback went out once


def test_a_get_is_sent_again_on_a_new_connection() -> None:
    agent = _ScriptedServer([_OK, None, _OK])
    client = InferenceClient.connect(agent.address, timeout=5)
    assert client.model() == {}
    assert client.model() == {}
    client.close()
    agent.stop()
    assert agent.seen == [b"GET", b"GET", b"GET"]


def _one_shot_server(answer: bytes) -> tuple[str, threading.Thread]:
    """A listener that reads one request, sends `answer` and closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"127.0.0.1:{listener.getsockname()[1]}", thread


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"", "closed the connection without answering"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "mid-answer"),
        (b"hello\r\n\r\n", "malformed status line"),
    ],
)
def test_the_client_names_what_went_wrong(answer: bytes, says: str) -> None:
    address, thread = _one_shot_server(answer)
    client = InferenceClient.connect(address, timeout=5)
    with pytest.raises(ClientError, match=says):
        client.health()
    thread.join(5)


def test_the_client_reads_an_answer_framed_by_closing(server: ApiServer) -> None:
    address, thread = _one_shot_server(b'HTTP/1.0 200 OK\r\n\r\n{"status": "ok"}')
    client = InferenceClient.connect(address, timeout=5)
    assert client.health() == {"status": "ok"}
    thread.join(5)
    client._target = server.address  # the next call opens a new connection, there
    assert client.model()["version"] == "v1"
    client.close()


def test_a_refused_connection_is_a_client_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with pytest.raises(ClientError, match="refused"):
        InferenceClient.connect(f"127.0.0.1:{port}", timeout=5).health()


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


def test_an_answer_sent_before_the_agent_stopped_reading_still_reaches_the_client() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    body = b'{"error":"too big"}'
    answer = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    def refuse() -> None:  # read the head only, answer, close with the body unread
        with listener:
            conn, _ = listener.accept()
            with conn:
                stream = conn.makefile("rb")
                while stream.readline() not in (b"\r\n", b""):
                    pass
                conn.sendall(answer)
                stream.close()

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    client = InferenceClient.connect(f"127.0.0.1:{listener.getsockname()[1]}", use_msgpack=True)
    with pytest.raises(ClientError) as caught:
        client.predict(np.zeros((40_000, 64), dtype=np.float32))  # 10 MiB: more than buffers hold
    thread.join(5)
    assert caught.value.status == 413
    assert "too big" in str(caught.value)
    assert getattr(client._local, "conn", None) is None  # the broken connection is dropped


def test_an_ipv6_loopback_api_is_reached_with_a_bracketed_host(backend: _Backend) -> None:
    try:
        server = ApiServer(backend, ListenAddress(host="::1", port=0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server.start()
    try:
        assert server.url == f"[::1]:{server.address.port}"
        with InferenceClient.connect(server.url) as client:
            assert client.health() == {"status": "ok"}
            assert client._local.conn.host == server.url
    finally:
        server.stop()
