"""agent.config and cloud_coordinator.config: defaults and each daemon's own checks."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from agent import config as agent_config
from agent.config import AgentConfig, default_device_id
from cloud_coordinator import config as coord_config
from cloud_coordinator.config import CoordinatorConfig
from protocols.config import BrokerConfig, ConfigError
from protocols.topics import valid_id


@pytest.fixture
def empty_file(tmp_path: Path) -> str:
    """An empty config file named explicitly, so no real /etc or ~/.config file is read."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    return str(path)


def load_agent(empty_file: str, flags: dict[str, Any] | None = None, **env: str) -> AgentConfig:
    return agent_config.load_config(flags or {}, env, empty_file)


def load_coord(
    empty_file: str, flags: dict[str, Any] | None = None, **env: str
) -> CoordinatorConfig:
    return coord_config.load_config(flags or {}, env, empty_file)


# --- agent ------------------------------------------------------------------------------


def test_agent_defaults(empty_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "edge-box.local")
    config = load_agent(empty_file)
    assert config.device_id == "edge-box.local"
    assert Path(config.data_dir).name == "fedge-agent"
    assert config.fleet == "default"
    assert config.telemetry_interval_s == 5.0
    assert (config.log_level, config.log_format) == ("info", "auto")
    assert config.mqtt == BrokerConfig()


def test_agent_data_dir_for_an_ordinary_user_is_under_xdg_data_home(
    empty_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("protocols.config.os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    assert load_agent(empty_file).data_dir == str(tmp_path / "share" / "fedge-agent")


def test_agent_data_dir_for_root_is_var_lib(
    empty_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("protocols.config.os.geteuid", lambda: 0)
    assert load_agent(empty_file).data_dir == "/var/lib/fedge-agent"


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("edge-01", "edge-01"),
        ("my host!.lan", "my-host-.lan"),
        ("caméra", "cam-ra"),
        ("", "device"),
        ("!!!", "device"),
        ("-x-", "x"),
        ("h" * 100, "h" * 64),
    ],
)
def test_default_device_id_is_a_valid_id_from_the_host_name(
    hostname: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert default_device_id() == expected
    assert valid_id(default_device_id())


def test_agent_env_and_flags_apply(empty_file: str) -> None:
    config = load_agent(
        empty_file,
        {"telemetry_interval_s": 0.5},
        FEDGE_DEVICE_ID="cam-7",
        FEDGE_FLEET="lab",
        FEDGE_MQTT_HOST="broker.lan",
        FEDGE_TELEMETRY_INTERVAL_S="60",
    )
    assert (config.device_id, config.fleet, config.mqtt.host) == ("cam-7", "lab", "broker.lan")
    assert config.telemetry_interval_s == 0.5


@pytest.mark.parametrize("device_id", ["cam-7", "a", "A_b.c-9", "x" * 64])
def test_agent_accepts_valid_device_ids(empty_file: str, device_id: str) -> None:
    assert load_agent(empty_file, FEDGE_DEVICE_ID=device_id).device_id == device_id


@pytest.mark.parametrize("device_id", ["a/b", "cam 7", "x" * 65, "+", "#", "dev\n", "é"])
def test_agent_rejects_invalid_device_ids_saying_what_is_allowed(
    empty_file: str, device_id: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_agent(empty_file, {"device_id": device_id})
    assert f"device_id {device_id!r} is invalid" in str(err.value)
    assert "A-Z a-z 0-9 _ . -" in str(err.value)


def test_agent_empty_device_id_from_env_is_rejected(empty_file: str) -> None:
    with pytest.raises(ConfigError, match="device_id '' is invalid"):
        load_agent(empty_file, FEDGE_DEVICE_ID="")


def test_agent_rejects_an_invalid_fleet(empty_file: str) -> None:
    with pytest.raises(ConfigError, match="fleet 'my fleet' is invalid"):
        load_agent(empty_file, FEDGE_FLEET="my fleet")


@pytest.mark.parametrize("interval", [0.1, 1, 86400])
def test_agent_telemetry_interval_within_bounds(empty_file: str, interval: float) -> None:
    config = load_agent(empty_file, {"telemetry_interval_s": interval})
    assert config.telemetry_interval_s == interval


@pytest.mark.parametrize("interval", ["0.09", "0", "-1", "86400.5", "1e9", "nan", "inf"])
def test_agent_telemetry_interval_out_of_bounds(empty_file: str, interval: str) -> None:
    with pytest.raises(ConfigError, match=r"telemetry_interval_s must be 0\.1-86400"):
        load_agent(empty_file, FEDGE_TELEMETRY_INTERVAL_S=interval)


def test_agent_reads_its_own_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "from-file"\n[mqtt]\nport = 8883\n')
    config = agent_config.load_config({}, {"FEDGE_CONFIG": str(path)})
    assert (config.device_id, config.mqtt.port) == ("from-file", 8883)


# --- coordinator ------------------------------------------------------------------------


def test_coordinator_defaults(empty_file: str) -> None:
    config = load_coord(empty_file)
    assert Path(config.data_dir).name == "fedge-coordinator"
    assert config.coordinator_id == "main"
    assert (config.http_host, config.http_port) == ("127.0.0.1", 8780)
    assert (config.log_level, config.log_format) == ("info", "auto")
    assert config.mqtt == BrokerConfig()


def test_coordinator_db_path_is_in_the_data_dir(empty_file: str, tmp_path: Path) -> None:
    config = load_coord(empty_file, FEDGE_DATA_DIR=str(tmp_path / "state"))
    assert config.db_path == tmp_path / "state" / "coordinator.db"


def test_coordinator_env_is_converted(empty_file: str) -> None:
    config = load_coord(
        empty_file,
        FEDGE_HTTP_PORT="9000",
        FEDGE_HTTP_HOST="0.0.0.0",
        FEDGE_COORDINATOR_ID="eu-1",
        FEDGE_MQTT_MAX_PAYLOAD_BYTES="65536",
    )
    assert (config.http_host, config.http_port, config.coordinator_id) == ("0.0.0.0", 9000, "eu-1")
    assert config.mqtt.max_payload_bytes == 65536


@pytest.mark.parametrize("port", ["0", "1", "65535"])
def test_coordinator_http_port_in_range(empty_file: str, port: str) -> None:
    assert load_coord(empty_file, FEDGE_HTTP_PORT=port).http_port == int(port)


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_coordinator_http_port_out_of_range(empty_file: str, port: str) -> None:
    with pytest.raises(ConfigError, match=f"http_port must be 0-65535, got {port}"):
        load_coord(empty_file, FEDGE_HTTP_PORT=port)


def test_coordinator_http_port_not_a_number_names_key_and_source(empty_file: str) -> None:
    with pytest.raises(ConfigError, match=r"http_port \(from command line\): expected an integer"):
        load_coord(empty_file, {"http_port": "http"})


@pytest.mark.parametrize("coordinator_id", ["", "a b", "x" * 65, "eu/1"])
def test_coordinator_rejects_invalid_ids(empty_file: str, coordinator_id: str) -> None:
    with pytest.raises(ConfigError, match=r"coordinator_id .* is not a valid identifier"):
        load_coord(empty_file, FEDGE_COORDINATOR_ID=coordinator_id)


def test_coordinator_does_not_accept_agent_settings(empty_file: str) -> None:
    with pytest.raises(ConfigError, match="unknown setting device_id in command line"):
        load_coord(empty_file, {"device_id": "x"})
