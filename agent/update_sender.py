"""Updates out of the durable outbox: the first copy, and re-sends until acknowledged.

An update not acknowledged is sent again after `RESEND_AFTER_S`, then twice as long, up to
the outbox's cap (`agent.outbox`), with jitter; never while the MQTT client still holds the
last copy unsent (it sends that itself, after a reconnect too), so a slow link or an
absent coordinator piles up no copies. Hearing from the coordinator (an ack, a task)
forgets the back-off: what waits goes at once.
"""

from __future__ import annotations

import time

from agent.blob_fetch import Publisher  # (`publish` gives a handle: `done()` once sent)
from agent.outbox import Outbox

#: Seconds before an unacknowledged update is first sent again (then twice as long, ...).
RESEND_AFTER_S = 10.0
#: Seconds a copy still queued in the MQTT client holds back its resend at most.
QUEUED_HOLD_S = 3600.0


class UpdateSender:
    """Sends what the outbox holds (the learner thread sends; acks arrive on MQTT's)."""

    def __init__(self, outbox: Outbox, transport: Publisher) -> None:
        self.outbox = outbox
        self.transport = transport
        # outbox key -> (publish handle of its latest copy, when it was published)
        self.copies: dict[str, tuple[object, float]] = {}

    def send(self, key: str, topic: str, payload: bytes) -> None:
        """Send a message just put in the outbox (if connected; else it is due later)."""
        if self.transport.connected:
            self.outbox.mark_sent(key)
            self._publish(key, topic, payload)

    def resend_due(self) -> None:
        """Send again what is due and not still queued in the MQTT client."""
        if not self.transport.connected:
            return
        for pending in self.outbox.due(RESEND_AFTER_S, skip=self._still_queued()):
            self._publish(pending.key, pending.topic, pending.payload)

    def acked(self, key: str) -> None:
        """The coordinator answered `key`: forget it, and hurry the rest."""
        self.outbox.ack(key)
        self.copies.pop(key, None)
        self.heard_from_coordinator()

    def heard_from_coordinator(self) -> None:
        """The coordinator is there: what waits out a back-off goes at the next pass."""
        self.outbox.hurry(RESEND_AFTER_S)

    def _publish(self, key: str, topic: str, payload: bytes) -> None:
        self.copies[key] = (self.transport.publish(topic, payload, qos=1), time.monotonic())

    def _still_queued(self) -> set[str]:
        """Keys whose last copy the MQTT client still holds, not yet taken by the broker."""
        queued = set()
        now = time.monotonic()
        for key, (handle, sent) in list(self.copies.items()):
            done = getattr(handle, "done", None)
            if callable(done) and not done() and now - sent < QUEUED_HOLD_S:
                queued.add(key)
            else:
                self.copies.pop(key, None)
        return queued
