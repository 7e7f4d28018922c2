"""The local inference API over HTTP/1.1 (keep-alive), on loopback TCP or a Unix socket.

Standard library only (`http.server` with a thread per connection), so the daemon stays
small. Endpoints (OpenAPI document: `agent.openapi`, served at ``/openapi.json``):
``POST /v1/predict``, ``GET /v1/model``, ``POST /v1/feedback``, ``POST /v1/rollback``,
``GET /healthz``, ``GET /metrics``. Bodies are JSON or msgpack, chosen by Content-Type;
an answer uses the request's format. Errors are ``{"error": message}`` with 400 (bad
input), 404, 413, 415, 503 (no model loaded, nothing to roll back to) or 500.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Protocol

from agent import api_codec
from agent.api_codec import JSON, BadRequestError
from agent.config import ListenAddress
from agent.errors import AgentError, InferenceError, InputError
from agent.feedback import FeedbackError
from agent.openapi import OPENAPI
from agent.predictions import ModelUnavailableError, Predictions

log = logging.getLogger(__name__)
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fedge-agent"
    backend: Backend  # set on the subclass made per server

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("inference api: " + format, *args)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        head = (
            f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        )
        if self.close_connection:
            head += "Connection: close\r\n"
        self.wfile.write(head.encode() + b"\r\n" + body)  # one write: no Nagle stall
        self.log_request(status, len(body))

    def _answer(self, status: int, value: Mapping[str, Any], kind: str = JSON) -> None:
        self._reply(status, api_codec.encode_body(value, kind), kind)

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise BadRequestError("a body with Content-Length is required", 411)
        if int(length) > api_codec.MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequestError(f"body over {api_codec.MAX_BODY_BYTES} bytes", 413)
        return self.rfile.read(int(length))

    def do_GET(self) -> None:
        """Answer the read-only endpoints."""
        path = self.path.split("?")[0]
        b = self.backend
        if path == "/healthz":
            ready, details = b.health()
            self._answer(200 if ready else 503, details)
        elif path == "/metrics":
            text = b.metrics_text().encode()
            self._reply(200, text, "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/model":
            self._answer(200, b.describe())
        elif path == "/openapi.json":
            self._reply(200, _OPENAPI_BYTES, JSON)
        else:
            self._answer(404, {"error": f"no endpoint GET {path}"})

    def do_POST(self) -> None:
        """Answer predict, feedback and rollback."""
        path = self.path.split("?")[0]
        kind = JSON
        try:
            body = self._body()
            kind = api_codec.media_type(self.headers.get("Content-Type"))
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
            self._answer(_status_of(exc), {"error": str(exc)}, kind)
            return
        self._answer(200, answer, kind)


class _TcpServer(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    block_on_close = False

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False


class ApiServer:
    """The HTTP API on one address, served by a background thread until `stop`."""

    def __init__(self, backend: Backend, address: ListenAddress) -> None:
        handler = type("Handler", (_Handler,), {"backend": backend})
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
            self._server = _TcpServer((address.host, address.port), handler)
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
