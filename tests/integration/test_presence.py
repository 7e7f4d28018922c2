"""Agents online and offline through a real Mosquitto, as the coordinator's registry sees it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from protocols.config import BrokerConfig
from tests.broker import COORDINATOR_USER, Mosquitto
from tests.procs import Agent, Coordinator, running, wait_until

pytestmark = pytest.mark.integration
KEEPALIVE = 2


def _online(coordinator: Coordinator, device_id: str) -> bool:
    record = coordinator.device(device_id)
    return record is not None and record.online


def _offline(coordinator: Coordinator, device_id: str) -> bool:
    record = coordinator.device(device_id)
    return record is not None and not record.online


@pytest.fixture
def coordinator(mosquitto: Mosquitto, tmp_path: Path) -> Coordinator:
    coord = Coordinator(tmp_path / "coordinator", mosquitto.env())
    coord.wait_connected()
    yield coord
    coord.stop()


@pytest.mark.wallclock
def test_agent_is_online_within_two_seconds_of_start(
    mosquitto: Mosquitto, coordinator: Coordinator, tmp_path: Path
) -> None:
    agent = Agent("dev-a", tmp_path / "a", mosquitto.env())
    with running(agent):
        wait_until(lambda: _online(coordinator, "dev-a"), timeout=5)
        elapsed = time.monotonic() - agent.started_at
        assert elapsed < 2.0, f"online after {elapsed:.2f}s"
        record = coordinator.device("dev-a")
        assert record is not None
        assert record.agent_version


@pytest.mark.wallclock
def test_killed_agent_is_offline_within_one_and_a_half_keepalives(
    mosquitto: Mosquitto, coordinator: Coordinator, tmp_path: Path
) -> None:
    agent = Agent("dev-k", tmp_path / "k", mosquitto.env(), "--keepalive", str(KEEPALIVE))
    with running(agent):
        wait_until(lambda: _online(coordinator, "dev-k"), timeout=5)
        agent.signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: _offline(coordinator, "dev-k"), timeout=10 * KEEPALIVE)
        elapsed = time.monotonic() - killed
    record = coordinator.device("dev-k")
    assert record is not None
    assert record.status_reason == "connection lost"
    assert elapsed <= 1.5 * KEEPALIVE, f"offline after {elapsed:.2f}s"


@pytest.mark.wallclock
def test_sigterm_publishes_offline_at_once_and_exits_zero(
    mosquitto: Mosquitto, coordinator: Coordinator, tmp_path: Path
) -> None:
    agent = Agent("dev-t", tmp_path / "t", mosquitto.env(), "--keepalive", "60")
    with running(agent):
        wait_until(lambda: _online(coordinator, "dev-t"), timeout=5)
        agent.signal(signal.SIGTERM)
        sent = time.monotonic()
        assert agent.wait(5) == 0
        wait_until(lambda: _offline(coordinator, "dev-t"), timeout=5)
        elapsed = time.monotonic() - sent
    record = coordinator.device("dev-t")
    assert record is not None
    assert record.status_reason == "shutdown"
    assert elapsed < 1.0, f"offline {elapsed:.2f}s after SIGTERM (keepalive 60s)"


def test_coordinator_restart_keeps_the_registry(mosquitto: Mosquitto, tmp_path: Path) -> None:
    data = tmp_path / "coordinator"
    first = Coordinator(data, mosquitto.env())
    agent = Agent("dev-r", tmp_path / "r", mosquitto.env(), "--telemetry-interval", "0.2")
    with running(agent):
        with running(first):
            first.wait_connected()
            wait_until(lambda: (r := first.device("dev-r")) and r.online and r.telemetry, 5)
            before = first.device("dev-r")
        assert first.process.returncode == 0
        second = Coordinator(data, mosquitto.env())
        with running(second):
            second.wait_connected()
            after = second.device("dev-r")
            assert after is not None
            assert before is not None
            assert after.first_seen == before.first_seen
            assert after.online
            # and it keeps serving: new telemetry arrives after the restart
            wait_until(lambda: (r := second.device("dev-r")) and r.last_seen > before.last_seen, 5)


def test_agent_rides_out_a_broker_restart(
    mosquitto: Mosquitto, coordinator: Coordinator, tmp_path: Path
) -> None:
    agent = Agent("dev-b", tmp_path / "b", mosquitto.env(), "--telemetry-interval", "0.2")
    with running(agent):
        wait_until(lambda: _online(coordinator, "dev-b"), timeout=5)
        mosquitto.restart(downtime=0.5)
        restarted = time.time()
        wait_until(lambda: (r := coordinator.device("dev-b")) and r.last_seen > restarted, 20)
        assert _online(coordinator, "dev-b")
        assert agent.process.poll() is None


def test_over_mqtt_3_1_1(mosquitto: Mosquitto, tmp_path: Path) -> None:
    coord = Coordinator(tmp_path / "c311", mosquitto.env("3.1.1"))
    agent = Agent("dev-3", tmp_path / "d3", mosquitto.env("3.1.1"), "--keepalive", str(KEEPALIVE))
    with running(coord, agent):
        coord.wait_connected()
        wait_until(lambda: _online(coord, "dev-3"), timeout=5)
        agent.signal(signal.SIGKILL)
        wait_until(lambda: _offline(coord, "dev-3"), timeout=10 * KEEPALIVE)


def _tls_env(config: BrokerConfig) -> dict[str, str]:
    return {
        "FEDGE_MQTT_HOST": config.host,
        "FEDGE_MQTT_PORT": str(config.port),
        "FEDGE_MQTT_TLS_CA": str(config.tls_ca),
        "FEDGE_MQTT_TLS_CERT": str(config.tls_cert),
        "FEDGE_MQTT_TLS_KEY": str(config.tls_key),
    }


def test_agent_and_coordinator_over_mutual_tls(mosquitto: Mosquitto, tmp_path: Path) -> None:
    coord = Coordinator(tmp_path / "ctls", _tls_env(mosquitto.tls_config(COORDINATOR_USER)))
    agent = Agent("dev-tls", tmp_path / "dtls", _tls_env(mosquitto.tls_config("dev-tls")))
    with running(coord, agent):
        coord.wait_connected()
        wait_until(lambda: (r := coord.device("dev-tls")) and r.online and r.telemetry, 10)
