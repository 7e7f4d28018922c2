"""The adapter's reconnect back-off doubles even when the broker refuses each CONNECT.

The peer here is a stand-in for a broker that refuses every client (a wrong password): a
loopback listener answering each CONNECT with an MQTT 5 CONNACK "not authorized" and
closing. Before the fix every disconnect reset paho's delay, and a device asked again
about twice a second, for ever.
"""

from __future__ import annotations

import socket
import threading
import time

from cloud_coordinator.broker import free_port
from protocols.mqtt import MqttClient, MqttSettings

_NOT_AUTHORIZED = bytes((0x20, 0x03, 0x00, 0x87, 0x00))  # CONNACK, reason 0x87, no properties


def _refusing_broker(port: int, stop: threading.Event, attempts: list[float]) -> None:
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    if conn.recv(4096)[:1] == b"\x10":  # a CONNECT packet
                        attempts.append(time.monotonic())
                        conn.sendall(_NOT_AUTHORIZED)
                except OSError:
                    pass


def test_refused_connects_are_retried_with_doubling_delays() -> None:
    port, stop, attempts = free_port(), threading.Event(), []
    peer = threading.Thread(target=_refusing_broker, args=(port, stop, attempts), daemon=True)
    peer.start()
    settings = MqttSettings(port=port, client_id="dev-backoff", reconnect_min_s=0.05,
                            reconnect_max_s=30.0)  # fmt: skip
    client = MqttClient(settings, on_message=lambda m: None)
    client.start()
    try:
        time.sleep(2.5)
    finally:
        client.stop(1.0)
        stop.set()
        peer.join(5)
    # Delays doubling from 0.025-0.075 s: attempts at about 0, 0.05, 0.15, 0.35, 0.75,
    # 1.55 s, so 5 to 7 in 2.5 s; reset at every refusal, the delay stays at its minimum
    # and the client asks 30 to 100 times. (A slow machine only lowers the count.)
    assert 3 <= len(attempts) <= 10
