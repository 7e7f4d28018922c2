"""The socket side of the local API's HTTP: bounded reads and a bounded number of connections.

`RequestReader` buffers a connection's bytes. It waits at most the idle timeout for a
request to start, then gives the whole request (head and body) a deadline, so a client
that sends a byte at a time cannot hold a thread for long. `CappedThreadingServer` serves
each connection on a thread of its own, at most `max_connections` at once; one more is
answered 503 at once and closed. `linger_close` lets a client read an error answer that
came before it finished sending.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from typing import Any

from agent import http_wire

_CHUNK = 65536


class RequestReader:
    """Reads from one socket: `wait` for a request, then lines and bodies by its deadline."""

    __slots__ = ("_buf", "_deadline", "_idle_s", "_request_s", "_sock")

    def __init__(self, sock: socket.socket, idle_s: float, request_s: float) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._idle_s = idle_s
        self._request_s = request_s
        self._deadline = 0.0

    def wait(self) -> bool:
        """True once a request's first bytes are here (its deadline starts); False if closed."""
        if not self._buf:
            self._sock.settimeout(self._idle_s)
            chunk = self._sock.recv(_CHUNK)  # TimeoutError once idle too long
            if not chunk:
                return False
            self._buf += chunk
        self._deadline = time.monotonic() + self._request_s
        return True

    def _more(self) -> bytes:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise http_wire.HttpWireError(f"request not complete within {self._request_s:g} s", 408)
        self._sock.settimeout(left)
        try:
            return self._sock.recv(_CHUNK)
        except TimeoutError:
            raise http_wire.HttpWireError(
                f"request not complete within {self._request_s:g} s", 408
            ) from None

    def readline(self, limit: int) -> bytes:
        """One line, ending with its newline; shorter if `limit` or the end came first."""
        buf = self._buf
        searched = 0
        while True:
            at = buf.find(b"\n", searched, limit)
            if at >= 0:
                n = at + 1
                break
            if len(buf) >= limit:
                n = limit
                break
            searched = len(buf)
            chunk = self._more()
            if not chunk:
                n = len(buf)
                break
            buf += chunk
        line = bytes(buf[:n])
        del buf[:n]
        return line

    def read(self, n: int) -> bytes:
        """`n` bytes, or fewer if the client closed the connection first."""
        buf = self._buf
        while len(buf) < n:
            chunk = self._more()
            if not chunk:
                break
            buf += chunk
        with memoryview(buf) as view:
            data = bytes(view[:n])
        del buf[:n]
        return data


def linger_close(sock: socket.socket, seconds: float, max_bytes: int) -> None:
    """Stop sending, then read and drop what the client still sends (bounded) before closing.

    Closing with unread bytes makes the kernel reset the connection, and a client still
    sending would lose the answer already written.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        drained = 0
        while drained < max_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            chunk = sock.recv(_CHUNK)
            if not chunk:
                break
            drained += len(chunk)


class CappedThreadingServer(socketserver.ThreadingMixIn):
    """A thread per connection, at most `max_connections` at once (mixed into a server)."""

    daemon_threads = True
    block_on_close = False
    max_connections = 64
    busy_answer = http_wire.format_response(
        503, b'{"error":"too many connections to the inference API"}', "application/json",
        close=True,
    )  # fmt: skip
    _slots = threading.BoundedSemaphore(max_connections)

    def limit(self, max_connections: int) -> None:
        """Serve at most `max_connections` at once (call before serving)."""
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve `request` on a new thread, or answer 503 if all connections are taken."""
        slots = self._slots
        if not slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(self.busy_answer)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
