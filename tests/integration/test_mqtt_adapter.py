"""The paho adapter against a real Mosquitto: delivery, offline queueing, TLS, mTLS and ACLs."""

from __future__ import annotations

import gc
import os
import queue
import signal
import threading
import time
from pathlib import Path

import pytest

from protocols.config import BrokerConfig
from protocols.mqtt import (
    ConnectError,
    InboundMessage,
    MqttClient,
    NotConnectedError,
    PublishError,
    settings_from_config,
)
from tests.broker import COORDINATOR_USER, Mosquitto
from tests.pki import TestCA

pytestmark = pytest.mark.integration


class Inbox:
    """Collects what a client receives."""

    def __init__(self) -> None:
        self.messages: queue.Queue[InboundMessage] = queue.Queue()

    def __call__(self, message: InboundMessage) -> None:
        self.messages.put(message)

    def get(self, timeout: float = 5.0) -> InboundMessage:
        return self.messages.get(timeout=timeout)

    def empty_for(self, seconds: float) -> bool:
        try:
            self.messages.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


def _client(
    config: BrokerConfig, name: str, inbox: Inbox | None = None, **kw: object
) -> MqttClient:
    settings = settings_from_config(config, name)
    if kw:
        from dataclasses import replace

        settings = replace(settings, **kw)  # type: ignore[arg-type]
    return MqttClient(settings, inbox or Inbox())


def test_publish_and_receive(mosquitto: Mosquitto) -> None:
    inbox = Inbox()
    sub = _client(mosquitto.broker_config(), "sub", inbox)
    sub.subscribe("t/#", qos=1)
    pub = _client(mosquitto.broker_config(), "pub")
    for c in (sub, pub):
        c.start()
        c.wait_connected(5)
    try:
        assert pub.publish("t/a", b"\x00hello", qos=1).wait(5)
        message = inbox.get()
        assert (message.topic, message.payload, message.qos) == ("t/a", b"\x00hello", 1)
    finally:
        pub.stop()
        sub.stop()


def test_stop_closes_every_socket_the_client_opened(mosquitto: Mosquitto) -> None:
    # paho's loop_stop leaves open the socket pair loop_start made (its wake-up line)
    before = _open_sockets()
    client = _client(mosquitto.broker_config(), "closer")
    client.start()
    client.wait_connected(5)
    assert len(_open_sockets() - before) >= 3  # the connection and the pair
    client.stop()
    assert _open_sockets() - before == set()


