"""A durable outbox: messages that must reach the coordinator survive restarts and outages.

A bounded SQLite (WAL) queue. `put` stores a message under a unique key before it is sent;
`ack` removes it when the coordinator acknowledges that key; `due` lists what to (re)send.
Limits: at most `max_bytes` in total and `max_age_s` per message. Drop policy, stated:
when a new message does not fit, the oldest messages are dropped first (and counted);
a message older than `max_age_s` is dropped (and counted) instead of being sent.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT NOT NULL UNIQUE,
    topic     TEXT NOT NULL,
    payload   BLOB NOT NULL,
    created   REAL NOT NULL,
    last_sent REAL NOT NULL DEFAULT 0,
    attempts  INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True, slots=True)
class Pending:
    """A message waiting for its acknowledgement."""

    key: str
    topic: str
    payload: bytes
    attempts: int


class Outbox:
    """The queue; thread-safe for one process (one connection, serialized)."""

    def __init__(
        self, path: Path, max_bytes: int = 64 * 1024 * 1024, max_age_s: float = 7 * 86400
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an enqueued update survives power loss
        self._db.executescript(_SCHEMA)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.dropped = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def put(self, key: str, topic: str, payload: bytes) -> bool:
        """Store a message (idempotent per key); False if it is larger than the whole outbox."""
        if len(payload) > self.max_bytes:
            self.dropped += 1
            return False
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM outbox WHERE key = ?", (key,)).fetchone():
                    self._db.execute("COMMIT")
                    return True  # already queued: nothing to do, nothing to evict
                self._make_room(len(payload))
                self._db.execute(
                    "INSERT OR IGNORE INTO outbox (key, topic, payload, created) "
                    "VALUES (?, ?, ?, ?)",
                    (key, topic, payload, time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def _make_room(self, incoming: int) -> None:
        total = self._db.execute("SELECT COALESCE(SUM(length(payload)), 0) FROM outbox").fetchone()[
            0
        ]
        while total + incoming > self.max_bytes:
            row = self._db.execute(
                "SELECT id, length(payload) FROM outbox ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
            self.dropped += 1
            total -= row[1]

    def ack(self, key: str) -> bool:
        """Forget the message under `key`; True if it was pending."""
        with self._lock:
            cur = self._db.execute("DELETE FROM outbox WHERE key = ?", (key,))
        return cur.rowcount > 0

    def due(self, resend_after_s: float, now: float | None = None) -> list[Pending]:
        """Messages never sent or not acknowledged within `resend_after_s`, oldest first;
        marks them sent. Expired ones are dropped and counted."""
        now = time.time() if now is None else now
        with self._lock:
            expired = self._db.execute(
                "DELETE FROM outbox WHERE created < ?", (now - self.max_age_s,)
            ).rowcount
            self.dropped += max(0, expired)
            rows = self._db.execute(
                "SELECT key, topic, payload, attempts FROM outbox WHERE last_sent <= ? ORDER BY id",
                (now - resend_after_s,),
            ).fetchall()
            self._db.executemany(
                "UPDATE outbox SET last_sent = ?, attempts = attempts + 1 WHERE key = ?",
                [(now, row[0]) for row in rows],
            )
        return [Pending(row[0], row[1], bytes(row[2]), int(row[3]) + 1) for row in rows]

    def mark_sent(self, key: str) -> None:
        """Record that the message under `key` was just sent."""
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET last_sent = ?, attempts = attempts + 1 WHERE key = ?",
                (time.time(), key),
            )

    def reset_sent(self) -> None:
        """Mark everything unsent (after a reconnect, resend at once)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET last_sent = 0")

    def depth(self) -> int:
        """Messages waiting."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
