"""Why the broker cannot be reached is logged as a warning (once, then about once a
minute), not at debug level where a default install never shows it."""

from __future__ import annotations

import socket

import pytest

from protocols import mqtt
from protocols.config import BrokerConfig
from protocols.mqtt import ConnectError, MqttClient, settings_from_config


def _client(config: BrokerConfig) -> MqttClient:
    return MqttClient(settings_from_config(config, "dev-1"), lambda message: None)


@pytest.mark.parametrize(
    ("host", "cause"),
    [("127.0.0.1", "connection refused: is the broker running"),
     ("no-such-host.invalid", "cannot resolve the host name")],
)  # fmt: skip
def test_a_broker_that_cannot_be_reached_is_a_warning_saying_why(
    host: str, cause: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mqtt, "FAILURE_LOG_EVERY_S", 1.0)
    # bound and never listening: connecting is refused, and no broker of a test on another
    # worker can take the port meanwhile
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    client = _client(BrokerConfig(host=host, port=port))
    with holder, caplog.at_level("WARNING", logger="protocols.mqtt"):
        client.start()
        try:
            with pytest.raises(ConnectError, match=cause):
                client.wait_connected(2.5)
        finally:
            client.stop(timeout=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings, "nothing said why"
    assert all(f"cannot connect to {host}:{port}" in w and cause in w for w in warnings)
    assert len(warnings) <= 4  # throttled: not one per attempt
