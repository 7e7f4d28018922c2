"""A subscription made while the adapter is setting up a connection is sent, not held back
until the next reconnect (the adapter's connect handler against a recording stand-in)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from protocols.mqtt import MqttClient, MqttSettings


class _Recording:
    """Stands in for paho's client: records subscriptions; `during` runs inside the first."""

    def __init__(self) -> None:
        self.subscribed: list[Any] = []
        self.during: Any = None

    def subscribe(self, topic: Any, qos: int = 0) -> tuple[int, int]:
        self.subscribed.append(topic)
        if self.during is not None:
            during, self.during = self.during, None
            during()  # another thread's subscribe() at this very moment
        return 0, 1

    def reconnect_delay_set(self, min_delay: float, max_delay: float) -> None:
        pass


def test_a_subscribe_during_the_connect_handler_is_not_lost() -> None:
    client = MqttClient(MqttSettings(client_id="dev-subs"), on_message=lambda m: None)
    fake = _Recording()
    client._client = fake  # type: ignore[assignment]
    client.subscribe("fedge/v1/dev/dev-subs/cmd", 1)  # before the session: kept for it
    assert fake.subscribed == []
    fake.during = lambda: client.subscribe("fedge/v1/model/m/manifest", 1)
    ok = SimpleNamespace(is_failure=False)
    client._handle_connect(fake, None, SimpleNamespace(session_present=False), ok, None)  # type: ignore[arg-type]
    assert fake.subscribed == [[("fedge/v1/dev/dev-subs/cmd", 1)], "fedge/v1/model/m/manifest"]
    assert client.connected
