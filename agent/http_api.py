"""The local inference API over HTTP/1.1 (keep-alive), on loopback TCP or a Unix socket.

A thread per connection (`socketserver`), the message heads read and written by
`agent.http_wire`: leaner than `http.server` and `http.client`, whose header handling
(through the `email` package) cost more per request than the model run at batch 1
(docs/benchmarks.md). Endpoints (OpenAPI document: `agent.openapi`, served at
``/openapi.json``): ``POST /v1/predict``, ``GET /v1/model``, ``POST /v1/feedback``,
``POST /v1/rollback``, ``GET /healthz``, ``GET /metrics``. Bodies are JSON or msgpack,
chosen by Content-Type; an answer uses the request's format. Errors are
``{"error": message}`` with 400 (bad input), 403 (on TCP: a request from a web page, or
a Host that is not a local name), 404, 405, 408, 413, 414, 415, 431, 501, 503 (no model
loaded, nothing to roll back to, or too many connections), 505 or 500 (logged with its
traceback).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, Protocol

from agent import api_codec, http_wire
from agent.api_codec import JSON, BadRequestError, InputLimits
from agent.config import ListenAddress
from agent.errors import AgentError, InferenceError, InputError
from agent.feedback import FeedbackError
from agent.http_conn import CappedThreadingServer, RequestReader, linger_close
from agent.http_wire import HttpWireError, RequestHead
from agent.openapi import OPENAPI
from agent.predictions import ModelUnavailableError, Predictions

log = logging.getLogger(__name__)
#: Seconds a kept-alive connection may wait for its next request before it is closed.
IDLE_TIMEOUT_S = 120.0
#: Seconds from a request's first byte to its last (408 and closed after that).
REQUEST_TIMEOUT_S = 30.0
#: Connections served at once; one more is answered 503 and closed.
MAX_CONNECTIONS = 64
#: Connections the kernel queues before they are accepted (socketserver's default is 5).
LISTEN_BACKLOG = 128
_LINGER_S = 2.0  # how long an error answer waits for the client to stop sending
_GET, _POST = "GET, HEAD", "POST"
#: Each endpoint's methods (its Allow header): another method is 405, another path 404.
ROUTES = {"/healthz": _GET, "/metrics": _GET, "/v1/model": _GET, "/openapi.json": _GET,
          "/v1/predict": _POST, "/v1/feedback": _POST, "/v1/rollback": _POST}  # fmt: skip
_METHODS = {path: frozenset(allow.split(", ")) for path, allow in ROUTES.items()}
_OPENAPI_BYTES = json.dumps(OPENAPI, indent=1).encode()


class Backend(Protocol):
    """What the HTTP API serves (the inference service implements it)."""

    def predict(self, x: object) -> Predictions:
        """Predict one sample or a batch."""

    def count_invalid(self) -> None:
        """Count a predict request refused before it reached the runtime."""

    def input_limits(self) -> InputLimits:
        """What a predict body for the serving model holds at most; ModelUnavailableError."""

    def describe(self) -> dict[str, Any]:
        """The current model, its version and the previous one."""

    def feedback(self, prediction_id: str, label: str | int) -> dict[str, Any]:
        """Attach a label to an earlier prediction."""

    def rollback(self) -> dict[str, Any]:
        """Serve the previous version again."""

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details)."""

    def metrics_text(self) -> str:
        """Prometheus text."""


def _status_of(exc: AgentError) -> int:
    if isinstance(exc, BadRequestError):
        return exc.status
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, FeedbackError):
        return 404 if exc.reason == "unknown_id" else 400
    if isinstance(exc, ModelUnavailableError):
        return 503
    return 500


