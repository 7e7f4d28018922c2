"""What an operator sees when a daemon cannot start: one line naming what to fix and a
distinct exit status, never a traceback (real processes, as in `test_cli`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from protocols.config import BrokerConfig, ConfigError, split_host_port
from protocols.mqtt import check_tls_files
from tests.pki import TestCA
from tests.unit.test_cli import run

AGENT_BASE = ("--device-id", "t1", "--no-train", "--no-inference")


def _no_traceback(result: object) -> None:
    assert "Traceback" not in getattr(result, "stderr", "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("broker.lan", ("broker.lan", None)), ("broker.lan:8883", ("broker.lan", 8883)),
     ("[::1]:1883", ("::1", 1883)), ("[fe80::1]", ("fe80::1", None)), ("::1", ("::1", None)),
     ("10.0.0.2:1", ("10.0.0.2", 1))],
)  # fmt: skip
def test_broker_addresses_parse(text: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(text, "--broker") == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [("mqtts://broker:8883", "not a URL"), (":1883", "no host"), ("broker:", "no port"),
     ("broker:0", "not 1-65535"), ("broker:70000", "not 1-65535"), ("broker:x", "not 1-65535"),
     ("[::1", "not \\[address\\]:port"), ("[::1]x", "not \\[address\\]:port")],
)  # fmt: skip
def test_bad_broker_addresses_are_refused(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        split_host_port(text, "--broker")


@pytest.mark.parametrize("broker", ["mqtts://broker.example:8883", ":1883", "[::1"])
def test_agent_refuses_a_bad_broker_address_with_78(
    broker: str,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    result = run("agent", *AGENT_BASE, "--broker", broker, env=env, cwd=tmp_path)
    assert result.returncode == 78, result.stderr
    assert "fedge-agent: invalid configuration: --broker" in result.stderr
    _no_traceback(result)


def test_an_ipv6_broker_reaches_the_config(env: dict[str, str], tmp_path: Path) -> None:
    result = run("agent", "--broker", "[::1]:1884", "--print-config", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'host = "::1"' in result.stdout
    assert "port = 1884" in result.stdout


@pytest.mark.parametrize(
    ("variable", "value", "match"),
    [("FEDGE_MQTT_HOST", "", "mqtt.host must be a host name"),
     ("FEDGE_MQTT_MAX_PAYLOAD_BYTES", "0", "mqtt.max_payload_bytes must be 2048-"),
     ("FEDGE_MQTT_MAX_PAYLOAD_BYTES", "-5", "mqtt.max_payload_bytes must be 2048-")],
)  # fmt: skip
def test_broker_settings_out_of_range_exit_78(
    variable: str,
    value: str,
    match: str,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    env[variable] = value
    for module in ("agent", "cloud_coordinator"):
        result = run(module, "--print-config", env=env, cwd=tmp_path)
        assert result.returncode == 78, (module, result.stderr)
        assert match in result.stderr
        _no_traceback(result)


def test_a_config_file_that_is_not_utf8_exits_78(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_bytes(b"\xff\xfe device_id = 'x'")
    result = run("agent", "--config", str(bad), "--print-config", env=env, cwd=tmp_path)
    assert result.returncode == 78
    assert "is not UTF-8 text" in result.stderr
    _no_traceback(result)


def test_tls_files_that_hold_no_certificate_exit_78(env: dict[str, str], tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "pki")
    client = ca.issue("dev-1")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    env["FEDGE_MQTT_TLS_CA"] = str(junk)
    result = run("agent", *AGENT_BASE, "--broker", "127.0.0.1:1", env=env, cwd=tmp_path)
    assert result.returncode == 78, result.stderr
    assert "mqtt.tls_ca:" in result.stderr
    assert "no usable CA certificate" in result.stderr
    _no_traceback(result)
    env["FEDGE_MQTT_TLS_CA"] = str(ca.ca_file)
    env["FEDGE_MQTT_TLS_CERT"] = str(client.cert)
    env["FEDGE_MQTT_TLS_KEY"] = str(ca.ca_file)  # a certificate where the key should be
    result = run("cloud_coordinator", "--data-dir", str(tmp_path / "c"), "--broker",
                 "127.0.0.1:1", "--http", "127.0.0.1:0", env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert "not a certificate and its private key" in result.stderr
    _no_traceback(result)
    # the right files pass the same check
    check_tls_files(BrokerConfig(tls_ca=str(ca.ca_file), tls_cert=str(client.cert),
                                 tls_key=str(client.key)))  # fmt: skip


def test_an_agent_whose_data_dir_cannot_be_made_says_so(
    env: dict[str, str], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data directory should be")
    result = run("agent", *AGENT_BASE[:2], "--no-train", "--data-dir", str(blocker / "state"),
                 "--broker", "127.0.0.1:1", env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert "fedge-agent: cannot start:" in result.stderr
    assert "data_dir is" in result.stderr
    _no_traceback(result)


def test_a_coordinator_whose_http_port_is_taken_says_so(
    env: dict[str, str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ("--data-dir", str(tmp_path / "c"), "--broker", "127.0.0.1:1")
        result = run(
            "cloud_coordinator", *args, "--http", f"127.0.0.1:{port}", env=env, cwd=tmp_path
        )
    assert result.returncode == 1, result.stderr
    expected = f"fedge-coordinator: cannot listen on 127.0.0.1:{port} (http):"
    assert expected in result.stderr
    _no_traceback(result)


def test_devices_watch_needs_a_positive_interval(env: dict[str, str], tmp_path: Path) -> None:
    result = run("cloud_coordinator", "devices", "--watch", "-1", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "must be 0.1-86400 seconds" in result.stderr
    _no_traceback(result)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(("--template", "bogus"), "unknown --template 'bogus'; choose one of"),
     (("--agents", "0"), "--agents: must be at least 1"),
     (("--broker", "mqtt://x"), "--broker: give host:port, not a URL")],
)  # fmt: skip
def test_demo_refuses_bad_options_before_starting_anything(
    flags: tuple[str, ...], message: str, env: dict[str, str], tmp_path: Path
) -> None:
    result = run("cloud_coordinator", "demo", *flags, "--workdir", str(tmp_path / "w"),
                 env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "w").exists()
    _no_traceback(result)


def test_demo_never_empties_a_directory_it_did_not_make(
    env: dict[str, str], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "work.py").write_text("precious = True\n")
    result = run("cloud_coordinator", "demo", "--agents", "1", "--rounds", "0",
                 "--workdir", str(project), env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "holds other files" in result.stderr
    assert (project / "src" / "work.py").read_text() == "precious = True\n"


def test_the_demo_fleet_reads_no_config_file_and_no_fedge_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_coordinator.local_fleet import MARKER, NO_CONFIG, LocalFleet, check_workdir

    monkeypatch.setenv("FEDGE_MQTT_TLS_CA", "/etc/fedge/tls/ca.crt")  # as on an installed host
    monkeypatch.setenv("FEDGE_DEVICE_ID", "gateway-7")
    fleet = LocalFleet(tmp_path / "w", 1, "digits_mlp", 0.5, 0, None, None)
    assert {k for k in fleet.env if k.startswith("FEDGE_")} == {"FEDGE_CONFIG", "FEDGE_LOG_FORMAT"}
    assert fleet.env["FEDGE_CONFIG"] == str(tmp_path / "w" / NO_CONFIG)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / MARKER).write_text("")
    (tmp_path / "w" / "logs").mkdir()
    check_workdir(tmp_path / "w")  # an earlier demo's: may be emptied
    with pytest.raises(ValueError, match="holds other files"):
        check_workdir(tmp_path / "w" / MARKER)  # a file


def test_a_data_dir_named_like_a_command_is_a_data_dir(env: dict[str, str], tmp_path: Path) -> None:
    result = run(
        "cloud_coordinator", "--data-dir", "serve", "--print-config", env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert 'data_dir = "serve"' in result.stdout


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"FEDGE_OFFLOAD": "true", "FEDGE_MQTT_PROTOCOL": "3.1.1"}, "offload needs mqtt.protocol"),
     ({"FEDGE_DATA_DIR": "/tmp/" + "d" * 120}, "longer than the 107 bytes")],
)  # fmt: skip
def test_agent_settings_that_cannot_work_exit_78(
    settings: dict[str, str], message: str, env: dict[str, str], tmp_path: Path
) -> None:
    env.update(settings)
    result = run("agent", "--print-config", env=env, cwd=tmp_path)
    assert result.returncode == 78, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    ("http", "host", "port"),
    [("9000", "127.0.0.1", 9000), (":9000", "127.0.0.1", 9000), ("0.0.0.0:0", "0.0.0.0", 0),
     ("[::1]:9000", "::1", 9000), ("::1", "::1", 8780), ("localhost", "localhost", 8780)],
)  # fmt: skip
def test_http_addresses(
    http: str, host: str, port: int, env: dict[str, str], tmp_path: Path
) -> None:
    result = run("cloud_coordinator", "--http", http, "--print-config", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f'http_host = "{host}"' in result.stdout
    assert f"http_port = {port}" in result.stdout


def test_a_small_broker_payload_cap_still_works(env: dict[str, str], tmp_path: Path) -> None:
    env["FEDGE_MQTT_MAX_PAYLOAD_BYTES"] = "32768"
    result = run("agent", "--print-config", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_payload_bytes = 32768" in result.stdout
