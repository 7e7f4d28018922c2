"""A stand-in backend and raw-socket helpers for the local API's HTTP tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from agent.api_codec import InputLimits
from agent.config import ListenAddress
from agent.http_api import ApiServer
from agent.predictions import Predictions


class StubBackend:
    """Answers health and model; `describe` fails on demand."""

    def __init__(self) -> None:
        self.fail = False

    def predict(self, x: object) -> Predictions:
        raise NotImplementedError

    def count_invalid(self) -> None:
        pass

    def input_limits(self) -> InputLimits:
        return InputLimits.of((64,), 1024)

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
def backend() -> StubBackend:
    """A stand-in backend, one per test module."""
    return StubBackend()


@pytest.fixture(scope="module")  # (one for the module: stopping one takes half a second)
def server(backend: StubBackend) -> Iterator[ApiServer]:
    """A server of the stand-in backend, one per test module."""
    s = ApiServer(backend, ListenAddress(host="127.0.0.1", port=0), idle_timeout_s=5.0)
    s.start()
    yield s
    s.stop()


@contextlib.contextmanager
def own_server(backend: StubBackend, **options: Any) -> Iterator[ApiServer]:
    """A server of its own with `options` (timeouts, connection cap), stopped afterwards."""
    server = ApiServer(backend, ListenAddress(host="127.0.0.1", port=0), **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def connect_raw(server: ApiServer) -> socket.socket:
    """A plain TCP connection to `server`."""
    sock = socket.create_connection((server.address.host, server.address.port), timeout=5)
    return sock


def read_answer(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-case headers, body) of one answer read from `stream`."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, stream.read(int(headers["content-length"]))