class _Connection(socketserver.BaseRequestHandler):
    """One client connection: requests answered in order until either side closes it."""

    backend: Backend  # these four are set on the subclass made per server
    idle_timeout_s: float
    request_timeout_s: float
    refuse_web_pages: bool  # (on TCP, which a browser can reach)

    def handle(self) -> None:
        """Answer this connection's requests until it closes, times out or breaks the rules."""
        sock: socket.socket = self.request
        reader = RequestReader(sock, self.idle_timeout_s, self.request_timeout_s)
        try:
            while self._answer_one(sock, reader):
                pass
        except HttpWireError as exc:  # answered with its status; the rest is not read
            with contextlib.suppress(OSError):
                sock.settimeout(_LINGER_S)
                sock.sendall(http_wire.format_response(exc.status, _error(exc), JSON, True))
                linger_close(sock, _LINGER_S, 2 * api_codec.MAX_BODY_BYTES)
        except OSError:  # reset, idle too long, gone before its answer
            pass

    def _answer_one(self, sock: socket.socket, reader: RequestReader) -> bool:
        """Read one request and answer it; False when the connection is to be closed."""
        if not reader.wait():
            return False
        lines = http_wire.read_head(reader.readline)
        if lines is None:
            return False
        head = http_wire.parse_request_head(lines)
        if self.refuse_web_pages:
            http_wire.check_local_request(head)
        body = self._body(head, sock, reader)
        method = head.method
        status, payload, kind = self._dispatch(head, body)
        keep = head.keep_alive
        extra = (("Allow", ROUTES[head.path]),) if status == 405 else ()
        if keep and head.version < (1, 1):
            extra = (*extra, ("Connection", "keep-alive"))
        answer = http_wire.format_response(status, payload, kind, not keep, extra)
        sock.settimeout(self.request_timeout_s)  # (not what the last read left of its own)
        sock.sendall(answer[: len(answer) - len(payload)] if method == "HEAD" else answer)
        if log.isEnabledFor(logging.DEBUG):
            log.debug('inference api: "%s %s" %d %d', method, head.target, status, len(payload))
        return keep

    def _body_limit(self, head: RequestHead, length: int) -> int:
        """The most bytes the body of `head`, `length` bytes and over `MAX_FEEDBACK_BYTES`,
        may have: a feedback body is smaller, and a large predict body is refused at once
        (413, counted invalid) if it is larger than the serving model's largest batch can
        need (503 if no model is loaded)."""
        if head.method != "POST":
            return api_codec.MAX_BODY_BYTES
        if head.path == "/v1/feedback":
            return api_codec.MAX_FEEDBACK_BYTES
        if head.path != "/v1/predict" or length <= api_codec.SMALL_BODY_BYTES:
            return api_codec.MAX_BODY_BYTES
        try:
            kind = api_codec.media_type(head.headers.get("content-type"))
        except BadRequestError:  # answered (415) once the body is read
            return api_codec.MAX_BODY_BYTES
        try:
            limits = self.backend.input_limits()
        except ModelUnavailableError as exc:
            raise HttpWireError(str(exc), 503) from None
        refusal = api_codec.too_large(length, limits, kind)
        if refusal is not None:
            self.backend.count_invalid()
            raise HttpWireError(str(refusal), 413)
        return api_codec.MAX_BODY_BYTES

    def _body(
        self, head: RequestHead, sock: socket.socket, reader: RequestReader
    ) -> bytes | bytearray:
        length = head.content_length
        if length is None:  # no body (RFC 9112 6.3: a request without a length has none)
            return b""
        if length > api_codec.MAX_FEEDBACK_BYTES:  # (a small body needs no more checks)
            limit = self._body_limit(head, length)
            if length > limit:
                raise HttpWireError(f"body over {limit} bytes", 413)
        if head.expects_continue and length:
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = reader.read(length)
        if len(body) < length:
            raise ConnectionAbortedError("the client closed the connection mid-body")
        return body

    def _dispatch(self, head: RequestHead, body: bytes | bytearray) -> tuple[int, bytes, str]:
        """(status, body, content type) of the answer; unexpected errors become 500."""
        try:
            methods = _METHODS.get(head.path)
            if methods is None:
                return 404, _error(f"no endpoint {head.path}: see /openapi.json"), JSON
            if head.method not in methods:
                allowed = ROUTES[head.path]
                return 405, _error(f"{head.path} takes {allowed}, not {head.method}"), JSON
            if head.method == "POST":
                return self._post(head, body)
            return self._get(head.path)
        except Exception as exc:
            log.exception("inference api: %s %s failed", head.method, head.target)
            return 500, _error(f"internal error ({type(exc).__name__}); see the agent's log"), JSON

    def _get(self, path: str) -> tuple[int, bytes, str]:
        b = self.backend
        if path == "/healthz":
            ready, details = b.health()
            return (200 if ready else 503), api_codec.encode_body(details, JSON), JSON
        if path == "/metrics":
            return 200, b.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/v1/model":
            return 200, api_codec.encode_body(b.describe(), JSON), JSON
        return 200, _OPENAPI_BYTES, JSON  # (/openapi.json: the last GET route)

    def _post(self, head: RequestHead, body: bytes | bytearray) -> tuple[int, bytes, str]:
        path = head.path
        kind = JSON
        try:
            if path == "/v1/rollback":  # (a body, if any, is not read: any content type)
                with contextlib.suppress(BadRequestError):
                    kind = api_codec.media_type(head.headers.get("content-type"))
                return 200, api_codec.encode_body(self.backend.rollback(), kind), kind
            kind = api_codec.media_type(head.headers.get("content-type"))
            if path == "/v1/predict":
                # (a small body is decoded as it is: a few MB of objects at worst)
                limits = (
                    self.backend.input_limits() if len(body) > api_codec.SMALL_BODY_BYTES else None
                )
                x = api_codec.predict_input(api_codec.decode_body(body, kind, limits))
                answer = self.backend.predict(x).as_json()
            else:  # /v1/feedback
                fields = api_codec.feedback_fields(api_codec.decode_body(body, kind))
                answer = self.backend.feedback(*fields)
        except (BadRequestError, InputError, FeedbackError, ModelUnavailableError,
                InferenceError) as exc:  # fmt: skip
            if path == "/v1/predict" and isinstance(exc, BadRequestError):
                self.backend.count_invalid()  # the runtime counts the ones it refuses itself
            return _status_of(exc), api_codec.encode_body({"error": str(exc)}, kind), kind
        return 200, api_codec.encode_body(answer, kind), kind


