"""The learner thread outlives a failed publish (a full outgoing queue, say): it logs, and
asks again on its next pass, instead of ending and leaving blobs and updates unsent."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from agent import blob_fetch
from agent.learning import Learner
from agent.trust import ManifestTrust
from protocols.mqtt import PublishError


class _FlakyTransport:
    """Refuses the first blob request, as a full outgoing queue would."""

    connected = True

    def __init__(self) -> None:
        self.failed = False
        self.published: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        if not self.failed and topic.endswith("blob/req"):
            self.failed = True
            raise PublishError("outgoing queue full (1000 messages)")
        self.published.append(topic)
        return None

    def subscribe(self, topic: str, qos: int = 1) -> None:
        pass


def test_a_failed_publish_does_not_end_the_learner_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blob_fetch, "FETCH_RETRY_S", 0.05)
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    wire = _FlakyTransport()
    learner = Learner("dev-1", tmp_path, tmp_path / "data", wire, 1 << 20,  # type: ignore[arg-type]
                      ManifestTrust((), tmp_path))  # fmt: skip
    learner.fetches.want(hashlib.sha256(b"x").hexdigest())
    learner.start()
    try:
        deadline = time.monotonic() + 10
        while "fedge/v1/dev/dev-1/blob/req" not in wire.published:
            assert time.monotonic() < deadline, "the blob was never asked for again"
            time.sleep(0.05)
        assert wire.failed
        assert learner._thread.is_alive()
        assert escaped == []
    finally:
        learner.stop()
