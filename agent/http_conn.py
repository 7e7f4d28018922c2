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
_STRAY_LINE_ENDS = 4  # bytes of CR/LF dropped between requests (more: a malformed request)


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
        """True once a request's first bytes are here (its deadline starts); False if closed.

        A line end or two left after the previous body (some clients send CRLF after it)
        is dropped, not taken for the start of a request.
        """
        buf = self._buf
        dropped = 0
        while True:
            while buf and buf[0] in b"\r\n" and dropped < _STRAY_LINE_ENDS:
                del buf[0]
                dropped += 1
            if buf:
                break
            self._sock.settimeout(self._idle_s)
            chunk = self._sock.recv(_CHUNK)  # TimeoutError once idle too long
            if not chunk:
                return False
            buf += chunk
        self._deadline = time.monotonic() + self._request_s
        return True

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._late()
        return left

    def _late(self) -> http_wire.HttpWireError:
        return http_wire.HttpWireError(f"request not complete within {self._request_s:g} s", 408)

    def _more(self) -> bytes:
        self._sock.settimeout(self._left())
        try:
            return self._sock.recv(_CHUNK)
        except TimeoutError:
            raise self._late() from None

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

    def read(self, n: int) -> bytes | bytearray:
        """`n` bytes, or fewer if the client closed the connection first.

        A large body is received in place (one copy, not two) into a buffer that grows as
        its bytes arrive, at most doubling: memory follows what was received, not what a
        Content-Length announced.
        """
        buf = self._buf
        if len(buf) >= n:
            with memoryview(buf) as view:
                data = bytes(view[:n])
            del buf[:n]
            return data
        body, self._buf = buf, bytearray()  # all of it is this body's
        have = len(body)
        while have < n:
            if have == len(body):
                body += bytes(min(n, max(2 * have, _CHUNK)) - have)
            with memoryview(body) as view:
                got = self._more_into(view[have:])
            if not got:
                break
            have += got
        del body[have:]
        return body

    def _more_into(self, view: memoryview) -> int:
        self._sock.settimeout(self._left())
        try:
            return self._sock.recv_into(view)
        except TimeoutError:
            raise self._late() from None


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
    busy_answer = http_wire.format_response(
        503, b'{"error":"too many connections to the inference API; retry shortly"}',
        "application/json", close=True, extra=(("Retry-After", "1"),),
    )  # fmt: skip
    _slots: threading.BoundedSemaphore
    _open: set[socket.socket]
    _open_lock: threading.Lock

    def limit(self, max_connections: int) -> None:
        """Serve at most `max_connections` at once; call once, before serving."""
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve `request` on a new thread, or answer 503 if all connections are taken."""
        slots = self._slots
        if not slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(self.busy_answer)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(request)
        self._slots.release()

    def end_connections(self) -> None:
        """Shut down every open connection (their threads then finish)."""
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
