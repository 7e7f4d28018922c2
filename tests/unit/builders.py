"""Valid wire messages for unit tests, with defaults a test overrides only where it matters."""

from __future__ import annotations

from typing import Any

from protocols.messages import ONLINE, Ack, Status, Telemetry


def status(device_id: str = "dev-1", state: str = ONLINE, ts: float = 100.0, **kw: Any) -> Status:
    """A presence message; `ts` is the session's start time."""
    return Status(device_id=device_id, state=state, ts=ts, **kw)


def telemetry(device_id: str = "dev-1", seq: int = 1, ts: float = 200.0, **kw: Any) -> Telemetry:
    """A health report with plausible numbers."""
    values: dict[str, Any] = {
        "uptime_s": 12.5,
        "cpu_percent": 7.5,
        "mem_rss_bytes": 40 * 2**20,
        "mem_available_bytes": 900 * 2**20,
    }
    values.update(kw)
    return Telemetry(device_id=device_id, ts=ts, seq=seq, **values)


def ack(ref: str = "cmd-1", ok: bool = True, ts: float = 300.0, **kw: Any) -> Ack:
    """An acknowledgement of a command."""
    return Ack(ref=ref, ok=ok, ts=ts, **kw)
