"""The local API against hostile or unlucky peers: web pages, aborted uploads, bursts, a
second server on the same socket path, and what the client sends for any array.

Real sockets throughout, with the stand-in backend of `api_stub`.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import api_codec, http_conn, http_wire
from agent.client import ClientError, InferenceClient
from agent.config import ListenAddress
from agent.http_api import ApiServer
from agent.openapi import OPENAPI
from agent.predictions import Predictions
from tests.agent_inference.api_stub import (
    StubBackend,
    backend,
    connect_raw,
    own_server,
    read_answer,
    server,
)

__all__ = ["backend", "server"]  # (the fixtures, from api_stub)


def _status(server: ApiServer, head: bytes) -> int:
    with connect_raw(server) as sock:
        sock.sendall(head + b"\r\n")
        return read_answer(sock.makefile("rb"))[0]


@pytest.mark.parametrize(
    "headers",
    [b"Host: attacker.example:80\r\n",  # a DNS-rebinding page
     b"Host: localhost:80\r\nOrigin: http://attacker.example\r\n",  # a cross-site fetch
     b"Host: 127.0.0.1\r\nOrigin: null\r\n",  # a sandboxed page or a local file
     b"Host: localhost\r\nSec-Fetch-Site: cross-site\r\n",
     b"Host: localhost\r\nSec-Fetch-Site: same-site\r\n"],
)  # fmt: skip
def test_web_pages_are_refused_on_tcp(server: ApiServer, headers: bytes) -> None:
    with connect_raw(server) as sock:
        sock.sendall(b"POST /v1/rollback HTTP/1.1\r\n" + headers + b"Content-Length: 0\r\n\r\n")
        status, answer_headers, body = read_answer(sock.makefile("rb"))
    assert (status, answer_headers["connection"]) == (403, "close")
    assert "local" in json.loads(body)["error"]


@pytest.mark.parametrize(
    "headers",
    [b"Host: localhost:8790\r\n", b"Host: 127.0.0.1:8790\r\n", b"Host: [::1]:8790\r\n",
     b"Host: agent.localhost\r\n", b"Host: LOCALHOST\r\n",
     b"Host: localhost:8790\r\nOrigin: http://localhost:8790\r\nSec-Fetch-Site: same-origin\r\n",
     b"Host: localhost\r\nSec-Fetch-Site: none\r\n"],
)  # fmt: skip
def test_local_programs_and_same_origin_pages_are_served(server: ApiServer, headers: bytes) -> None:
    assert _status(server, b"GET /healthz HTTP/1.1\r\n" + headers) == 200


def test_a_unix_socket_serves_any_host(backend: StubBackend, tmp_path: Path) -> None:
    api = ApiServer(backend, ListenAddress(path=str(tmp_path / "api.sock")))
    api.start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:  # no browser reaches a Unix socket
            sock.connect(str(tmp_path / "api.sock"))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: attacker.example\r\n\r\n")
            assert read_answer(sock.makefile("rb"))[0] == 200
    finally:
        api.stop()


def test_a_client_closing_mid_body_ends_its_connection_quietly(
    backend: StubBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    with own_server(backend) as api:
        errors: list[object] = []
        monkeypatch.setattr(api._server, "handle_error", lambda *a: errors.append(a))
        with connect_raw(api) as sock:
            sock.sendall(
                b'POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{"in'
            )
            time.sleep(0.2)  # the server waits for the rest of the body
        deadline = time.monotonic() + 5
        while api._server._open and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not api._server._open  # the connection's thread has finished
        assert errors == []  # without an exception escaping it
        with InferenceClient.connect(api.url) as client:
            assert client.health() == {"status": "ok"}


class _TricklingSocket:
    """Gives `data` in `chunk`-byte pieces, then end of stream; records each read's room."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.rooms = data, chunk, []

    def settimeout(self, seconds: float) -> None:
        pass

    def recv_into(self, view: memoryview) -> int:
        self.rooms.append(len(view))
        n = min(self.chunk, len(view), len(self.data))
        view[:n], self.data = self.data[:n], self.data[n:]
        return n


def test_a_body_buffer_grows_with_what_arrives_not_with_what_was_announced() -> None:
    announced = 64 << 20
    data = bytes(range(256)) * 1200  # 300 KiB, then the client stops
    sock: Any = _TricklingSocket(data, 7000)
    reader = http_conn.RequestReader(sock, 1.0, 5.0)
    reader._deadline = time.monotonic() + 5
    body = reader.read(announced)
    assert body == data
    assert max(sock.rooms) <= 2 * len(data)  # never room for 64 MiB
    assert sock.rooms[0] <= http_conn._CHUNK


def test_a_body_is_read_whole_across_many_pieces() -> None:
    data = np.random.default_rng(0).bytes(1_000_003)
    sock: Any = _TricklingSocket(data + b"GET /next", 65536)
    reader = http_conn.RequestReader(sock, 1.0, 5.0)
    reader._deadline = time.monotonic() + 5
    assert reader.read(len(data)) == data


