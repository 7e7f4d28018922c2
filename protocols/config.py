"""Typed, layered configuration shared by agent and coordinator: file, then env, then flags.

A configuration is a frozen dataclass whose fields are ``str``, ``int``, ``float``, ``bool``,
``X | None``, or a nested section dataclass. `build` merges layers (later ones win) and
checks every key and type, raising `ConfigError` that names the key and where it came from.
Environment variables map as ``FEDGE_<SECTION>_<KEY>`` (``FEDGE_MQTT_PORT``) or
``FEDGE_<KEY>`` for top-level keys.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

SECRET_KEYS = frozenset({"password"})
#: Exit status for invalid configuration (EX_CONFIG from sysexits.h).
EXIT_CONFIG = 78


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and its source."""


@dataclasses.dataclass(frozen=True, slots=True)
class Layer:
    """One source of settings: a nested mapping and a name for error messages."""

    source: str
    values: Mapping[str, Any]


def parse_toml(text: str, source: str) -> Layer:
    """Parse TOML text into a layer; ConfigError if it is not valid TOML."""
    try:
        return Layer(source, tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc


def default_data_dir(app: str) -> str:
    """``/var/lib/<app>`` for root, else ``$XDG_DATA_HOME/<app>`` (``~/.local/share/<app>``)."""
    if os.geteuid() == 0:
        return f"/var/lib/{app}"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / app)


def find_config_file(
    filename: str, explicit: str | None, environ: Mapping[str, str]
) -> Path | None:
    """The file named (flag, then ``$FEDGE_CONFIG``), else the first of the usual places."""
    named = explicit or environ.get("FEDGE_CONFIG")
    if named:
        if not Path(named).is_file():
            source = "--config" if explicit else "FEDGE_CONFIG"
            raise ConfigError(f"config file {named} does not exist (from {source})")
        return Path(named)
    xdg = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    for candidate in (Path("/etc/fedge") / filename, Path(xdg) / "fedge" / filename):
        if candidate.is_file():
            return candidate
    return None


def load(
    cls: type[C],
    defaults: Mapping[str, Any],
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    filename: str,
    explicit: str | None = None,
) -> C:
    """Build `cls` from `defaults`, the config file, `environ` and `flags` (later wins)."""
    layers = [Layer("defaults", defaults)]
    path = find_config_file(filename, explicit, environ)
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
            ) from exc
        layers.append(parse_toml(text, str(path)))
    env = {k: v for k, v in environ.items() if k != "FEDGE_CONFIG"}
    layers.append(env_layer(cls, env))
    layers.append(Layer("command line", flags))
    return build(cls, layers)


def _sections(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints[f.name])
    }


