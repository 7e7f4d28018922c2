"""`InferenceClient`: the Python client of the agent's local inference API.

In-process (``InferenceClient.in_process(service)``: a direct call, no serialisation) or
over HTTP (``InferenceClient.connect("127.0.0.1:8790")`` or ``connect("unix:/run/...")``:
one keep-alive connection per thread, JSON or msgpack bodies). Both answer with the same
types and raise the same errors: `InputError` (400), `FeedbackError` (404 unknown id, 400
bad label), `ModelUnavailableError` (503), and `ClientError` for anything else (the
agent cannot be reached, another status).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent import api_codec, http_wire
from agent.api_codec import JSON, MSGPACK
from agent.config import ListenAddress, parse_listen
from agent.errors import AgentError, InputError
from agent.feedback import FeedbackError
from agent.http_api import Backend
from agent.predictions import ModelUnavailableError, Predictions


class ClientError(AgentError):
    """The API could not be reached, or answered with an unexpected status."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _Connection:
    """One persistent HTTP/1.1 connection to the API (one per client thread)."""

    def __init__(self, target: ListenAddress, timeout: float) -> None:
        if target.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:  # a blocking connect waits (up to the send timeout) while the agent's
                # backlog is full, where a non-blocking one fails at once with EAGAIN
                seconds = int(timeout)
                usec = int((timeout - seconds) * 1e6)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                    struct.pack("@ll", seconds, usec))  # fmt: skip
                except OSError:  # (a C library whose struct timeval is laid out otherwise)
                    sock.settimeout(timeout)
                sock.connect(target.path)
                sock.settimeout(timeout)
            except OSError:
                sock.close()
                raise
            self.host = "localhost"
        else:
            sock = socket.create_connection((target.host, target.port), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.host = str(target)  # HOST:PORT, an IPv6 host in brackets
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self.used = False
        self.closed = False
        self.reusable = True
        # closed with the socket when the owning thread's reference goes (the thread ended)
        weakref.finalize(self, _close_quietly, self.rfile, sock)

    def stale(self) -> bool:
        """Whether this idle connection has something to read: the agent closed it."""
        try:
            return bool(self._poll.poll(0))
        except (OSError, ValueError):
            return True

    def exchange(self, request: bytes) -> tuple[http_wire.ResponseHead, bytes]:
        """Send one request and read its answer; OSError or HttpWireError if that fails."""
        self.used = True
        try:
            self.sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.reusable = False
            try:  # the agent may have answered (413, say) before it stopped reading
                return self._answer()
            except (OSError, http_wire.HttpWireError):
                raise exc from None
        return self._answer()

    def _answer(self) -> tuple[http_wire.ResponseHead, bytes]:
        while True:
            lines = http_wire.read_head(self.rfile.readline)
            if lines is None:
                raise ConnectionResetError("the agent closed the connection without answering")
            head = http_wire.parse_response_head(lines)
            if head.status >= 200:
                break  # (an interim 1xx answer is skipped)
        if head.content_length is None:
            body: bytes = self.rfile.read()  # framed by the end of the connection
        else:
            body = self.rfile.read(head.content_length)
            if len(body) < head.content_length:
                raise ConnectionResetError("the agent closed the connection mid-answer")
        return head, body

    def close(self) -> None:
        """Close the socket (from the thread that uses it)."""
        self.closed = True
        _close_quietly(self.rfile, self.sock)

    def shut(self) -> None:
        """End the connection from another thread: its owner closes it on its next call."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def _close_quietly(rfile: Any, sock: socket.socket) -> None:
    with contextlib.suppress(OSError, ValueError):
        rfile.close()
    sock.close()


def _kind_of(content_type: str | None) -> str:
    header = content_type or JSON
    return MSGPACK if header.split(";")[0].strip() in api_codec.MSGPACK_TYPES else JSON


def _from_json(value: Mapping[str, Any]) -> Predictions:
    rows = value.get("predictions", [value])
    single = "predictions" not in value
    classes = [int(r["class_index"]) for r in rows]
    names = [str(i) for i in range(max(classes) + 1)]
    for r, c in zip(rows, classes, strict=True):
        names[c] = str(r["prediction"])
    first = str(rows[0]["prediction_id"])
    pid = first if single else first.rpartition(".")[0]
    return Predictions(pid, str(value["model"]), str(value["version"]), classes,
                       [float(r["confidence"]) for r in rows], tuple(names), single)  # fmt: skip


class InferenceClient:
    """Predictions, model information, feedback and rollback from the local agent."""

    def __init__(
        self,
        backend: Backend | None = None,
        address: str | None = None,
        timeout: float = 10.0,
        use_msgpack: bool = False,
    ) -> None:
        if (backend is None) == (address is None):
            raise ClientError("give exactly one of backend (in-process) or address (HTTP)")
        self._target = ListenAddress()
        if address is not None:  # parsed once, as the agent parses `inference_listen`
            try:
                if not address or address == "unix:":
                    raise ValueError("empty")
                self._target = (
                    ListenAddress(path=address[len("unix:") :])  # (any path a client can reach)
                    if address.startswith("unix:")
                    else parse_listen(address, "")
                )
                if self._target.path is None and not self._target.port:
                    raise ValueError("port 0 is for an agent to pick a port, not to connect to")
            except ValueError as exc:
                raise ClientError(
                    f"address {address!r}: give HOST:PORT or unix:PATH ({exc})"
                ) from None
        self._backend = backend
        self.address = address
        self.timeout = timeout
        self.kind = MSGPACK if use_msgpack else JSON
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()  # every live thread's

    @classmethod
    def in_process(cls, backend: Backend) -> InferenceClient:
        """A client that calls the service in this process directly."""
        return cls(backend=backend)

    @classmethod
    def connect(
        cls, address: str, timeout: float = 10.0, use_msgpack: bool = False
    ) -> InferenceClient:
        """A client of the HTTP API at ``HOST:PORT`` or ``unix:PATH``."""
        return cls(address=address, timeout=timeout, use_msgpack=use_msgpack)

    # --- HTTP plumbing ----------------------------------------------------------------------
    def _connection(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or (conn.used and conn.stale())):
            self._drop(conn)  # (closed by `close`, or by the agent while idle)
            conn = None
        if conn is None:
            conn = _Connection(self._target, self.timeout)
            self._local.conn = conn
            with self._lock:
                self._open.add(conn)
        return conn

    def _drop(self, conn: _Connection) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._open.discard(conn)
        conn.close()

    def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[bytes, str]:
        data = api_codec.encode_body(body, self.kind) if body is not None else None
        if data is not None and len(data) > api_codec.MAX_BODY_BYTES:
            raise ClientError(
                f"{method} {path}: a body of {len(data)} bytes is over the API's limit of "
                f"{api_codec.MAX_BODY_BYTES}; send smaller batches", 413,
            )  # fmt: skip
        for attempt in (0, 1):
            conn, reused = None, False
            try:
                conn = self._connection()
                reused = conn.used
                request = http_wire.format_request(method, path, conn.host, data, self.kind)
                head, payload = conn.exchange(request)
                if head.closes or head.content_length is None or not conn.reusable:
                    self._drop(conn)
                break
            except (OSError, ValueError, http_wire.HttpWireError) as exc:  # (ValueError: the
                # connection was closed under this thread by `close` in another)
                if conn is not None:
                    self._drop(conn)
                # Sent again only if nothing can have happened twice: a GET, on a kept-alive
                # connection that closed (a POST might have been applied before the close).
                again = reused and method == "GET" and isinstance(exc, ConnectionError)
                if attempt or not again:
                    raise ClientError(f"inference API at {self.address}: {exc}") from exc
        status = head.status
        kind = _kind_of(head.headers.get("content-type"))
        if status == 200:
            return payload, kind
        try:
            message = str(api_codec.decode_body(payload, kind)["error"])
        except (api_codec.BadRequestError, KeyError):
            message = payload[:200].decode(errors="replace")
        if status == 400 and path == "/v1/predict":
            raise InputError(message)
        if status in (400, 404) and path == "/v1/feedback":
            raise FeedbackError(message, "unknown_id" if status == 404 else "invalid")
        if status == 503 and "retry-after" not in head.headers:  # (with it: the agent is busy)
            raise ModelUnavailableError(message)
        raise ClientError(f"{method} {path}: {status} {message}", status)

    def _map(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return dict(api_codec.decode_body(*self._call(method, path, body)))

    # --- the API ----------------------------------------------------------------------------
    def predict(self, x: Any) -> Predictions:
        """Predict one sample or a batch (array-like); InputError if it does not fit."""
        if self._backend is not None:
            return self._backend.predict(x)
        value: Any
        if isinstance(x, np.ndarray) and x.dtype.kind == "b":
            x = x.view(np.uint8)  # (the API takes numbers: True and False go as 1 and 0)
        if (
            isinstance(x, np.ndarray)
            and self.kind == MSGPACK
            and x.dtype.name in api_codec.TENSOR_DTYPES
        ):
            little = x.dtype.newbyteorder("<")  # (the tensor's bytes are little-endian)
            arr = np.ascontiguousarray(x, little if x.dtype != little else None)
            value = {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}
        else:  # (other element types go as numbers, as in JSON)
            arr = np.asarray(x)
            value = (arr.view(np.uint8) if arr.dtype.kind == "b" else arr).tolist()
        return _from_json(self._map("POST", "/v1/predict", {"input": value}))

    def model(self) -> dict[str, Any]:
        """The serving model and version, the previous version, recent version states."""
        if self._backend is not None:
            return self._backend.describe()
        return self._map("GET", "/v1/model")

    def feedback(self, prediction_id: str, label: str | int) -> dict[str, Any]:
        """Label an earlier prediction; it becomes training data for the next round."""
        if self._backend is not None:
            return self._backend.feedback(prediction_id, label)
        return self._map("POST", "/v1/feedback", {"prediction_id": prediction_id, "label": label})

    def rollback(self) -> dict[str, Any]:
        """Serve the previous version again; ModelUnavailableError if there is none."""
        if self._backend is not None:
            return self._backend.rollback()
        return self._map("POST", "/v1/rollback", {})

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", ...}``; ModelUnavailableError while no model is loaded."""
        if self._backend is not None:
            ready, details = self._backend.health()
            if not ready:
                raise ModelUnavailableError(json.dumps(details))
            return details
        return self._map("GET", "/healthz")

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics``."""
        if self._backend is not None:
            return self._backend.metrics_text()
        return self._call("GET", "/metrics")[0].decode()

    def close(self) -> None:
        """Close this thread's connection, and end the other threads' (a request they have
        in flight fails; their next call opens a new connection)."""
        own: _Connection | None = getattr(self._local, "conn", None)
        with self._lock:
            others = [c for c in self._open if c is not own]
            self._open.clear()
        for conn in others:
            conn.shut()
        if own is not None:
            self._local.conn = None
            own.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