def test_a_live_socket_path_is_not_taken_over_and_stop_removes_only_its_own(
    backend: StubBackend, tmp_path: Path
) -> None:
    path = tmp_path / "api.sock"
    first = ApiServer(backend, ListenAddress(path=str(path)))
    first.start()
    with pytest.raises(OSError, match="another process serves") as taken:
        ApiServer(backend, ListenAddress(path=str(path)))
    assert taken.value.errno == errno.EADDRINUSE
    path.unlink()  # someone removed the first server's socket and started another there
    second = ApiServer(backend, ListenAddress(path=str(path)))
    second.start()
    try:
        first.stop()  # must leave the second server's socket alone
        with InferenceClient.connect(f"unix:{path}") as client:
            assert client.health() == {"status": "ok"}
    finally:
        second.stop()
    assert not path.exists()


def test_a_stale_socket_file_is_replaced(backend: StubBackend, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # left behind by a process that ended
    api = ApiServer(backend, ListenAddress(path=str(path)))
    api.start()
    try:
        with InferenceClient.connect(f"unix:{path}") as client:
            assert client.health() == {"status": "ok"}
    finally:
        api.stop()


def test_the_listen_backlog_holds_a_burst_before_it_is_accepted(
    backend: StubBackend, tmp_path: Path
) -> None:
    api = ApiServer(backend, ListenAddress(path=str(tmp_path / "api.sock")))
    socks = []
    try:  # not started: nothing accepts, so only the kernel's queue holds them
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX)
            socks.append(sock)
            sock.setblocking(False)
            sock.connect(str(tmp_path / "api.sock"))  # BlockingIOError once the queue is full
    finally:
        for sock in socks:
            sock.close()
        api._server.server_close()  # (`stop` waits for a serving loop that never ran)


def test_client_threads_in_a_burst_all_get_answers_over_a_small_backlog(
    backend: StubBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.http_api._UnixServer.request_queue_size", 2)
    api = ApiServer(backend, ListenAddress(path=str(tmp_path / "api.sock")))
    api.start()
    answers: list[object] = []
    client = InferenceClient.connect(f"unix:{tmp_path / 'api.sock'}")

    def call() -> None:
        try:
            answers.append(client.health())
        except ClientError as exc:
            answers.append(exc)

    try:
        threads = [threading.Thread(target=call) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        client.close()
        api.stop()
    assert answers == [{"status": "ok"}] * 40  # waited for room, never EAGAIN


class _Recorder(StubBackend):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[np.ndarray[Any, Any]] = []

    def predict(self, x: object) -> Predictions:
        assert isinstance(x, np.ndarray)
        self.seen.append(x)
        return Predictions("p", "m", "v1", [0] * len(x), [1.0] * len(x), ("0",), False)


@pytest.mark.parametrize(
    ("array", "arrives_as"),
    [(np.array([[1, 2]], np.int16), np.int64), (np.array([[1, 0]], np.uint16), np.int64),
     (np.array([[True, False]]), np.uint8),  # (the client sends booleans as 1 and 0)
     (np.array([[1.5, 2.5]], ">f4"), np.float32),
     (np.array([[1, 2]], ">i8"), np.int64), (np.array([[0.5, 1.5]], np.float16), np.float16)],
)  # fmt: skip
def test_msgpack_predict_takes_any_numeric_array(
    array: np.ndarray[Any, Any], arrives_as: type
) -> None:
    backend = _Recorder()
    with own_server(backend) as api, InferenceClient.connect(api.url, use_msgpack=True) as client:
        client.predict(array)
    (seen,) = backend.seen
    assert seen.dtype == np.dtype(arrives_as)
    assert seen.tolist() == array.tolist()


def test_a_msgpack_tensor_arrives_as_numpys_own_dtype() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = {"input": {"dtype": "float32", "shape": [2, 3], "data": x.tobytes()}}
    got = api_codec.predict_input(body)
    assert got.dtype is np.dtype(np.float32)  # what the predict path's `is` check needs
    assert (got == x).all()


@pytest.mark.parametrize("address", ["unix:", "localhost:0", "127.0.0.1:0"])
def test_a_client_address_that_cannot_be_reached_is_refused_at_once(address: str) -> None:
    with pytest.raises(ClientError, match="give HOST:PORT or unix:PATH"):
        InferenceClient.connect(address)


def test_the_openapi_document_lists_exactly_the_served_routes() -> None:
    from agent.http_api import ROUTES

    documented = {path: sorted(ops) for path, ops in OPENAPI["paths"].items()}
    served = {path: sorted(m.lower() for m in methods.split(", "))
              for path, methods in ROUTES.items()}  # fmt: skip
    assert documented == served
    for ops in OPENAPI["paths"].values():
        for op in ops.values():
            assert "default" in op["responses"]


def test_check_local_request_reads_hosts_and_origins() -> None:
    def head(*pairs: tuple[str, str]) -> http_wire.RequestHead:
        return http_wire.RequestHead("GET", "/healthz", (1, 1), dict(pairs), None)

    http_wire.check_local_request(head())
    http_wire.check_local_request(head(("host", "[::1]")))
    http_wire.check_local_request(head(("host", "10.0.0.7:1")))  # an IP is never rebound
    cross_site = head(("host", "localhost"), ("origin", "http://localhost:1"))
    for bad in (head(("host", "localhost.attacker.example")), head(("host", "[::1")),
                head(("host", "x")), cross_site):  # fmt: skip
        with pytest.raises(http_wire.HttpWireError) as refused:
            http_wire.check_local_request(bad)
        assert refused.value.status == 403
