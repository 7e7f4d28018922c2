"""The local inference API over HTTP/1.1 (keep-alive), on loopback TCP or a Unix socket.

A thread per connection (`socketserver`), the message heads read and written by
`agent.http_wire`: leaner than `http.server` and `http.client`, whose header handling
(through the `email` package) cost more per request than the model run at batch 1
(docs/benchmarks.md). Endpoints (OpenAPI document: `agent.openapi`, served at
``/openapi.json``): ``POST /v1/predict``, ``GET /v1/model``, ``POST /v1/feedback``,
``POST /v1/rollback``, ``GET /healthz``, ``GET /metrics``. Bodies are JSON or msgpack,
chosen by Content-Type; an answer uses the request's format. Errors are
``{"error": message}`` with 400 (bad input), 404, 405, 411, 413, 415, 431, 501, 503 (no
model loaded, nothing to roll back to) or 500 (logged with its traceback).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, Protocol

from agent import api_codec, http_wire
from agent.api_codec import JSON, BadRequestError
from agent.config import ListenAddress
from agent.errors import AgentError, InferenceError, InputError
from agent.feedback import FeedbackError
from agent.http_wire import HttpWireError, RequestHead
from agent.openapi import OPENAPI
from agent.predictions import ModelUnavailableError, Predictions

log = logging.getLogger(__name__)
#: Seconds a kept-alive connection may sit idle (or a request take to arrive) before closing.
IDLE_TIMEOUT_S = 120.0
_OPENAPI_BYTES = json.dumps(OPENAPI, indent=1).encode()


class Backend(Protocol):
    """What the HTTP API serves (the inference service implements it)."""

    def predict(self, x: object) -> Predictions:
        """Predict one sample or a batch."""

    def count_invalid(self) -> None:
        """Count a predict request refused before it reached the runtime."""

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


class _Connection(socketserver.StreamRequestHandler):
    """One client connection: requests answered in order until either side closes it."""

    backend: Backend  # set on the subclass made per server
    timeout = IDLE_TIMEOUT_S  # (applied by StreamRequestHandler.setup)

    def handle(self) -> None:
        while self._answer_one():
            pass

    def _send(self, status: int, body: bytes, kind: str, close: bool = False) -> None:
        self.connection.sendall(http_wire.format_response(status, body, kind, close))

    def _answer_one(self) -> bool:
        """Read one request and answer it; False when the connection is to be closed."""
        try:
            lines = http_wire.read_head(self.rfile.readline)
            if lines is None:
                return False
            head = http_wire.parse_request_head(lines)
            body = self._body(head)
        except (HttpWireError, BadRequestError) as exc:
            with contextlib.suppress(OSError):
                self._send(exc.status, _error(exc), JSON, close=True)
            return False
        except OSError:  # reset, timed out while idle, or closed mid-body
            return False
        status, payload, kind = self._dispatch(head, body)
        keep = head.keep_alive
        try:
            self._send(status, payload, kind, close=not keep)
        except OSError:  # the client went away before its answer
            return False
        if log.isEnabledFor(logging.DEBUG):
            log.debug('inference api: "%s %s" %d %d', head.method, head.target, status,
                      len(payload))  # fmt: skip
        return keep

    def _body(self, head: RequestHead) -> bytes:
        length = head.content_length
        if length is None:
            if head.method == "POST":
                raise BadRequestError("a body with Content-Length is required", 411)
            return b""
        if length > api_codec.MAX_BODY_BYTES:
            raise BadRequestError(f"body over {api_codec.MAX_BODY_BYTES} bytes", 413)
        if head.expects_continue and length:
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body: bytes = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionAbortedError("the client closed the connection mid-body")
        return body

    def _dispatch(self, head: RequestHead, body: bytes) -> tuple[int, bytes, str]:
        """(status, body, content type) of the answer; unexpected errors become 500."""
        try:
            if head.method == "GET":
                return self._get(head.path)
            if head.method == "POST":
                return self._post(head, body)
            return 405, _error(f"method {head.method} not allowed: use GET or POST"), JSON
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
        if path == "/openapi.json":
            return 200, _OPENAPI_BYTES, JSON
        return 404, _error(f"no endpoint GET {path}"), JSON

    def _post(self, head: RequestHead, body: bytes) -> tuple[int, bytes, str]:
        path = head.path
        kind = JSON
        try:
            kind = api_codec.media_type(head.headers.get("content-type"))
            if path == "/v1/predict":
                x = api_codec.predict_input(api_codec.decode_body(body, kind))
                answer = self.backend.predict(x).as_json()
            elif path == "/v1/feedback":
                fields = api_codec.feedback_fields(api_codec.decode_body(body, kind))
                answer = self.backend.feedback(*fields)
            elif path == "/v1/rollback":
                answer = self.backend.rollback()
            else:
                raise BadRequestError(f"no endpoint POST {path}", 404)
        except (BadRequestError, InputError, FeedbackError, ModelUnavailableError,
                InferenceError) as exc:  # fmt: skip
            if path == "/v1/predict" and isinstance(exc, BadRequestError) and exc.status != 404:
                self.backend.count_invalid()  # the runtime counts the ones it refuses itself
            return _status_of(exc), api_codec.encode_body({"error": str(exc)}, kind), kind
        return 200, api_codec.encode_body(answer, kind), kind


def _error(what: str | Exception) -> bytes:
    return api_codec.encode_body({"error": str(what)}, JSON)


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (accepted inherit)
        super().server_bind()


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False


class ApiServer:
    """The HTTP API on one address, served by a background thread until `stop`."""

    def __init__(
        self, backend: Backend, address: ListenAddress, idle_timeout_s: float = IDLE_TIMEOUT_S
    ) -> None:
        attributes = {"backend": backend, "timeout": idle_timeout_s}
        handler = type("Connection", (_Connection,), attributes)
        self.address = address
        self._server: socketserver.BaseServer
        if address.path is not None:
            path = Path(address.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()  # a stale socket of an earlier process
            self._server = _UnixServer(str(path), handler)
            os.chmod(path, 0o660)
        else:
            server = _Tcp6Server if ":" in address.host else _TcpServer
            self._server = server((address.host, address.port), handler)
            host, port = self._server.server_address[:2]
            self.address = ListenAddress(host=str(host), port=int(port))
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
        """Stop serving and remove the socket file."""
        self._server.shutdown()
        self._server.server_close()
        if self.address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.path)
