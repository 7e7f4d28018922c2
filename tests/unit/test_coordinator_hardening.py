"""The coordinator against hostile input on its HTTP API, from devices' strings, and from
rollouts whose devices report versions the registry does not hold.

Real sockets on loopback and a real registry file; the rollout manager is the real one,
with the test's publisher standing in for the broker.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_coordinator.fleet_view import ago, device_table, shown
from cloud_coordinator.http_api import ApiServer, ApiState
from cloud_coordinator.registry import Registry, read_devices
from protocols import web_origin
from tests.unit import builders


class _Jobs:
    """A job runner whose spec parsing overflows on huge numbers, as the real one did."""

    def create_json(self, body: object) -> dict[str, object]:
        assert isinstance(body, dict)
        if body.get("boom"):
            raise RuntimeError("the runner broke")
        return {"job_id": str(body.get("job_id")), "lr": float(body.get("lr", 0.1))}

    def job_json(self, job_id: str) -> dict[str, object] | None:
        return None

    def jobs_json(self) -> list[dict[str, object]]:
        return []


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    registry = Registry(tmp_path_factory.mktemp("api") / "coordinator.db")
    state = ApiState(registry.path, lambda: True, dict, jobs=_Jobs(), host_names=("coord.lan",))
    server = ApiServer("127.0.0.1", 0, state)
    server.start()
    yield server
    server.stop()
    registry.close()


def _raw(api: ApiServer, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """Send `request` as is; (status, JSON body) of the answer (the server then closes)."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=timeout) as sock:
        sock.sendall(request)
        stream = sock.makefile("rb")
        status = int(stream.readline().split()[1])
        length = 0
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, json.loads(stream.read(length))


def _post(api: ApiServer, body: bytes, headers: bytes = b"") -> tuple[int, dict[str, Any]]:
    head = b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers
    if b"content-length" not in headers.lower():
        head += b"Content-Length: %d\r\n" % len(body)
    return _raw(api, head + b"\r\n" + body)


@pytest.mark.parametrize(
    "headers",
    [b"Host: attacker.example\r\n",  # DNS rebinding (the real Host is replaced below)
     b"Origin: http://attacker.example\r\nContent-Type: text/plain\r\n",
     b"Sec-Fetch-Site: cross-site\r\n"],
)  # fmt: skip
def test_requests_from_web_pages_are_403_and_start_nothing(api: ApiServer, headers: bytes) -> None:
    request = b"POST /v1/jobs HTTP/1.1\r\n" + headers
    if b"Host:" not in headers:
        request += b"Host: 127.0.0.1\r\n"
    status, body = _raw(api, request + b'Content-Length: 15\r\n\r\n{"job_id": "x"}')
    assert status == 403
    assert "local" in body["error"]
    assert _raw(api, b"GET /v1/jobs HTTP/1.1\r\nHost: localhost\r\n\r\n") == (200, {"jobs": []})


@pytest.mark.parametrize("host", [b"localhost:8780", b"127.0.0.1", b"[::1]:8780", b"coord.lan"])
def test_local_names_and_the_bound_name_are_served(api: ApiServer, host: bytes) -> None:
    assert _raw(api, b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")[0] == 200


@pytest.mark.parametrize("length", [b"-1", b"abc", b"+5", b"1e3", b"5 5"])
def test_a_malformed_content_length_is_400_at_once(api: ApiServer, length: bytes) -> None:
    status, body = _post(api, b"{}", b"Content-Length: " + length + b"\r\n")
    assert status == 400  # (-1 used to block the thread until the client left)
    assert "Content-Length" in body["error"]


def test_a_number_too_large_for_its_field_is_400(api: ApiServer) -> None:
    status, body = _post(api, b'{"job_id": "a", "lr": 1' + b"0" * 400 + b"}")
    assert status == 400
    assert "out of range" in body["error"]


def test_an_unexpected_error_is_a_logged_500(
    api: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    status, body = _post(api, b'{"boom": true}')
    assert status == 500
    assert "RuntimeError" in body["error"]
    assert any("the runner broke" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert _post(api, b'{"job_id": "ok"}') == (201, {"job_id": "ok", "lr": 0.1})


def test_device_strings_are_printed_without_their_control_characters(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "coordinator.db")
    hostile = "1.0\x1b[2J\x1b]0;owned\x07\nFAKE-ROW  online"
    registry.apply_status(builders.status("cam-1", ts=100.0, agent_version=hostile), 10)
    table = device_table(read_devices(registry.path), now=200.0)
    registry.close()
    assert "\x1b" not in table
    assert "\x07" not in table
    assert len(table.splitlines()) == 3  # header, one device, the total: no forged row
    assert "1.0\\x1b[2J" in table
    assert shown("plain 1.2.3") == "plain 1.2.3"


def test_durations_that_are_not_numbers_show_as_a_dash() -> None:
    assert [ago(float("inf")), ago(float("nan")), ago(-5), ago(7200)] == ["-", "-", "0s", "2h"]


def test_web_origin_refusal_reasons() -> None:
    assert web_origin.refusal(None, None, None) is None  # HTTP/1.0, no Host
    assert web_origin.refusal("localhost:1", "http://localhost:1", "same-origin") is None
    assert web_origin.refusal("box", None, None, also=("box",)) is None
    assert "Host" in str(web_origin.refusal("box", None, None))
    assert "web pages" in str(web_origin.refusal("127.0.0.1", "null", None))
    assert not web_origin.is_local_host("[::1")  # malformed, not the loopback address
