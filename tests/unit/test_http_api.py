"""cloud_coordinator.http_api served on loopback from a real registry file."""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloud_coordinator.http_api import ApiServer, ApiState
from cloud_coordinator.registry import Registry
from protocols import __version__
from protocols.messages import OFFLINE
from tests.unit import builders


@dataclass
class Reply:
    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        assert self.content_type == "application/json"
        return json.loads(self.body)


Get = Callable[[str], Reply]


def _getter(port: int) -> Get:
    def get(path: str) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            return Reply(resp.status, headers.get("content-type", ""), headers, body)
        finally:
            conn.close()

    return get


def _populate(registry: Registry) -> None:
    """Two devices online, one offline, and some rejections."""
    registry.apply_status(builders.status("cam-1", ts=100.0, agent_version="1.0"), 10)
    registry.apply_status(builders.status("cam-2", ts=100.0), 11)
    registry.apply_status(builders.status("cam-3", OFFLINE, ts=100.0, reason="will"), 12)
    registry.record_telemetry(builders.telemetry("cam-1", seq=5, cpu_percent=12.5), 13)
    registry.count_rejection("status", "malformed", 2)
    registry.count_rejection("telemetry", "device_mismatch")


def _serve(db: Path, connected: bool = True) -> Iterator[tuple[ApiServer, Get]]:
    server = ApiServer(
        "127.0.0.1",
        0,
        ApiState(db, lambda: connected, lambda: {"telemetry": 7, "status": 3}),
    )
    server.start()
    try:
        yield server, _getter(server.port)
    finally:
        server.stop()  # takes up to serve_forever's 0.5 s poll, so the server is shared


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One populated registry for the module; a test that changes it puts it back."""
    registry = Registry(tmp_path_factory.mktemp("api") / "coordinator.db")
    _populate(registry)
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def get(shared_registry: Registry) -> Iterator[Get]:
    for _, getter in _serve(shared_registry.path):
        yield getter


@pytest.fixture
def populated(registry: Registry, db_path: Path) -> Path:
    _populate(registry)
    return db_path


def test_healthz(get: Get) -> None:
    reply = get("/healthz")
    assert reply.status == 200
    assert reply.json() == {"status": "ok", "mqtt_connected": True}
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["server"].startswith(f"fedge-coordinator/{__version__}")
    assert int(reply.headers["content-length"]) == len(reply.body)


def test_devices(get: Get) -> None:
    reply = get("/v1/devices")
    assert reply.status == 200
    body = reply.json()
    assert isinstance(body, dict)
    devices = body["devices"]
    assert [(d["device_id"], d["state"]) for d in devices] == [
        ("cam-1", "online"),
        ("cam-2", "online"),
        ("cam-3", "offline"),
    ]
    assert devices[0]["agent_version"] == "1.0"
    assert devices[0]["telemetry"]["seq"] == 5
    assert devices[2]["status_reason"] == "will"
    assert devices[1]["telemetry"] is None


def test_devices_ignores_the_query_string(get: Get) -> None:
    assert get("/v1/devices?state=online").json() == get("/v1/devices").json()


def test_rejections(get: Get) -> None:
    reply = get("/v1/rejections")
    assert reply.status == 200
    assert reply.json() == {
        "rejections": [
            {"channel": "status", "reason": "malformed", "count": 2},
            {"channel": "telemetry", "reason": "device_mismatch", "count": 1},
        ]
    }


def test_metrics_is_prometheus_text(get: Get) -> None:
    reply = get("/metrics")
    assert reply.status == 200
    assert reply.content_type == "text/plain; version=0.0.4"
    text = reply.body.decode()
    assert text.endswith("\n")
    samples = {}
    families: dict[str, set[str]] = {}
    sample_re = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (\d+)$')
    for line in text.splitlines():
        if line.startswith("# "):
            kind, name = line.split(" ")[1:3]
            families.setdefault(name, set()).add(kind)
            continue
        match = sample_re.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        assert match.group(1) in families, f"{match.group(1)} has no HELP/TYPE"
        samples[match.group(1) + (match.group(2) or "")] = int(match.group(3))
    assert all(kinds == {"HELP", "TYPE"} for kinds in families.values())
    assert samples == {
        'fedge_devices{state="online"}': 2,
        'fedge_devices{state="offline"}': 1,
        "fedge_mqtt_connected": 1,
        'fedge_messages_accepted_total{channel="status"}': 3,
        'fedge_messages_accepted_total{channel="telemetry"}': 7,
        'fedge_messages_rejected_total{channel="status",reason="malformed"}': 2,
        'fedge_messages_rejected_total{channel="telemetry",reason="device_mismatch"}': 1,
    }


def test_metrics_follow_the_registry_live(shared_registry: Registry, get: Get) -> None:
    shared_registry.apply_status(builders.status("cam-2", OFFLINE, ts=100.0), 20)
    try:
        text = get("/metrics").body.decode()
        assert 'fedge_devices{state="online"} 1\n' in text
        assert 'fedge_devices{state="offline"} 2\n' in text
    finally:
        shared_registry.apply_status(builders.status("cam-2", ts=100.0), 21)
    assert 'fedge_devices{state="online"} 2\n' in get("/metrics").body.decode()


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/devices/cam-1", "/healthz/x", "/metrics.txt"])
def test_unknown_paths_are_404_json(get: Get, path: str) -> None:
    reply = get(path)
    assert reply.status == 404
    body = reply.json()
    assert body == {"error": f"no such endpoint {path}", "see": "/healthz, /metrics, /v1/devices"}


def test_a_missing_database_is_503_but_healthz_still_answers(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "coordinator.db"
    for _, get in _serve(missing, connected=False):
        for path in ("/v1/devices", "/v1/rejections", "/metrics"):
            reply = get(path)
            assert reply.status == 503, path
            body = reply.json()
            assert isinstance(body, dict)
            assert f"no registry at {missing}" in body["error"]
        health = get("/healthz")
        assert health.status == 200
        assert health.json() == {"status": "ok", "mqtt_connected": False}
    assert not missing.parent.exists()


def test_stop_closes_the_port(populated: Path) -> None:
    server = ApiServer("127.0.0.1", 0, ApiState(populated, lambda: True, dict))
    server.start()
    port = server.port
    assert port > 0
    assert _getter(port)("/healthz").status == 200
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        _getter(port)("/healthz")


def test_stop_without_start_returns(populated: Path) -> None:
    server = ApiServer("127.0.0.1", 0, ApiState(populated, lambda: True, dict))
    stopper = threading.Thread(target=server.stop, daemon=True)
    stopper.start()
    stopper.join(0.5)
    hung = stopper.is_alive()
    if hung:  # release the stuck shutdown() so no thread outlives the test
        server._server._BaseServer__is_shut_down.set()  # type: ignore[attr-defined]
        stopper.join(5)
    assert not hung


def test_signing_key_is_served_once_made(tmp_path: Path) -> None:
    from cloud_coordinator.signing_key import load_or_create_key
    from protocols.signing import key_text, public_key

    db = tmp_path / "coordinator.db"
    for _, get in _serve(db):
        reply = get("/v1/signing-key")
        assert reply.status == 503  # the coordinator has not made its key yet
        body = reply.json()
        assert isinstance(body, dict)
        assert "start the coordinator once" in body["error"]
        key = load_or_create_key(tmp_path)
        reply = get("/v1/signing-key")
        assert reply.status == 200
        assert reply.json() == {"algorithm": "ed25519", "public_key": key_text(public_key(key))}


class _Rollouts:
    """Stands in for the rollout manager: records what the API asked."""

    def __init__(self) -> None:
        self.made: list[object] = []

    def create(self, body: object) -> dict[str, Any]:
        if body == {"model": "bad"}:
            raise ValueError("no version of model 'bad'")
        self.made.append(body)
        return {"rollout_id": "r1", "state": "canary"}

    def steer(self, rollout_id: str, action: str) -> dict[str, Any]:
        if rollout_id != "r1":
            raise KeyError(rollout_id)
        return {"rollout_id": rollout_id, "state": action}

    def rollouts_json(self) -> list[dict[str, Any]]:
        return [{"rollout_id": "r1"}]

    def rollout_json(self, rollout_id: str) -> dict[str, Any] | None:
        return {"rollout_id": "r1"} if rollout_id == "r1" else None


def test_rollout_endpoints(populated: Path) -> None:
    rollouts = _Rollouts()
    state = ApiState(populated, lambda: True, dict, rollouts=rollouts)
    server = ApiServer("127.0.0.1", 0, state)
    server.start()
    try:

        def post(path: str, body: object) -> tuple[int, Any]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())
            finally:
                conn.close()

        get = _getter(server.port)
        assert post("/v1/rollouts", {"model": "m", "version": "v2"}) == (
            201, {"rollout_id": "r1", "state": "canary"},
        )  # fmt: skip
        assert rollouts.made == [{"model": "m", "version": "v2"}]
        status, body = post("/v1/rollouts", {"model": "bad"})
        assert (status, body["error"]) == (400, "no version of model 'bad'")
        assert post("/v1/rollouts/r1/promote", None)[0] == 200
        assert post("/v1/rollouts/zz/promote", None)[0] == 404
        assert get("/v1/rollouts").json() == {"rollouts": [{"rollout_id": "r1"}]}
        assert get("/v1/rollouts/r1").json() == {"rollout_id": "r1"}
        assert get("/v1/rollouts/zz").status == 404
    finally:
        server.stop()