def _error(what: str | Exception) -> bytes:
    return api_codec.encode_body({"error": str(what)}, JSON)


class _TcpServer(CappedThreadingServer, socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (accepted inherit)
        super().server_bind()


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(CappedThreadingServer, socketserver.UnixStreamServer):
    request_queue_size = LISTEN_BACKLOG


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket file at `path`; OSError (EADDRINUSE) if a server answers there."""
    if not path.is_socket():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:  # refused, or gone: left by a process that ended
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        raise OSError(
            errno.EADDRINUSE, f"another process serves {path}: stop it or listen elsewhere"
        )
    finally:
        probe.close()


class ApiServer:
    """The HTTP API on one address, served by a background thread until `stop`."""

    def __init__(
        self,
        backend: Backend,
        address: ListenAddress,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        attributes = {"backend": backend, "idle_timeout_s": idle_timeout_s,
                      "request_timeout_s": request_timeout_s,
                      "refuse_web_pages": address.path is None}  # fmt: skip
        handler = type("Connection", (_Connection,), attributes)
        self.address = address
        self._server: _TcpServer | _UnixServer
        self._socket_file: tuple[int, int] | None = None  # (device, inode) of ours
        if address.path is not None:
            path = Path(address.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            _claim_socket_path(path)
            self._server = _UnixServer(str(path), handler)
            os.chmod(path, 0o660)
            st = os.stat(path)
            self._socket_file = (st.st_dev, st.st_ino)
        else:
            server = _Tcp6Server if ":" in address.host else _TcpServer
            self._server = server((address.host, address.port), handler)
            host, port = self._server.server_address[:2]
            self.address = ListenAddress(host=str(host), port=int(port))
        self._server.limit(max_connections)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
            name="inference-api", daemon=True,
        )  # fmt: skip

    @property
    def url(self) -> str:
        """What `agent.client.InferenceClient` takes: ``unix:PATH`` or ``HOST:PORT``."""
        return str(self.address)

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()
        log.info("inference API listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving, end the open connections and remove the socket file (if still ours)."""
        self._server.shutdown()
        self._server.server_close()
        self._server.end_connections()
        if self.address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(self.address.path)
                if (st.st_dev, st.st_ino) == self._socket_file:
                    os.unlink(self.address.path)
