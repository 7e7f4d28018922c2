"""Jobs, rounds and received updates in SQLite, so a job resumes after a restart.

An update is written here (and committed) before the coordinator acknowledges it; after a
crash the round's stored updates are folded in again and the round carries on.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_coordinator.job_spec import JobSpec
from cloud_coordinator.sqlite_db import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id          TEXT PRIMARY KEY,
    spec            TEXT NOT NULL,
    state           TEXT NOT NULL,
    created         REAL NOT NULL,
    current_round   INTEGER NOT NULL DEFAULT 0,
    current_version TEXT NOT NULL DEFAULT '',
    message         TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id      TEXT NOT NULL,
    round       INTEGER NOT NULL,
    state       TEXT NOT NULL,
    base_version TEXT NOT NULL,
    new_version TEXT NOT NULL DEFAULT '',
    selected    TEXT NOT NULL,
    started     REAL NOT NULL,
    deadline    REAL NOT NULL,
    closed      REAL,
    metrics     TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS updates (
    job_id       TEXT NOT NULL,
    round        INTEGER NOT NULL,
    device_id    TEXT NOT NULL,
    base_version TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    received     REAL NOT NULL,
    num_samples  INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    payload      BLOB NOT NULL,
    PRIMARY KEY (job_id, round, device_id)
);
CREATE INDEX IF NOT EXISTS updates_by_key ON updates (job_id, device_id, seq);
CREATE TABLE IF NOT EXISTS optimiser_state (
    job_id  TEXT PRIMARY KEY,
    round   INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job and where it stands."""

    spec: JobSpec
    state: str
    created: float
    current_round: int
    current_version: str
    message: str


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round of a job."""

    job_id: str
    round: int
    state: str
    base_version: str
    new_version: str
    selected: tuple[str, ...]
    started: float
    deadline: float
    closed: float | None
    metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoredUpdate:
    """An update as received, for replay after a restart."""

    device_id: str
    seq: int
    num_samples: int
    payload: bytes


class JobStore:
    """Read-write access to jobs; thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_db(path, _SCHEMA, "the job store")  # (acknowledged updates: synced)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # --- jobs --------------------------------------------------------------------------
    def create_job(self, spec: JobSpec, initial_version: str) -> bool:
        """Store a new running job; False if a job with that id exists."""
        with self._lock, self._db:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, spec, state, created, current_version) "
                "VALUES (?, ?, 'running', ?, ?)",
                (spec.job_id, json.dumps(spec.to_json()), time.time(), initial_version),
            )
            return cur.rowcount == 1

    def set_job(self, job_id: str, **fields: object) -> None:
        """Update a job's state, current_round, current_version or message."""
        allowed = {"state", "current_round", "current_version", "message"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"set_job takes {sorted(allowed)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock, self._db:
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE job_id = ?",
                (*fields.values(), job_id),
            )

    def _job(self, row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            JobSpec.from_json(json.loads(row["spec"])),
            row["state"],
            row["created"],
            row["current_round"],
            row["current_version"],
            row["message"],
        )

    def job(self, job_id: str) -> JobRecord | None:
        """One job, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def jobs(self, state: str | None = None) -> list[JobRecord]:
        """All jobs (optionally in one state), oldest first."""
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE state = ? ORDER BY created", (state,)
                ).fetchall()
        return [self._job(row) for row in rows]

    # --- rounds ------------------------------------------------------------------------
    def start_round(
        self,
        job_id: str,
        round_no: int,
        base_version: str,
        selected: list[str],
        deadline: float,
        keep_updates: bool = False,
    ) -> None:
        """Record a round in the selecting state, replacing a failed attempt of it (and its
        updates, unless `keep_updates`: those stored ahead for it are kept)."""
        with self._lock, self._db:
            if not keep_updates:
                self._db.execute(
                    "DELETE FROM updates WHERE job_id = ? AND round = ?", (job_id, round_no)
                )
            self._db.execute(
                "INSERT OR REPLACE INTO rounds (job_id, round, state, base_version, selected, "
                "started, deadline) VALUES (?, ?, 'selecting', ?, ?, ?, ?)",
                (job_id, round_no, base_version, json.dumps(selected), time.time(), deadline),
            )
            self._db.execute(
                "UPDATE jobs SET current_round = ? WHERE job_id = ?", (round_no, job_id)
            )

    def set_round(self, job_id: str, round_no: int, state: str, **extra: object) -> None:
        """Move a round to `state`; optionally set new_version, closed and metrics."""
        sets = ["state = ?"]
        values: list[object] = [state]
        for name in ("new_version", "closed"):
            if name in extra:
                sets.append(f"{name} = ?")
                values.append(extra[name])
        if "metrics" in extra:
            sets.append("metrics = ?")
            values.append(json.dumps(extra["metrics"]))
        with self._lock, self._db:
            self._db.execute(
                f"UPDATE rounds SET {', '.join(sets)} WHERE job_id = ? AND round = ?",
                (*values, job_id, round_no),
            )

    def set_round_selected(self, job_id: str, round_no: int, selected: list[str]) -> None:
        """Replace the devices recorded as tasked in a round."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE rounds SET selected = ? WHERE job_id = ? AND round = ?",
                (json.dumps(selected), job_id, round_no),
            )

    def finish_round(
        self,
        job_id: str,
        round_no: int,
        new_version: str,
        metrics: dict[str, Any],
        optimiser_state: bytes | None = None,
    ) -> None:
        """Mark a round done and make its version the job's current one (and store the
        server optimiser's state after it), atomically.

        The round's update payloads are dropped with it: the version holds what they
        brought, and only an unfinished round is ever replayed. Their rows stay (a device
        re-sending one is told it was a duplicate), so the store grows by a row per update,
        not by every update's tensors.
        """
        with self._lock, self._db:
            self._db.execute(
                "UPDATE updates SET payload = X'' WHERE job_id = ? AND round = ?",
                (job_id, round_no),
            )
            if optimiser_state is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO optimiser_state (job_id, round, payload) "
                    "VALUES (?, ?, ?)",
                    (job_id, round_no, optimiser_state),
                )
            self._db.execute(
                "UPDATE rounds SET state = 'done', new_version = ?, closed = ?, metrics = ? "
                "WHERE job_id = ? AND round = ?",
                (new_version, time.time(), json.dumps(metrics), job_id, round_no),
            )
            self._db.execute(
                "UPDATE jobs SET current_version = ? WHERE job_id = ?", (new_version, job_id)
            )

    def round(self, job_id: str, round_no: int) -> RoundRecord | None:
        """One round, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM rounds WHERE job_id = ? AND round = ?", (job_id, round_no)
            ).fetchone()
        return None if row is None else _round(row)

    def rounds(self, job_id: str) -> list[RoundRecord]:
        """Every round of a job, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM rounds WHERE job_id = ? ORDER BY round", (job_id,)
            ).fetchall()
        return [_round(row) for row in rows]

    # --- updates -----------------------------------------------------------------------
    def add_update(
        self,
        job_id: str,
        round_no: int,
        device_id: str,
        base_version: str,
        seq: int,
        num_samples: int,
        payload: bytes,
    ) -> str:
        """Store an update durably: ``new``, ``duplicate`` (same seq again) or ``conflict``."""
        with self._lock, self._db:
            row = self._db.execute(
                "SELECT seq, base_version FROM updates WHERE job_id = ? AND round = ? "
                "AND device_id = ?",
                (job_id, round_no, device_id),
            ).fetchone()
            if row is not None:
                same = row["seq"] == seq and row["base_version"] == base_version
                return "duplicate" if same else "conflict"
            self._db.execute(
                "INSERT INTO updates (job_id, round, device_id, base_version, seq, received, "
                "num_samples, bytes, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, round_no, device_id, base_version, seq, time.time(), num_samples,
                 len(payload), payload),
            )  # fmt: skip
            return "new"

    def optimiser_state(self, job_id: str) -> bytes | None:
        """The server optimiser's state after the job's latest finished round, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM optimiser_state WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else bytes(row["payload"])

    def delete_update(self, job_id: str, round_no: int, device_id: str) -> None:
        """Forget a stored update (one the aggregate refused after it was written)."""
        with self._lock, self._db:
            self._db.execute(
                "DELETE FROM updates WHERE job_id = ? AND round = ? AND device_id = ?",
                (job_id, round_no, device_id),
            )

    def stored_round(self, job_id: str, device_id: str, base_version: str, seq: int) -> int | None:
        """The round an update with this key was stored under, or None if it never was."""
        with self._lock:
            row = self._db.execute(
                "SELECT round FROM updates WHERE job_id = ? AND device_id = ? AND seq = ? "
                "AND base_version = ?",
                (job_id, device_id, seq, base_version),
            ).fetchone()
        return None if row is None else int(row["round"])

    def updates(self, job_id: str, round_no: int) -> list[StoredUpdate]:
        """A round's stored updates, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, seq, num_samples, payload FROM updates "
                "WHERE job_id = ? AND round = ? ORDER BY received",
                (job_id, round_no),
            ).fetchall()
        return [
            StoredUpdate(r["device_id"], r["seq"], r["num_samples"], bytes(r["payload"]))
            for r in rows
        ]


def _round(row: sqlite3.Row) -> RoundRecord:
    return RoundRecord(
        row["job_id"],
        row["round"],
        row["state"],
        row["base_version"],
        row["new_version"],
        tuple(json.loads(row["selected"])),
        row["started"],
        row["deadline"],
        row["closed"],
        json.loads(row["metrics"]),
    )
