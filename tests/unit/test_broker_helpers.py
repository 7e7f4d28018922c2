"""cloud_coordinator.broker's pure helpers: the config texts and free_port."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from cloud_coordinator.broker import (
    LocalBroker,
    amqtt_config,
    find_mosquitto,
    free_port,
    mosquitto_config,
    wait_for_port,
)


def test_mosquitto_config_listens_on_loopback_and_never_drops_queued_messages() -> None:
    text = mosquitto_config(18830)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines[0] == "listener 18830 127.0.0.1"
    assert "allow_anonymous true" in lines
    assert "max_queued_messages 1000000" in lines
    assert "max_queued_bytes 536870912" in lines
    assert "persistence false" in lines
    assert all(len(line.split()) >= 2 for line in lines)  # "option value" per line


def test_mosquitto_config_host() -> None:
    assert mosquitto_config(1884, "0.0.0.0").splitlines()[0] == "listener 1884 0.0.0.0"


def test_amqtt_config_is_yaml_with_the_listener_and_anonymous_login() -> None:
    config = yaml.safe_load(amqtt_config(18831, "127.0.0.2"))
    assert config["listeners"]["default"] == {"type": "tcp", "bind": "127.0.0.2:18831"}
    plugin = config["plugins"]["amqtt.plugins.authentication.AnonymousAuthPlugin"]
    assert plugin == {"allow_anonymous": True}


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 1 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_port_sees_a_listener_and_times_out_without_one() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert wait_for_port("127.0.0.1", port, timeout=2.0) is True
    assert wait_for_port("127.0.0.1", port, timeout=0.2) is False


@pytest.mark.parametrize(("kind", "protocol"), [("mosquitto", "5"), ("amqtt", "3.1.1")])
def test_local_broker_protocol_follows_its_kind(tmp_path: Path, kind: str, protocol: str) -> None:
    broker = LocalBroker(tmp_path, kind=kind, port=18832)  # type: ignore[arg-type]
    assert (broker.kind, broker.port, broker.protocol) == (kind, 18832, protocol)
    broker.stop()  # never started: a no-op
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_the_demo_broker_runs_in_its_own_session(tmp_path: Path) -> None:
    """A Ctrl-C in the terminal reaches the terminal's process group: the broker, outside
    it, lives until the demo has stopped the agents and the coordinator through it."""
    broker = LocalBroker(tmp_path, kind="mosquitto", port=free_port())
    broker.start()
    try:
        process = broker._process
        assert process is not None
        assert os.getsid(process.pid) == process.pid != os.getsid(0)
    finally:
        broker.stop()
