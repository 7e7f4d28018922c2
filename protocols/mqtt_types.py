"""The MQTT adapter's plain types: its settings, the messages it hands over and its error
tree (`protocols.mqtt` re-exports them). Pure: no paho, no sockets.

    MqttError
    ├── ConnectError     could not (re)connect in time, or the broker refused us
    └── PublishError     the publish could not be queued
        └── NotConnectedError   QoS 0 while offline (QoS 1 is queued and sent on reconnect)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from protocols.config import BrokerConfig


class MqttError(Exception):
    """Base of the MQTT adapter's errors."""


class ConnectError(MqttError):
    """No connection to the broker (refused, unreachable, or not in time)."""


class PublishError(MqttError):
    """A message could not be queued for publishing."""


class NotConnectedError(PublishError):
    """A QoS 0 message was published while offline; it was dropped."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS for the broker connection; `cert_file` and `key_file` turn on mutual TLS."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for us if we vanish without disconnecting."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How to reach the broker and behave on the wire."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    keepalive: int = 30
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: str | None = None
    tls: TlsSettings | None = None
    persistent_session: bool = True
    session_expiry_s: int = 3600
    max_inflight: int = 20
    max_queued: int = 10_000
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    connect_timeout_s: float = 5.0
    will: Will | None = None


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message received from the broker."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float = field(default_factory=time.monotonic)
    response_topic: str = ""  # MQTT 5 request/response: where the sender wants the answer
    correlation: bytes = b""  # ... and what to echo back with it


def settings_from_config(
    broker: BrokerConfig,
    client_id: str,
    will: Will | None = None,
    persistent_session: bool = True,
) -> MqttSettings:
    """The adapter's settings for `broker`, as one client (`client_id`) with an optional Will."""
    tls = None
    if broker.tls_ca is not None:
        tls = TlsSettings(broker.tls_ca, broker.tls_cert, broker.tls_key, broker.tls_check_hostname)
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        keepalive=broker.keepalive,
        protocol=broker.protocol,
        username=broker.username,
        password=broker.password,
        tls=tls,
        persistent_session=persistent_session,
        will=will,
    )
