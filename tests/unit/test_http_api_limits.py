"""The coordinator's HTTP API under what a real operator's tools (and a busy fleet) bring:
strict JSON, methods it does not serve, pages of a large fleet, idle and excess
connections. A real server on loopback over a real registry file."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_coordinator import http_api
from cloud_coordinator.http_api import ApiServer, ApiState
from cloud_coordinator.registry import Registry
from cloud_coordinator.rollouts import RolloutConflictError
from tests.unit import builders


class _Rollouts:
    def create(self, body: object) -> dict[str, Any]:
        raise RolloutConflictError("rollout r0 of m v1 is still in canary on 2 of these devices")

    def steer(self, rollout_id: str, action: str) -> dict[str, Any]:
        raise KeyError(rollout_id)

    def rollouts_json(self) -> list[dict[str, Any]]:
        return [{"rollout_id": "r1", "baseline": {"latency_ms_sum": float("inf")},
                 "health": [float("nan"), 1.5]}]  # fmt: skip

    def rollout_json(self, rollout_id: str) -> dict[str, Any] | None:
        return None


@pytest.fixture
def server(registry: Registry, db_path: Path) -> Iterator[ApiServer]:
    for n in range(5):
        registry.apply_status(builders.status(f"cam-{n}", ts=100.0), 10 + n)
    api = ApiServer("127.0.0.1", 0, ApiState(db_path, lambda: True, dict, rollouts=_Rollouts()))
    api.start()
    yield api
    api.stop()


def _request(
    port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _strict(body: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"not JSON: {name}")

    return json.loads(body, parse_constant=refuse)


def test_non_finite_numbers_become_null(server: ApiServer) -> None:
    status, _, body = _request(server.port, "GET", "/v1/rollouts")
    assert status == 200
    expected = {"rollout_id": "r1", "baseline": {"latency_ms_sum": None}, "health": [None, 1.5]}
    assert _strict(body) == {"rollouts": [expected]}


def test_a_conflicting_rollout_is_409(server: ApiServer) -> None:
    status, _, body = _request(server.port, "POST", "/v1/rollouts", b'{"model": "m"}')
    assert status == 409
    assert "still in canary" in _strict(body)["error"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405_json(server: ApiServer, method: str) -> None:
    status, headers, body = _request(server.port, method, "/v1/devices")
    assert status == 405
    assert headers["allow"] == "GET, HEAD, POST"
    assert headers["content-type"] == "application/json"
    assert f"{method} is not allowed" in _strict(body)["error"]


def test_head_answers_as_get_without_the_body(server: ApiServer) -> None:
    status, headers, body = _request(server.port, "HEAD", "/healthz")
    _, get_headers, get_body = _request(server.port, "GET", "/healthz")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == get_headers["content-length"] == str(len(get_body))
    assert _request(server.port, "HEAD", "/nope")[0] == 404


def test_the_fleet_comes_in_pages(server: ApiServer) -> None:
    seen: list[str] = []
    after, pages = "", 0
    while True:
        status, _, body = _request(server.port, "GET", f"/v1/devices?limit=2&after={after}")
        assert status == 200
        page = _strict(body)
        seen += [d["device_id"] for d in page["devices"]]
        pages += 1
        if page["next"] is None:
            break
        after = page["next"]
    assert (seen, pages) == ([f"cam-{n}" for n in range(5)], 3)
    _, _, whole = _request(server.port, "GET", "/v1/devices")
    assert "next" not in _strict(whole)  # without a limit: all of it, as before
    for bad in ("0", "abc", "-1", str(http_api.MAX_PAGE + 1)):
        status, _, body = _request(server.port, "GET", f"/v1/devices?limit={bad}")
        assert status == 400
        assert "limit must be" in _strict(body)["error"]


def test_metrics_count_the_fleet(server: ApiServer) -> None:
    _, _, body = _request(server.port, "GET", "/metrics")
    assert 'fedge_devices{state="online"} 5' in body.decode()
    assert 'fedge_devices{state="offline"} 0' in body.decode()


def test_a_request_whose_body_never_comes_is_closed(
    registry: Registry, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_api, "IDLE_TIMEOUT_S", 0.5)
    api = ApiServer("127.0.0.1", 0, ApiState(db_path, lambda: True, dict, rollouts=_Rollouts()))
    api.start()
    try:
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as half:
            half.sendall(b"POST /v1/rollouts HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\"")  # fmt: skip
            started = time.monotonic()
            assert half.recv(1024) == b""  # closed by the server, not left to hang
            assert time.monotonic() - started < 8
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as idle:
            assert idle.recv(1024) == b""  # a connection that never sends a request
    finally:
        api.stop()


def test_connections_past_the_cap_are_refused_with_503(
    registry: Registry, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_api, "MAX_CONNECTIONS", 2)
    api = ApiServer("127.0.0.1", 0, ApiState(db_path, lambda: True, dict))
    api.start()
    held = [socket.create_connection(("127.0.0.1", api.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.3)  # (both accepted, each holding a thread)
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as third:
            answer = third.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503")
        assert b"too many connections" in answer
        held.pop().close()
        time.sleep(0.3)
        assert _request(api.port, "GET", "/healthz")[0] == 200  # a slot is free again
    finally:
        for sock in held:
            sock.close()
        api.stop()