def _open_sockets() -> set[str]:
    """The inodes of this process's open sockets."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (closed meanwhile: the listing's own descriptor, say)
            continue
        if link.startswith("socket:"):
            found.add(link)
    return found


def test_qos1_published_offline_is_delivered_after_reconnect(mosquitto: Mosquitto) -> None:
    pub = _client(mosquitto.broker_config(), "pub", reconnect_min_s=1.0)
    pub.start()
    pub.wait_connected(5)
    mosquitto.stop()
    deadline = time.monotonic() + 5
    while pub.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pub.connected
    with pytest.raises(NotConnectedError):
        pub.publish("t/q0", b"lost", qos=0)
    handle = pub.publish("t/q1", b"kept", qos=1)
    assert not handle.done()
    mosquitto.start()
    inbox = Inbox()
    sub = _client(mosquitto.broker_config(), "sub", inbox)
    sub.subscribe("t/#", qos=1)
    sub.start()
    try:
        sub.wait_connected(5)
        assert handle.wait(15)
        message = inbox.get(10)
        assert (message.topic, message.payload) == ("t/q1", b"kept")
    finally:
        pub.stop()
        sub.stop()


def test_bounded_queue_raises_instead_of_growing(mosquitto: Mosquitto) -> None:
    config = mosquitto.broker_config(port=mosquitto.port)
    client = _client(config, "bounded", max_queued=2)
    mosquitto.stop()
    client.start()  # never connects: every QoS 1 message waits in the bounded queue
    try:
        client.publish("t/1", b"1", qos=1)
        client.publish("t/2", b"2", qos=1)
        with pytest.raises(PublishError, match="queue full"):
            client.publish("t/3", b"3", qos=1)
        with pytest.raises(PublishError, match="cannot publish"):
            client.publish("t/#", b"x", qos=1)
    finally:
        client.stop(timeout=1)


def test_mutual_tls_and_acls(mosquitto: Mosquitto) -> None:
    inbox = Inbox()
    coordinator = _client(mosquitto.tls_config(COORDINATOR_USER), COORDINATOR_USER, inbox)
    coordinator.subscribe("fedge/v1/dev/+/status", qos=1)
    device = _client(mosquitto.tls_config("dev-x"), "dev-x")
    for c in (coordinator, device):
        c.start()
        c.wait_connected(5)
    try:
        device.publish("fedge/v1/dev/dev-x/status", b"mine", qos=1).wait(5)
        assert inbox.get().topic == "fedge/v1/dev/dev-x/status"
        # the broker's ACL keeps a device out of another device's topics
        device.publish("fedge/v1/dev/dev-y/status", b"forged", qos=1).wait(5)
        assert inbox.empty_for(1.0)
    finally:
        device.stop()
        coordinator.stop()


def test_tls_rejects_unknown_ca_and_missing_client_cert(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    stranger = TestCA(tmp_path / "other-ca").issue("dev-s")
    bad_cert = mosquitto.tls_config("dev-s", tls_cert=str(stranger.cert), tls_key=str(stranger.key))
    no_cert = BrokerConfig(
        host=mosquitto.host, port=mosquitto.tls_port, tls_ca=str(mosquitto.ca.ca_file)
    )
    for config in (bad_cert, no_cert):
        client = _client(config, "intruder")
        client.start()
        try:
            with pytest.raises(ConnectError):
                client.wait_connected(2)
        finally:
            client.stop(timeout=1)


# paho leaves the socket of a failed TLS handshake to the garbage collector
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_broker_certificate_this_side_does_not_trust_is_named_as_the_cause(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = TestCA(tmp_path / "other-ca")
    config = BrokerConfig(host=mosquitto.host, port=mosquitto.tls_port, tls_ca=str(other.ca_file))
    client = _client(config, "wrong-ca")
    with caplog.at_level("WARNING", logger="protocols.mqtt"):
        client.start()
        try:
            with pytest.raises(ConnectError, match="certificate is not trusted"):
                client.wait_connected(3)
        finally:
            client.stop(timeout=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"cannot connect to {mosquitto.host}:{mosquitto.tls_port}" in w
               and "check mqtt.tls_ca" in w for w in warnings), warnings  # fmt: skip


def test_stop_keeps_its_timeout_when_the_broker_goes_silent_mid_upload(
    mosquitto: Mosquitto,
) -> None:
    """A frozen broker (SIGSTOP) under a large upload: DISCONNECT cannot be sent. stop()
    used to wait out the keepalive (60 s here) in paho's thread; systemd gives 20 s."""
    client = _client(mosquitto.broker_config(), "silent", keepalive=60)
    client.start()
    client.wait_connected(5)
    assert mosquitto.process is not None
    os.kill(mosquitto.process.pid, signal.SIGSTOP)
    try:
        for n in range(3):  # more than the socket buffers hold
            client.publish(f"t/big{n}", bytes(8 << 20), qos=1)
        stopper = threading.Thread(target=client.stop, args=(2.0,), daemon=True)
        stopper.start()
        stopper.join(20)  # (a hang, not a speed: the old stop() took the 60-s keepalive)
        assert not stopper.is_alive()
    finally:
        os.kill(mosquitto.process.pid, signal.SIGCONT)


def _note(up: bool, ups: list[float]) -> None:
    if up:
        ups.append(time.monotonic())


# paho leaves the socket pair of each reconnect to the garbage collector: collected here
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_two_clients_with_one_id_back_off_and_say_why(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker drops the older session each time the other connects. Each used to be
    back within half a second, so the pair swapped about twice a second for ever."""
    ups: list[float] = []
    clients = []
    for _ in range(2):
        settings = settings_from_config(mosquitto.broker_config(), "dev-twin")
        clients.append(MqttClient(settings, Inbox(), on_connection=lambda up: _note(up, ups)))
    with caplog.at_level("ERROR", logger="protocols.mqtt"):
        for client in clients:
            client.start()
        try:
            time.sleep(12)
        finally:
            for client in clients:
                client.stop(timeout=2)
            clients.clear()
            gc.collect()  # (within this test, whose warnings filter covers them)
    assert len(ups) <= 12, len(ups)  # it was about 50 in 12 s
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("'dev-twin' takes them over" in e for e in errors), errors
