"""In-memory fakes of the seams the coordinator talks to, for component and contract tests."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from cloud_coordinator.ingest import DeviceStore
from cloud_coordinator.registry import DeviceRecord, Registry
from protocols.messages import ONLINE, Status, Telemetry


class InspectableStore(DeviceStore, Protocol):
    """A `DeviceStore` a test can read back (both the fake and the real registry are)."""

    def devices(self) -> list[DeviceRecord]:
        """All devices, by id."""
        ...

    def rejections(self) -> dict[tuple[str, str], int]:
        """Rejection counts by (channel, reason)."""
        ...


@dataclass
class _Row:
    record: DeviceRecord
    session_ts: float = 0.0


@dataclass
class FakeStore:
    """A `DeviceStore` in a dict, with the registry's rules: sessions ordered by status ts."""

    rows: dict[str, _Row] = field(default_factory=dict)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def touch(self, device_id: str, now: float) -> None:
        """Note that a device was heard from (first_seen once, last_seen never goes back)."""
        row = self.rows.get(device_id)
        if row is None:
            self.rows[device_id] = _Row(
                DeviceRecord(device_id, now, now, False, None, "", "", None, {})
            )
        else:
            row.record = replace(row.record, last_seen=max(row.record.last_seen, now))

    def apply_status(self, status: Status, now: float) -> bool:
        """Record presence; False if the status is from an older session."""
        self.touch(status.device_id, now)
        row = self.rows[status.device_id]
        if status.ts < row.session_ts:
            return False
        online = status.state == ONLINE
        changed = online != row.record.online or status.ts != row.session_ts
        row.session_ts = status.ts
        row.record = replace(
            row.record,
            online=online,
            status_changed=now if changed else row.record.status_changed,
            status_reason=status.reason,
            agent_version=status.agent_version or row.record.agent_version,
        )
        return True

    def record_telemetry(self, telemetry: Telemetry, now: float) -> None:
        """Keep the latest telemetry."""
        self.touch(telemetry.device_id, now)
        row = self.rows[telemetry.device_id]
        fields: dict[str, Any] = {
            "ts": telemetry.ts,
            "seq": telemetry.seq,
            "uptime_s": telemetry.uptime_s,
            "cpu_percent": telemetry.cpu_percent,
            "mem_rss_bytes": telemetry.mem_rss_bytes,
            "mem_available_bytes": telemetry.mem_available_bytes,
            "load1": telemetry.load1,
            "queue_depth": telemetry.queue_depth,
            **{f"extra.{k}": v for k, v in telemetry.extra.items()},
        }
        row.record = replace(
            row.record,
            telemetry=fields,
            model_versions=dict(telemetry.model_versions),
            agent_version=telemetry.agent_version or row.record.agent_version,
        )

    def count_rejection(self, channel: str, reason: str, n: int = 1) -> None:
        """Add `n` to the (channel, reason) counter."""
        self.counts[(channel, reason)] += n

    def devices(self) -> list[DeviceRecord]:
        """All devices, by id (same shape as `Registry.devices`)."""
        return [self.rows[k].record for k in sorted(self.rows)]

    def rejections(self) -> dict[tuple[str, str], int]:
        """Rejection counts by (channel, reason) (same shape as `Registry.rejections`)."""
        return {k: self.counts[k] for k in sorted(self.counts)}


def _satisfies_the_protocols(fake: FakeStore, registry: Registry) -> list[InspectableStore]:
    return [fake, registry]  # mypy checks that both implement the Protocol
