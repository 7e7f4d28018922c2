"""`InferenceClient` over HTTP on real sockets: reconnection, replay rules, closing, errors."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
import pytest

from agent.client import ClientError, InferenceClient
from agent.config import ListenAddress
from agent.http_api import ApiServer
from tests.agent_inference.api_stub import (
    StubBackend,
    backend,
    connect_raw,
    own_server,
    server,
)

__all__ = ["backend", "server"]  # (the fixtures, from api_stub)


def test_an_idle_connection_is_closed_and_the_client_reconnects(backend: StubBackend) -> None:
    with own_server(backend, idle_timeout_s=0.2) as server:
        with connect_raw(server) as sock:
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


def test_threads_that_end_give_their_connections_back(backend: StubBackend) -> None:
    with own_server(backend, max_connections=4) as server:
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


def test_an_ipv6_loopback_api_is_reached_with_a_bracketed_host(backend: StubBackend) -> None:
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
