"""protocols.config: layering, conversion from env strings, errors that name key and source."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any, Literal

import pytest

from agent.config import AgentConfig
from protocols.config import (
    BrokerConfig,
    ConfigError,
    Layer,
    as_toml,
    build,
    env_layer,
    find_config_file,
    load,
    parse_toml,
)

REQUIRED = Layer("defaults", {"device_id": "dev-1", "data_dir": "/srv/fedge"})


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    name: str = "x"
    ratio: float = 0.5


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """Every kind of field the loader supports, to test conversion without the real apps."""

    count: int = 1
    ratio: float = 1.0
    enabled: bool = False
    label: str | None = "default-label"
    mode: Literal["fast", "slow"] = "fast"
    section: Section = dataclasses.field(default_factory=Section)


def agent(*layers: Layer) -> AgentConfig:
    return build(AgentConfig, [REQUIRED, *layers])


def unique_filename() -> str:
    # A name no /etc/fedge on any machine has, so find_config_file's /etc candidate never hits.
    return f"unit-{uuid.uuid4().hex}.toml"


# --- layering ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("present", "winner"),
    [
        ((), 1883),
        (("file",), 2001),
        (("file", "env"), 2002),
        (("env",), 2002),
        (("file", "env", "flags"), 2003),
        (("file", "flags"), 2003),
    ],
)
def test_later_layers_win_defaults_file_env_flags(present: tuple[str, ...], winner: int) -> None:
    layers = {
        "file": parse_toml("[mqtt]\nport = 2001\n", "agent.toml"),
        "env": env_layer(AgentConfig, {"FEDGE_MQTT_PORT": "2002"}),
        "flags": Layer("command line", {"mqtt": {"port": 2003}}),
    }
    config = agent(*(layers[name] for name in ("file", "env", "flags") if name in present))
    assert config.mqtt.port == winner


def test_layers_merge_per_key_inside_a_section() -> None:
    config = agent(
        parse_toml('[mqtt]\nhost = "broker.lan"\nport = 8883\n', "agent.toml"),
        env_layer(AgentConfig, {"FEDGE_MQTT_KEEPALIVE": "10"}),
        Layer("command line", {"mqtt": {"port": 1884}}),
    )
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.keepalive) == ("broker.lan", 1884, 10)
    assert config.mqtt.protocol == "5"  # untouched default survives


def test_load_reads_file_env_and_flags_in_order(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('fleet = "lab"\ndevice_id = "from-file"\n[mqtt]\nport = 2001\n')
    environ = {"FEDGE_CONFIG": str(path), "FEDGE_DEVICE_ID": "from-env", "PATH": "/bin"}
    config = load(
        AgentConfig,
        {"device_id": "default-id", "data_dir": "/d"},
        {"mqtt": {"keepalive": 9}},
        environ,
        unique_filename(),
    )
    assert config.fleet == "lab"
    assert config.device_id == "from-env"
    assert (config.mqtt.port, config.mqtt.keepalive) == (2001, 9)


# --- env_layer and conversion -----------------------------------------------------------


def test_env_layer_picks_only_known_fedge_names() -> None:
    environ = {
        "FEDGE_DEVICE_ID": "cam-1",
        "FEDGE_MQTT_PORT": "1884",
        "FEDGE_MQTT_HOTS": "typo",  # not a setting: ignored
        "FEDGE_NOPE": "x",
        "MQTT_PORT": "1",
        "HOME": "/root",
    }
    layer = env_layer(AgentConfig, environ)
    assert layer.source == "environment"
    assert dict(layer.values) == {"device_id": "cam-1", "mqtt": {"port": "1884"}}


def test_env_layer_prefix_is_configurable() -> None:
    layer = env_layer(Sample, {"X_COUNT": "3", "X_SECTION_NAME": "n", "FEDGE_COUNT": "4"}, "X_")
    assert dict(layer.values) == {"count": "3", "section": {"name": "n"}}


def test_env_strings_are_converted_to_field_types() -> None:
    environ = {
        "FEDGE_COUNT": "42",
        "FEDGE_RATIO": "2.5",
        "FEDGE_ENABLED": "yes",
        "FEDGE_LABEL": "hello",
        "FEDGE_MODE": "slow",
        "FEDGE_SECTION_RATIO": "1e-3",
    }
    config = build(Sample, [env_layer(Sample, environ)])
    assert config == Sample(42, 2.5, True, "hello", "slow", Section("x", 0.001))
    assert type(config.count) is int
    assert type(config.ratio) is float


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "True", "yes", "YES", "on", "On"])
def test_true_spellings(text: str) -> None:
    assert build(Sample, [env_layer(Sample, {"FEDGE_ENABLED": text})]).enabled is True


@pytest.mark.parametrize("text", ["0", "false", "FALSE", "no", "No", "off", "OFF"])
def test_false_spellings(text: str) -> None:
    layers = [Layer("file", {"enabled": True}), env_layer(Sample, {"FEDGE_ENABLED": text})]
    assert build(Sample, layers).enabled is False


@pytest.mark.parametrize("text", ["maybe", "2", "y", "t", "enabled", ""])
def test_other_bool_spellings_are_rejected_naming_key_and_source(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(Sample, [env_layer(Sample, {"FEDGE_ENABLED": text})])
    assert str(err.value).startswith("enabled (from environment): expected true or false")


@pytest.mark.parametrize("text", ["none", "None", "NONE", ""])
def test_optional_none_spellings_unset_the_value(text: str) -> None:
    layers = [Layer("file", {"label": "set-in-file"}), env_layer(Sample, {"FEDGE_LABEL": text})]
    assert build(Sample, layers).label is None


def test_optional_takes_a_plain_value_and_toml_none_is_not_needed() -> None:
    assert build(Sample, [Layer("file", {"label": "lbl"})]).label == "lbl"
    assert build(Sample, []).label == "default-label"


def test_broker_username_from_env_and_unset_by_none() -> None:
    file = parse_toml('[mqtt]\nusername = "alice"\n', "agent.toml")
    assert agent(file).mqtt.username == "alice"
    assert (
        agent(file, env_layer(AgentConfig, {"FEDGE_MQTT_USERNAME": "none"})).mqtt.username is None
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FEDGE_MQTT_PORT": "abc"},
            "mqtt.port (from environment): expected an integer, got 'abc'",
        ),
        ({"FEDGE_MQTT_PORT": "1.5"}, "mqtt.port (from environment): expected an integer"),
        (
            {"FEDGE_TELEMETRY_INTERVAL_S": "fast"},
            "telemetry_interval_s (from environment): expected a number, got 'fast'",
        ),
        (
            {"FEDGE_MQTT_TLS_CHECK_HOSTNAME": "sure"},
            "mqtt.tls_check_hostname (from environment): expected true or false",
        ),
        (
            {"FEDGE_LOG_LEVEL": "verbose"},
            "log_level (from environment): expected one of debug, info, warning, error, "
            "got 'verbose'",
        ),
        (
            {"FEDGE_MQTT_PROTOCOL": "4"},
            "mqtt.protocol (from environment): expected one of 5, 3.1.1",
        ),
    ],
)
def test_bad_env_values_name_the_key_and_the_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        agent(env_layer(AgentConfig, env))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[mqtt]\nport = "x"\n', "mqtt.port (from /etc/x/agent.toml): expected an integer"),
        ("[mqtt]\nport = 1.0\n", "mqtt.port (from /etc/x/agent.toml): expected an integer"),
        ("[mqtt]\nport = true\n", "mqtt.port (from /etc/x/agent.toml): expected an integer"),
        ("[mqtt]\nhost = 5\n", "mqtt.host (from /etc/x/agent.toml): expected a string"),
        ("telemetry_interval_s = true\n", "telemetry_interval_s (from /etc/x/agent.toml)"),
        ('log_format = "json"\n', "log_format (from /etc/x/agent.toml): expected one of"),
        ("mqtt = 5\n", "mqtt in /etc/x/agent.toml must be a table"),
    ],
)
def test_bad_file_values_name_the_key_and_the_file(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        agent(parse_toml(toml, "/etc/x/agent.toml"))
    assert message in str(err.value)


def test_file_values_of_the_right_toml_type_are_accepted() -> None:
    config = agent(
        parse_toml(
            'telemetry_interval_s = 2\nlog_level = "debug"\n[mqtt]\nport = "1884"\n'
            'protocol = "3.1.1"\ntls_check_hostname = false\n',
            "agent.toml",
        )
    )
    assert config.telemetry_interval_s == 2.0
    assert type(config.telemetry_interval_s) is float
    assert config.log_level == "debug"
    assert (config.mqtt.port, config.mqtt.protocol) == (1884, "3.1.1")
    assert config.mqtt.tls_check_hostname is False


def test_flags_errors_name_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.port \(from command line\)"):
        agent(Layer("command line", {"mqtt": {"port": "eighty"}}))


def test_the_error_comes_from_the_layer_that_holds_the_bad_value() -> None:
    # A good file value overridden by a bad env value: the env is blamed, not the file.
    with pytest.raises(ConfigError, match=r"\(from environment\)"):
        agent(
            parse_toml("[mqtt]\nport = 1884\n", "agent.toml"),
            env_layer(AgentConfig, {"FEDGE_MQTT_PORT": "x"}),
        )


# --- unknown keys -----------------------------------------------------------------------


def test_unknown_top_level_key_is_rejected_listing_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        agent(parse_toml('colour = "red"\n', "/etc/fedge/agent.toml"))
    message = str(err.value)
    assert "unknown setting colour in /etc/fedge/agent.toml" in message
    valid = message.split("valid keys: ", 1)[1].split(", ")
    assert valid == sorted(f.name for f in dataclasses.fields(AgentConfig))


def test_unknown_section_key_is_rejected_with_its_dotted_name() -> None:
    with pytest.raises(ConfigError) as err:
        agent(parse_toml('[mqtt]\nhots = "broker"\n', "agent.toml"))
    message = str(err.value)
    assert "unknown setting mqtt.hots in agent.toml" in message
    valid = message.split("valid keys: ", 1)[1].split(", ")
    assert valid == sorted(f.name for f in dataclasses.fields(BrokerConfig))


def test_unknown_nested_table_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting mqtt\.tls"):
        agent(parse_toml('[mqtt.tls]\nca = "x"\n', "agent.toml"))


def test_invalid_toml_names_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^/etc/fedge/agent\.toml: not valid TOML"):
        parse_toml("[mqtt\nport = 1", "/etc/fedge/agent.toml")


# --- BrokerConfig validation ------------------------------------------------------------


@pytest.mark.parametrize("port", [1, 1883, 65535])
def test_broker_ports_in_range_are_accepted(port: int) -> None:
    assert BrokerConfig(port=port).port == port


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_broker_port_out_of_range_is_rejected(port: int) -> None:
    with pytest.raises(ValueError, match=r"mqtt\.port must be 1-65535"):
        BrokerConfig(port=port)
    with pytest.raises(ConfigError, match=rf"mqtt\.port must be 1-65535, got {port}"):
        agent(env_layer(AgentConfig, {"FEDGE_MQTT_PORT": str(port)}))


@pytest.mark.parametrize("keepalive", [0, 65536])
def test_broker_keepalive_out_of_range_is_rejected(keepalive: int) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.keepalive must be 1-65535"):
        agent(Layer("command line", {"mqtt": {"keepalive": keepalive}}))


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"tls_ca": "ca.pem", "tls_cert": "c.pem"}, "tls_cert and mqtt.tls_key must be set"),
        ({"tls_ca": "ca.pem", "tls_key": "k.pem"}, "tls_cert and mqtt.tls_key must be set"),
        ({"tls_cert": "c.pem", "tls_key": "k.pem"}, "tls_cert needs mqtt.tls_ca"),
    ],
)
def test_broker_tls_settings_must_be_consistent(tls: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BrokerConfig(**tls)
    with pytest.raises(ConfigError, match=message):
        agent(Layer("agent.toml", {"mqtt": tls}))


@pytest.mark.parametrize(
    "tls",
    [{}, {"tls_ca": "ca.pem"}, {"tls_ca": "ca.pem", "tls_cert": "c.pem", "tls_key": "k.pem"}],
)
def test_broker_tls_consistent_settings_are_accepted(tls: dict[str, Any]) -> None:
    assert agent(Layer("agent.toml", {"mqtt": tls})).mqtt == BrokerConfig(**tls)


def test_config_objects_are_frozen() -> None:
    config = agent()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mqtt.port = 1  # type: ignore[misc]


# --- as_toml ----------------------------------------------------------------------------


def _round_trip(config: AgentConfig) -> AgentConfig:
    return build(AgentConfig, [parse_toml(as_toml(config), "printed")])


def test_as_toml_round_trips_defaults() -> None:
    config = agent()
    assert _round_trip(config) == config


def test_as_toml_round_trips_every_kind_of_value() -> None:
    config = agent(
        Layer(
            "file",
            {
                "device_id": "cam.7_b-2",
                "data_dir": 'C:\\odd "quoted" path\\é',
                "fleet": "lab",
                "telemetry_interval_s": 0.25,
                "log_level": "debug",
                "log_format": "journal",
                "mqtt": {
                    "host": "broker.example",
                    "port": 8883,
                    "keepalive": 65535,
                    "protocol": "3.1.1",
                    "username": "alice",
                    "tls_ca": "/etc/ssl/ca.pem",
                    "tls_cert": "/etc/ssl/c.pem",
                    "tls_key": "/etc/ssl/k.pem",
                    "tls_check_hostname": False,
                    "max_payload_bytes": 65536,
                },
            },
        )
    )
    assert _round_trip(config) == config


def test_as_toml_writes_unset_values_as_comments_and_sections_last() -> None:
    text = as_toml(agent())
    assert "# username is not set" in text
    assert "username =" not in text
    lines = text.splitlines()
    section_at = lines.index("[mqtt]")
    top_level = {line.split(" = ")[0] for line in lines[:section_at] if " = " in line}
    config = agent()
    unset = {f.name for f in dataclasses.fields(AgentConfig) if getattr(config, f.name) is None}
    assert top_level == {f.name for f in dataclasses.fields(AgentConfig)} - {"mqtt"} - unset
    assert all(f"# {name} is not set" in text for name in unset)
    assert "port = 1883" in lines[section_at:]


def test_as_toml_redacts_the_password() -> None:
    config = agent(Layer("file", {"mqtt": {"username": "alice", "password": "hunter2"}}))
    text = as_toml(config)
    assert "hunter2" not in text
    assert 'password = "********"' in text
    back = _round_trip(config)
    assert back.mqtt.password == "********"
    assert dataclasses.replace(back, mqtt=config.mqtt) == config


@pytest.mark.parametrize("value", ["/srv/a\nb", "/srv/tab\x7fdel", "/srv/\x1b[0m"])
def test_as_toml_escapes_control_characters(value: str) -> None:
    config = agent(Layer("file", {"data_dir": value}))
    assert _round_trip(config) == config


# --- find_config_file -------------------------------------------------------------------


def _write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_explicit_path_wins_over_fedge_config_and_xdg(tmp_path: Path) -> None:
    name = unique_filename()
    explicit = _write(tmp_path / "explicit.toml")
    named = _write(tmp_path / "named.toml")
    _write(tmp_path / "xdg" / "fedge" / name)
    environ = {"FEDGE_CONFIG": str(named), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert find_config_file(name, str(explicit), environ) == explicit


def test_fedge_config_wins_over_xdg(tmp_path: Path) -> None:
    name = unique_filename()
    named = _write(tmp_path / "named.toml")
    _write(tmp_path / "xdg" / "fedge" / name)
    environ = {"FEDGE_CONFIG": str(named), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert find_config_file(name, None, environ) == named


def test_xdg_config_home_is_searched(tmp_path: Path) -> None:
    name = unique_filename()
    in_xdg = _write(tmp_path / "xdg" / "fedge" / name)
    assert find_config_file(name, None, {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}) == in_xdg


def test_home_config_is_searched_when_xdg_is_unset_or_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    name = unique_filename()
    in_home = _write(tmp_path / "home" / ".config" / "fedge" / name)
    assert find_config_file(name, None, {}) == in_home
    assert find_config_file(name, None, {"XDG_CONFIG_HOME": ""}) == in_home


def test_no_file_anywhere_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    name = unique_filename()
    assert find_config_file(name, None, {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}) is None


def test_missing_explicit_file_is_an_error_naming_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as err:
        find_config_file("agent.toml", str(missing), {})
    assert str(err.value) == f"config file {missing} does not exist (from --config)"


def test_missing_fedge_config_file_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    _write(tmp_path / "xdg" / "fedge" / "agent.toml")  # must not be used as a fallback
    environ = {"FEDGE_CONFIG": str(missing), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    with pytest.raises(ConfigError, match=r"does not exist \(from FEDGE_CONFIG\)"):
        find_config_file("agent.toml", None, environ)


def test_load_reports_a_bad_file_by_its_path(tmp_path: Path) -> None:
    path = _write(tmp_path / "agent.toml", "[mqtt]\nport = 0\nkeepalive = 'x'\n")
    defaults: dict[str, Any] = {"device_id": "d", "data_dir": "/d"}
    with pytest.raises(ConfigError, match=rf"mqtt\.keepalive \(from {path}\)"):
        load(AgentConfig, defaults, {}, {}, "agent.toml", str(path))
