"""The two command lines as real processes: exit statuses, messages, --print-config, --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cloud_coordinator.registry import Registry
from protocols.config import EXIT_CONFIG
from tests.unit import builders


def run(
    module: str, *args: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# --- fedge-agent ------------------------------------------------------------------------


def test_agent_invalid_env_value_exits_78_naming_the_setting(
    env: dict[str, str], tmp_path: Path
) -> None:
    env["FEDGE_MQTT_PORT"] = "abc"
    result = run("agent", env=env, cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG == 78
    assert result.stdout == ""
    assert "fedge-agent: invalid configuration: mqtt.port (from environment)" in result.stderr
    assert "'abc'" in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_invalid_flag_value_exits_78(env: dict[str, str], tmp_path: Path) -> None:
    result = run("agent", "--broker", "broker.lan:http", env=env, cwd=tmp_path)
    assert result.returncode == 78
    assert "--broker: port 'http' is not 1-65535" in result.stderr


def test_agent_missing_config_file_exits_78(env: dict[str, str], tmp_path: Path) -> None:
    result = run("agent", "--config", str(tmp_path / "nope.toml"), env=env, cwd=tmp_path)
    assert result.returncode == 78
    assert f"config file {tmp_path / 'nope.toml'} does not exist (from --config)" in result.stderr


def test_agent_with_a_corrupt_pinned_key_file_exits_78_saying_what_to_do(
    env: dict[str, str], tmp_path: Path
) -> None:
    pins = tmp_path / "state" / "trust" / "model-keys"
    pins.parent.mkdir(parents=True)
    pins.write_text("not a key!\n")
    args = ["--data-dir", str(tmp_path / "state"), "--no-train", "--broker", "127.0.0.1:1"]
    result = run("agent", *args, env=env, cwd=tmp_path)
    assert result.returncode == 78
    assert f"fedge-agent: cannot start: {pins} holds a bad key" in result.stderr
    assert "delete it" in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_print_config_shows_every_layer_and_hides_the_password(
    env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('fleet = "lab"\n[mqtt]\nusername = "cam"\nkeepalive = 12\n')
    env["FEDGE_DEVICE_ID"] = "cam-7"
    env["FEDGE_MQTT_PASSWORD"] = "hunter2"
    result = run(
        "agent",
        "--config",
        str(config),
        "--broker",
        "broker.lan:8883",
        "--telemetry-interval",
        "2.5",
        "--print-config",
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    printed = tomllib.loads(result.stdout)
    assert printed["device_id"] == "cam-7"
    assert printed["fleet"] == "lab"
    assert printed["telemetry_interval_s"] == 2.5
    default_data = (
        "/var/lib/fedge-agent" if os.geteuid() == 0 else f"{env['XDG_DATA_HOME']}/fedge-agent"
    )
    assert printed["data_dir"] == default_data
    assert printed["mqtt"]["host"] == "broker.lan"
    assert printed["mqtt"]["port"] == 8883
    assert printed["mqtt"]["keepalive"] == 12
    assert printed["mqtt"]["username"] == "cam"
    assert printed["mqtt"]["password"] == "********"


def test_agent_print_config_uses_the_xdg_config_file(env: dict[str, str], tmp_path: Path) -> None:
    # Skips if the machine has a system-wide file, which is searched first.
    if Path("/etc/fedge/agent.toml").exists():
        pytest.skip("/etc/fedge/agent.toml exists on this machine")
    path = Path(env["XDG_CONFIG_HOME"]) / "fedge" / "agent.toml"
    path.parent.mkdir(parents=True)
    path.write_text('device_id = "xdg-device"\n')
    result = run("agent", "--print-config", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["device_id"] == "xdg-device"


def test_agent_help_lists_the_environment_and_exit_statuses(
    env: dict[str, str], tmp_path: Path
) -> None:
    result = run("agent", "--help", env=env, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: fedge-agent")
    for text in ("FEDGE_DEVICE_ID", "FEDGE_MQTT_PORT", "--print-config", "--config", "78"):
        assert text in result.stdout


def test_agent_version(env: dict[str, str], tmp_path: Path) -> None:
    from protocols import __version__

    result = run("agent", "--version", env=env, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"fedge-agent {__version__}"


# --- fedge-coordinator ------------------------------------------------------------------


def test_coordinator_devices_without_a_registry_exits_1_saying_what_to_do(
    env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "empty"
    data.mkdir()
    result = run("cloud_coordinator", "devices", "--data-dir", str(data), env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"no registry at {data / 'coordinator.db'}" in result.stderr
    assert "--data-dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(data.iterdir()) == []  # reading must not create the database


def test_coordinator_default_command_is_serve(env: dict[str, str], tmp_path: Path) -> None:
    env["FEDGE_HTTP_PORT"] = "9123"
    result = run(
        "cloud_coordinator",
        "--print-config",
        "--data-dir",
        str(tmp_path / "d"),
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["data_dir"] == str(tmp_path / "d")
    assert printed["http_port"] == 9123
    assert printed["coordinator_id"] == "main"
    assert printed["mqtt"]["port"] == 1883
    assert not (tmp_path / "d").exists()  # printing the config starts nothing


def test_coordinator_invalid_config_exits_78(env: dict[str, str], tmp_path: Path) -> None:
    env["FEDGE_HTTP_PORT"] = "99999"
    result = run("cloud_coordinator", "--print-config", env=env, cwd=tmp_path)
    assert result.returncode == 78
    assert "fedge-coordinator: invalid configuration: http_port must be 0-65535" in result.stderr


def test_coordinator_devices_and_rejections_read_a_registry(
    env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    registry = Registry(data / "coordinator.db")
    try:
        registry.apply_status(builders.status("cam-1", agent_version="1.2.3"), 1000.0)
        registry.count_rejection("status", "malformed", 3)
    finally:
        registry.close()

    table = run("cloud_coordinator", "devices", "--data-dir", str(data), env=env, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].startswith("DEVICE")
    assert "cam-1" in table.stdout
    assert "1.2.3" in table.stdout
    assert table.stdout.rstrip().endswith("1 of 1 devices online")

    as_json = run(
        "cloud_coordinator", "devices", "--json", "--data-dir", str(data), env=env, cwd=tmp_path
    )
    assert as_json.returncode == 0, as_json.stderr
    [device] = json.loads(as_json.stdout)["devices"]
    assert (device["device_id"], device["state"]) == ("cam-1", "online")

    rejections = run(
        "cloud_coordinator", "rejections", "--json", "--data-dir", str(data), env=env, cwd=tmp_path
    )
    assert rejections.returncode == 0, rejections.stderr
    assert json.loads(rejections.stdout) == {
        "rejections": [{"channel": "status", "reason": "malformed", "count": 3}]
    }


def test_coordinator_help_lists_the_commands(env: dict[str, str], tmp_path: Path) -> None:
    result = run("cloud_coordinator", "--help", env=env, cwd=tmp_path)
    assert result.returncode == 0
    for command in ("serve", "devices", "rejections", "demo"):
        assert command in result.stdout
    assert "78 invalid configuration" in result.stdout


def test_demo_strategy_params_are_numbers_by_key(env: dict[str, str], tmp_path: Path) -> None:
    from cloud_coordinator.cli import _key_values

    assert _key_values(["momentum=0.5", "keep=3", "server_lr = 2e-1"], "--x") == {
        "momentum": 0.5,
        "keep": 3,
        "server_lr": 0.2,
    }
    result = run("cloud_coordinator", "demo", "--strategy-param", "momentum", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "--strategy-param 'momentum': use KEY=VALUE with a number" in result.stderr
    assert "Traceback" not in result.stderr
