"""The one paho-mqtt adapter that agent and coordinator share.

It owns everything paho: MQTT 5 (or 3.1.1) sessions, TLS and mutual TLS, the Last Will,
persistent sessions, QoS 1 with a bounded in-flight window and queue, reconnects with
exponential backoff from a randomised first delay, and clean shutdown. Callers see only
this module's types: `InboundMessage` on their callback, `PublishHandle` from `publish`,
and exceptions from the `MqttError` tree::

    MqttError
    ├── ConnectError     could not (re)connect in time, or the broker refused us
    └── PublishError     the publish could not be queued
        └── NotConnectedError   QoS 0 while offline (QoS 1 is queued and sent on reconnect)

Callbacks run on the client's network thread; they must be quick and never raise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocols.config import BrokerConfig, ConfigError
from protocols.mqtt_types import (
    ConnectError,
    InboundMessage,
    MqttError,
    MqttSettings,
    NotConnectedError,
    PublishError,
    TlsSettings,
    Will,
    settings_from_config,
)

__all__ = [
    "ConnectError", "InboundMessage", "MqttClient", "MqttError", "MqttSettings",
    "NotConnectedError", "PublishError", "PublishHandle", "TlsSettings", "Will",
    "check_tls_files", "settings_from_config",
]  # fmt: skip

log = logging.getLogger(__name__)
#: While the broker cannot be reached, a warning saying why at most this often.
FAILURE_LOG_EVERY_S = 60.0
#: A session that lasts this long resets the reconnect back-off; shorter ones double it.
STABLE_S = 10.0


def check_tls_files(broker: BrokerConfig) -> None:
    """ConfigError unless the TLS files named hold what they should: CA certificates (PEM),
    and a client certificate with its private key."""
    if broker.tls_ca is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=broker.tls_ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"mqtt.tls_ca: {broker.tls_ca} holds no usable CA certificate (PEM): "
            f"{getattr(exc, 'reason', None) or exc}"
        ) from exc
    if broker.tls_cert is not None and broker.tls_key is not None:
        try:
            context.load_cert_chain(broker.tls_cert, broker.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"mqtt.tls_cert/mqtt.tls_key: {broker.tls_cert} and {broker.tls_key} are not"
                f" a certificate and its private key (PEM): {getattr(exc, 'reason', None) or exc}"
            ) from exc


def _connect_failure(exc: BaseException) -> str:
    """Why a connection attempt failed, and what to check, in a few words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate is not trusted ({exc.verify_message}):"
                " check mqtt.tls_ca and mqtt.tls_check_hostname")  # fmt: skip
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}): check the broker's TLS listener"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror}): check mqtt.host"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: is the broker running, and is mqtt.port its port?"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out: the broker's host does not answer (address, firewall)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