def env_layer(cls: type, environ: Mapping[str, str], prefix: str = "FEDGE_") -> Layer:
    """The settings of `cls` found in `environ` (as strings, converted by `build`)."""
    values: dict[str, Any] = {}
    sections = _sections(cls)
    for field in dataclasses.fields(cls):
        if field.name in sections:
            sub = {
                f.name: environ[key]
                for f in dataclasses.fields(sections[field.name])
                if (key := f"{prefix}{field.name}_{f.name}".upper()) in environ
            }
            if sub:
                values[field.name] = sub
        elif (key := f"{prefix}{field.name}".upper()) in environ:
            values[field.name] = environ[key]
    return Layer("environment", values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            return None
        return _convert(args[0], value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        text = str(value)
        if text in choices:
            return text
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")


def _merge(cls: type, layers: list[Layer], path: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for layer in layers:
        for key in layer.values:
            if key not in names:
                raise ConfigError(
                    f"unknown setting {path}{key!s} in {layer.source}; "
                    f"valid keys: {', '.join(sorted(names))}"
                )
    for name in names:
        hint = hints[name]
        where_prefix = f"{path}{name}"
        if dataclasses.is_dataclass(hint):
            sub_layers = []
            for layer in layers:
                if name in layer.values:
                    sub = layer.values[name]
                    if not isinstance(sub, Mapping):
                        raise ConfigError(f"{where_prefix} in {layer.source} must be a table")
                    sub_layers.append(Layer(layer.source, sub))
            section = typing.cast(type, hint)
            kwargs[name] = section(**_merge(section, sub_layers, f"{where_prefix}."))
            continue
        for layer in layers:
            if name in layer.values:
                kwargs[name] = _convert(
                    hint, layer.values[name], f"{where_prefix} (from {layer.source})"
                )
    return kwargs


def build(cls: type[C], layers: list[Layer]) -> C:
    """Merge `layers` (later wins) into `cls`, or raise ConfigError naming the bad key."""
    try:
        config = cls(**_merge(cls, layers, ""))
    except ValueError as exc:  # a dataclass's own __post_init__ checks
        raise ConfigError(str(exc)) from exc
    return config


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def check_broker_files(broker: BrokerConfig) -> None:
    """ConfigError unless every TLS file the broker settings name exists and is readable
    (`protocols.mqtt.check_tls_files` checks what they hold)."""
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(broker, key)
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"mqtt.{key}: cannot read {path}: {exc.strerror}") from exc


def split_host_port(text: str, what: str, lowest_port: int = 1) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address as (host, port or None);
    ConfigError for anything else (a URL, an empty host, a port below `lowest_port`)."""
    text = text.strip()
    if "/" in text:
        raise ConfigError(f"{what}: give host:port, not a URL ({text!r})")
    host, port = text, ""
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ConfigError(f"{what}: {text!r} is not [address]:port")
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or "[" in host or "]" in host:
        raise ConfigError(f"{what}: no host in {text!r}")
    if port == "" and text.endswith(":"):
        raise ConfigError(f"{what}: no port after the ':' in {text!r}")
    if not port:
        return host, None
    if not port.isdigit() or not lowest_port <= int(port) < 65536:
        raise ConfigError(f"{what}: port {port!r} is not {lowest_port}-65535")
    return host, int(port)


def as_toml(config: object, indent: str = "") -> str:
    """Render a config dataclass as TOML (sections last), for ``--print-config``."""
    plain: list[str] = []
    sections: list[str] = []
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            sections.append(f"\n[{field.name}]\n" + as_toml(value))
        elif value is None:
            plain.append(f"# {field.name} is not set")
        elif field.name in SECRET_KEYS:
            plain.append(f'{field.name} = "********"')
        elif isinstance(value, bool):
            plain.append(f"{field.name} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            plain.append(f"{field.name} = {value}")
        else:
            plain.append(f"{field.name} = {_toml_string(str(value))}")
    return "\n".join(plain) + "\n" + "".join(sections)


#: Bounds of ``mqtt.max_payload_bytes``: room for a 1 KiB model chunk, and MQTT's limit.
MIN_PAYLOAD_BYTES = 2048
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The ``[mqtt]`` section both daemons share: where the broker is and how to log in."""

    host: str = "127.0.0.1"
    port: int = 1883
    keepalive: int = 30
    protocol: typing.Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_check_hostname: bool = True
    max_payload_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.host.strip() or any(c in self.host for c in "/[] "):
            raise ValueError(f"mqtt.host must be a host name or address, got {self.host!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"mqtt.port must be 1-65535, got {self.port}")
        if not MIN_PAYLOAD_BYTES <= self.max_payload_bytes <= MAX_PAYLOAD_BYTES:
            raise ValueError(
                f"mqtt.max_payload_bytes must be {MIN_PAYLOAD_BYTES}-{MAX_PAYLOAD_BYTES}"
                f" (MQTT's limit), got {self.max_payload_bytes}"
            )
        if not 1 <= self.keepalive <= 65535:
            raise ValueError(f"mqtt.keepalive must be 1-65535 seconds, got {self.keepalive}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("mqtt.tls_cert and mqtt.tls_key must be set together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("mqtt.tls_cert needs mqtt.tls_ca")
