"""The device registry and rejection counters, kept in SQLite (WAL) so they survive restarts.

One `Registry` object writes (from the coordinator's single ingest thread); readers (the CLI,
the HTTP API) open their own read-only connection with `read_devices` / `read_rejections`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_coordinator.errors import StoreError
from protocols.messages import ONLINE, Status, Telemetry

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id      TEXT PRIMARY KEY,
    first_seen     REAL NOT NULL,
    last_seen      REAL NOT NULL,
    online         INTEGER NOT NULL DEFAULT 0,
    session_ts     REAL NOT NULL DEFAULT 0,
    status_changed REAL,
    status_reason  TEXT NOT NULL DEFAULT '',
    agent_version  TEXT NOT NULL DEFAULT '',
    telemetry      TEXT,
    telemetry_ts   REAL,
    model_versions TEXT NOT NULL DEFAULT '{}',
    fleet          TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rejections (
    channel TEXT NOT NULL,
    reason  TEXT NOT NULL,
    count   INTEGER NOT NULL,
    last_at REAL NOT NULL,
    PRIMARY KEY (channel, reason)
);
"""


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """What the registry knows about one device."""

    device_id: str
    first_seen: float
    last_seen: float
    online: bool
    status_changed: float | None
    status_reason: str
    agent_version: str
    telemetry: dict[str, Any] | None
    model_versions: dict[str, str]
    fleet: str = ""

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "device_id": self.device_id,
            "state": "online" if self.online else "offline",
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "status_changed": self.status_changed,
            "status_reason": self.status_reason,
            "agent_version": self.agent_version,
            "telemetry": self.telemetry,
            "model_versions": self.model_versions,
            "fleet": self.fleet,
        }


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    try:
        if readonly:
            conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot open the state database {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    return conn


class Registry:
    """Read-write access to the registry; use from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = _connect(path, readonly=False)
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._db.close()
            raise StoreError(
                f"{path} has schema version {version}; this coordinator knows {SCHEMA_VERSION}. "
                "Upgrade fedge or point --data-dir elsewhere."
            )
        with self._db:
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(devices)")}
            if "fleet" not in columns:  # schema 1 (before rollouts): add the device's group
                self._db.execute("ALTER TABLE devices ADD COLUMN fleet TEXT NOT NULL DEFAULT ''")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def _touch(self, device_id: str, now: float) -> None:
        self._db.execute(
            "INSERT INTO devices (device_id, first_seen, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
            (device_id, now, now),
        )

    def apply_status(self, status: Status, now: float) -> bool:
        """Record a presence change; False (nothing changed) if it is from an older session."""
        with self._db:
            self._touch(status.device_id, now)
            cur = self._db.execute(
                "UPDATE devices SET "
                "status_changed = CASE WHEN online != :online OR session_ts != :session "
                "  THEN :now ELSE status_changed END, "
                "online = :online, session_ts = :session, status_reason = :reason, "
                "agent_version = CASE WHEN :version != '' THEN :version ELSE agent_version END, "
                "fleet = CASE WHEN :fleet != '' THEN :fleet ELSE fleet END "
                "WHERE device_id = :device AND session_ts <= :session",
                {
                    "online": int(status.state == ONLINE),
                    "session": status.ts,
                    "now": now,
                    "reason": status.reason,
                    "version": status.agent_version,
                    "fleet": status.fleet,
                    "device": status.device_id,
                },
            )
            return cur.rowcount == 1

    def record_telemetry(self, telemetry: Telemetry, now: float) -> None:
        """Keep the latest telemetry of a device."""
        fields = {
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
        with self._db:
            self._touch(telemetry.device_id, now)
            self._db.execute(
                "UPDATE devices SET telemetry = ?, telemetry_ts = ?, model_versions = ?, "
                "agent_version = CASE WHEN ? != '' THEN ? ELSE agent_version END "
                "WHERE device_id = ?",
                (
                    json.dumps(fields),
                    now,
                    json.dumps(telemetry.model_versions),
                    telemetry.agent_version,
                    telemetry.agent_version,
                    telemetry.device_id,
                ),
            )

    def touch(self, device_id: str, now: float) -> None:
        """Note that a device was heard from."""
        with self._db:
            self._touch(device_id, now)

    def count_rejection(self, channel: str, reason: str, n: int = 1) -> None:
        """Add `n` to the rejection counter for (`channel`, `reason`)."""
        with self._db:
            self._db.execute(
                "INSERT INTO rejections (channel, reason, count, last_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(channel, reason) DO UPDATE SET count = count + excluded.count, "
                "last_at = excluded.last_at",
                (channel, reason, n, time.time()),
            )

    def devices(self) -> list[DeviceRecord]:
        """All devices, by id."""
        return _devices(self._db)

    def rejections(self) -> dict[tuple[str, str], int]:
        """Rejection counts by (channel, reason)."""
        return _rejections(self._db)


def _devices(
    db: sqlite3.Connection, limit: int | None = None, after: str = ""
) -> list[DeviceRecord]:
    rows = db.execute(
        "SELECT * FROM devices WHERE device_id > ? ORDER BY device_id LIMIT ?",
        (after, -1 if limit is None else limit),
    ).fetchall()
    return [
        DeviceRecord(
            device_id=row["device_id"],
            first_seen=row["first_seen"],
            last_seen=row["last_seen"],
            online=bool(row["online"]),
            status_changed=row["status_changed"],
            status_reason=row["status_reason"],
            agent_version=row["agent_version"],
            telemetry=json.loads(row["telemetry"]) if row["telemetry"] else None,
            model_versions=json.loads(row["model_versions"]),
            fleet=row["fleet"] if "fleet" in row.keys() else "",  # noqa: SIM118
        )
        for row in rows
    ]


def _rejections(db: sqlite3.Connection) -> dict[tuple[str, str], int]:
    rows = db.execute("SELECT channel, reason, count FROM rejections ORDER BY channel, reason")
    return {(row["channel"], row["reason"]): int(row["count"]) for row in rows}


def _read(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StoreError(
            f"no registry at {path}: has a coordinator run with this data directory? "
            "(set --data-dir or FEDGE_DATA_DIR)"
        )
    return _connect(path, readonly=True)


def read_devices(path: Path, limit: int | None = None, after: str = "") -> list[DeviceRecord]:
    """Devices in the registry at `path` by id, read without locking out the writer: all,
    or at most `limit` of those whose id sorts after `after` (a page)."""
    db = _read(path)
    try:
        return _devices(db, limit, after)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    finally:
        db.close()


def count_devices(path: Path) -> tuple[int, int]:
    """(online, all) devices in the registry at `path`, counted without reading them."""
    db = _read(path)
    try:
        online, total = db.execute(
            "SELECT COALESCE(SUM(online != 0), 0), COUNT(*) FROM devices"
        ).fetchone()
        return int(online), int(total)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    finally:
        db.close()


def read_rejections(path: Path) -> dict[tuple[str, str], int]:
    """Rejection counts in the registry at `path`."""
    db = _read(path)
    try:
        return _rejections(db)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    finally:
        db.close()