class PublishHandle:
    """Tracks one publish; `wait` blocks until the broker has it (QoS 1: PUBACK)."""

    __slots__ = ("_info",)

    def __init__(self, info: paho.MQTTMessageInfo) -> None:
        self._info = info

    @property
    def mid(self) -> int:
        """The MQTT message id."""
        return int(self._info.mid)

    def done(self) -> bool:
        """True once the message has been handed to (QoS 0) or acknowledged by the broker."""
        return bool(self._info.is_published())

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True when published, False on timeout."""
        try:
            self._info.wait_for_publish(timeout)
        except (ValueError, RuntimeError) as exc:
            raise PublishError(str(exc)) from exc
        return self.done()


MessageCallback = Callable[[InboundMessage], None]
ConnectionCallback = Callable[[bool], None]


class MqttClient:
    """A reconnecting MQTT client; start with `start`, end with `stop`."""

    def __init__(
        self,
        settings: MqttSettings,
        on_message: MessageCallback,
        on_connection: ConnectionCallback | None = None,
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self._on_connection = on_connection
        self._subscriptions: dict[str, int] = {}
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._last_error = ""
        self._failures = 0  # connection attempts failed since the last success
        self._failure_logged_at = -math.inf
        self._up_since = -math.inf  # when the current session began
        self._short_sessions = 0  # sessions in a row that ended within STABLE_S
        self._takeover_logged_at = -math.inf
        self._stopping = False
        self._client = self._make_client()

    # --- setup -------------------------------------------------------------------------
    def _make_client(self) -> paho.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else not s.persistent_session,
        )
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set(
                ca_certs=s.tls.ca_file,
                certfile=s.tls.cert_file,
                keyfile=s.tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(not s.tls.check_hostname)
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(s.max_queued)
        client.connect_timeout = s.connect_timeout_s
        self._jitter_backoff(client)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        return client

    def _jitter_backoff(self, client: paho.Client) -> None:
        # paho doubles the delay from min to max, back to min after a CONNACK; a random
        # first delay spreads a fleet out. Set when connected, never on a disconnect: that
        # would reset the doubling, and a broker that refuses CONNECT (a wrong password)
        # would be asked again every half second, for ever.
        s = self.settings
        first = s.reconnect_min_s * random.uniform(0.5, 1.5)
        # paho annotates the delays as int but computes with them as seconds; floats are fine.
        client.reconnect_delay_set(first, max(first, s.reconnect_max_s))  # type: ignore[arg-type]

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Begin connecting in the background; reconnects until `stop`."""
        s = self.settings
        props = None
        clean_start: bool = not s.persistent_session
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry_s if s.persistent_session else 0
        self._client.connect_async(
            s.host, s.port, s.keepalive, clean_start=clean_start, properties=props
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; raise ConnectError after `timeout` seconds."""
        if not self._connected.wait(timeout):
            detail = f": {self._last_error}" if self._last_error else ""
            raise ConnectError(
                f"not connected to {self.settings.host}:{self.settings.port} "
                f"after {timeout:.1f}s{detail}"
            )

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up."""
        return self._connected.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker discards our Will) and stop the network thread."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        if self._connected.is_set():
            self._client.disconnect()
            while self._connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        sock = self._client.socket()
        if self._connected.is_set() and isinstance(sock, socket.socket):
            # DISCONNECT could not be sent in time (a link gone silent, a full send
            # buffer): close the socket, or the network thread waits out the keepalive
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._client.loop_stop()
        # paho's loop_start opens a socket pair (its wake-up line) that loop_stop leaves
        # open: closed here, with the connection's socket, or each client leaks two sockets
        with contextlib.suppress(OSError):
            self._client._reset_sockets()

    # --- traffic -----------------------------------------------------------------------
    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected and again after every reconnect."""
        with self._lock:  # (with the connect handler's copy: in its batch, or sent here)
            self._subscriptions[topic_filter] = qos
            connected = self._connected.is_set()
        if connected:
            self._client.subscribe(topic_filter, qos)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        *,
        response_topic: str = "",
        correlation: bytes = b"",
    ) -> PublishHandle:
        """Queue `payload` for `topic`; QoS 1 survives reconnects, QoS 0 offline raises.

        With MQTT 5, `response_topic` and `correlation` travel as the message's Response
        Topic and Correlation Data (request/response); MQTT 3.1.1 has no place for them."""
        properties = None
        if (response_topic or correlation) and self.settings.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation:
                properties.CorrelationData = correlation
        try:
            info = self._client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )
        except ValueError as exc:  # bad topic, QoS or payload type
            raise PublishError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise PublishError(
                f"outgoing queue full ({self.settings.max_queued} messages): "
                "the broker is not keeping up"
            )
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                raise NotConnectedError(f"not connected; QoS 0 message to {topic} dropped")
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS  # queued by paho; sent after reconnect
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return PublishHandle(info)

    # --- paho callbacks (network thread) -----------------------------------------------
    def _handle_connect(self, client: paho.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._last_error = f"broker refused the connection: {rc}"
            log.warning(
                "MQTT connect to %s:%s refused: %s", self.settings.host, self.settings.port, rc
            )
            return
        self._last_error = ""
        self._failures, self._failure_logged_at = 0, -math.inf  # the next failure is logged
        self._up_since = time.monotonic()  # (the back-off is reset once it proves stable)
        with self._lock:  # a subscribe() after this copy sees the session up and sends itself
            subs = list(self._subscriptions.items())
            self._connected.set()
        if subs:
            client.subscribe(subs)
        log.info(
            "MQTT connected to %s:%s (session present: %s)",
            self.settings.host,
            self.settings.port,
            bool(getattr(flags, "session_present", False)),
        )
        self._notify(True)

    def _handle_connect_fail(self, client: paho.Client, _u: Any) -> None:
        # paho calls this from inside its `except OSError`: the exception says why
        cause = sys.exc_info()[1]
        why = _connect_failure(cause) if cause is not None else "connection attempt failed"
        self._last_error = why
        now = time.monotonic()
        self._failures += 1
        if now - self._failure_logged_at < FAILURE_LOG_EVERY_S:
            log.debug("MQTT connection to %s:%s failed: %s", self.settings.host,
                      self.settings.port, why)  # fmt: skip
            return
        self._failure_logged_at = now
        log.warning("MQTT cannot connect to %s:%s (%d attempt(s) so far): %s; retrying",
                    self.settings.host, self.settings.port, self._failures, why)  # fmt: skip

    def _handle_disconnect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if not self._stopping:
            self._last_error = f"disconnected: {rc}"
            if was_connected:
                log.warning("MQTT connection lost (%s); reconnecting", rc)
                self._pace_reconnect(client)
        if was_connected:
            self._notify(False)

    def _pace_reconnect(self, client: paho.Client) -> None:
        """After a session that lasted, reconnect from a new random delay; after one that
        ended within `STABLE_S` (another client taking the same id over, say), keep doubling
        the delay, and say so when it keeps happening."""
        now = time.monotonic()
        if now - self._up_since >= STABLE_S:
            self._short_sessions = 0
            self._jitter_backoff(client)
            return
        self._short_sessions += 1
        s = self.settings
        delay = min(s.reconnect_max_s, s.reconnect_min_s * 2.0**self._short_sessions)
        delay *= random.uniform(0.75, 1.25)
        client.reconnect_delay_set(delay, max(delay, s.reconnect_max_s))  # type: ignore[arg-type]
        if self._short_sessions >= 3 and now - self._takeover_logged_at >= FAILURE_LOG_EVERY_S:
            self._takeover_logged_at = now
            log.error(
                "MQTT sessions to %s:%s keep ending within seconds (%d in a row): another"
                " client using the id %r takes them over? (two devices with one device_id);"
                " waiting %.0f s before the next try", s.host, s.port, self._short_sessions,
                s.client_id, delay,
            )  # fmt: skip

    def _handle_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        message = InboundMessage(
            msg.topic,
            bytes(msg.payload),
            int(msg.qos),
            bool(msg.retain),
            response_topic=str(getattr(props, "ResponseTopic", "") or ""),
            correlation=bytes(getattr(props, "CorrelationData", b"") or b""),
        )
        try:
            self._on_message(message)
        except Exception:  # a callback bug must not kill the network thread
            log.exception("message handler failed on %s", msg.topic)

    def _notify(self, up: bool) -> None:
        if self._on_connection is None:
            return
        try:
            self._on_connection(up)
        except Exception:
            log.exception("connection handler failed")
