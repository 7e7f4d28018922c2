"""`InferenceClient`: the Python client of the agent's local inference API.

In-process (``InferenceClient.in_process(service)``: a direct call, no serialisation) or
over HTTP (``InferenceClient.connect("127.0.0.1:8790")`` or ``connect("unix:/run/...")``:
one keep-alive connection per thread, JSON or msgpack bodies). Both answer with the same
types and raise the same errors: `InputError` (400), `FeedbackError` (404 unknown id, 400
bad label), `ModelUnavailableError` (503), and `ClientError` for anything else (the
agent cannot be reached, another status).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent import api_codec
from agent.api_codec import JSON, MSGPACK
from agent.errors import AgentError, InputError
from agent.feedback import FeedbackError
from agent.http_api import Backend
from agent.predictions import ModelUnavailableError, Predictions


class ClientError(AgentError):
    """The API could not be reached, or answered with an unexpected status."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


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
        self._backend = backend
        self.address = address
        self.timeout = timeout
        self.kind = MSGPACK if use_msgpack else JSON
        self._local = threading.local()

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
    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            address = self.address or ""
            if address.startswith("unix:"):
                conn = _UnixConnection(address[len("unix:") :], self.timeout)
            else:
                host, _, port = address.rpartition(":")
                conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[bytes, str]:
        data = api_codec.encode_body(body, self.kind) if body is not None else None
        headers = {"Content-Type": self.kind} if data is not None else {}
        for attempt in (0, 1):  # a kept-alive connection the server closed: retry once
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                status = response.status
                break
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                if attempt or not isinstance(
                    exc, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError
                ):
                    raise ClientError(f"inference API at {self.address}: {exc}") from exc
        kind = self._kind_of(response)
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
        if status == 503:
            raise ModelUnavailableError(message)
        raise ClientError(f"{method} {path}: {status} {message}", status)

    @staticmethod
    def _kind_of(response: http.client.HTTPResponse) -> str:
        header = response.getheader("Content-Type") or JSON
        return MSGPACK if header.split(";")[0].strip() in api_codec.MSGPACK_TYPES else JSON

    def _map(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return dict(api_codec.decode_body(*self._call(method, path, body)))

    # --- the API ----------------------------------------------------------------------------
    def predict(self, x: Any) -> Predictions:
        """Predict one sample or a batch (array-like); InputError if it does not fit."""
        if self._backend is not None:
            return self._backend.predict(x)
        if isinstance(x, np.ndarray) and self.kind == MSGPACK:
            arr = np.ascontiguousarray(x)
            value: Any = {"dtype": str(arr.dtype), "shape": list(arr.shape), "data": arr.tobytes()}
        else:
            value = np.asarray(x).tolist()
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
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
