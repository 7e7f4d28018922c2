"""A durable outbox: messages that must reach the coordinator survive restarts and outages.

A bounded SQLite (WAL) queue. `put` stores a message under a unique key before it is sent;
`ack` removes it when the coordinator acknowledges that key; `due` lists what to (re)send.
A message not acknowledged is sent again after `resend_after_s`, then after twice that,
and so on up to `max_resend_s` (with jitter), so a coordinator that stays away is not
sent a copy of every update every few seconds. Limits: at most `max_bytes` in total and
`max_age_s` per message. Drop policy, stated: when a new message does not fit, the oldest
messages are dropped first; a message older than `max_age_s` is dropped instead of being
sent. Each drop is logged and counted, and the count survives restarts. A database file
that is not a readable SQLite database is set aside (``outbox.db.corrupt-<time>``) and a
new one started, so a damaged file cannot keep the agent (and its inference) down.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: The longest wait between two sends of one message (after repeated resends).
MAX_RESEND_S = 600.0

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
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
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
        self,
        path: Path,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 7 * 86400,
        max_resend_s: float = MAX_RESEND_S,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        #: Where a damaged database file was moved to when this outbox opened, if it was.
        self.set_aside: Path | None = None
        try:
            self._db = _open(path)
        except sqlite3.DatabaseError as exc:
            if not _is_damaged(exc):
                raise  # busy, full, read-only, an I/O error: the file is left as it is
            self.set_aside = _set_aside(path)
            log.error(
                "outbox %s is damaged (%s): moved to %s and started empty; updates it held"
                " are lost", path, exc, self.set_aside.name,
            )  # fmt: skip
            self._db = _open(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_resend_s = max_resend_s
        row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        self._dropped = int(row[0]) if row else 0
        self._lock = threading.Lock()

    @property
    def dropped(self) -> int:
        """Messages dropped unsent (evicted for room, expired, or too large), ever."""
        return self._dropped

    def _count_drops(self, keys: Collection[str], why: str) -> None:
        """Count and log dropped messages (inside the caller's transaction, if any)."""
        if not keys:
            return
        self._dropped += len(keys)
        self._db.execute(
            "INSERT OR REPLACE INTO counters (name, value) VALUES ('dropped', ?)",
            (self._dropped,),
        )
        log.warning("outbox: dropped %d unacknowledged message(s) (%s): %s", len(keys), why,
                    ", ".join(sorted(keys)[:10]) + (" ..." if len(keys) > 10 else ""))  # fmt: skip

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def put(self, key: str, topic: str, payload: bytes) -> bool:
        """Store a message (idempotent per key); False if it is larger than the whole outbox."""
        if len(payload) > self.max_bytes:
            with self._lock:
                self._count_drops([key], f"{len(payload)} bytes, more than the whole outbox")
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
                "SELECT id, length(payload), key FROM outbox ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
            self._count_drops([row[2]], "the oldest, to make room")
            total -= row[1]

    def ack(self, key: str) -> bool:
        """Forget the message under `key`; True if it was pending."""
        with self._lock:
            cur = self._db.execute("DELETE FROM outbox WHERE key = ?", (key,))
        return cur.rowcount > 0

    def due(
        self, resend_after_s: float, now: float | None = None, skip: Collection[str] = ()
    ) -> list[Pending]:
        """Messages never sent, or sent `attempts` times and not acknowledged within
        `resend_after_s` * 2 ** (attempts - 1) (at most `max_resend_s`, less up to a tenth
        of jitter), oldest first, except those under the keys in `skip`; marks them sent.
        Expired ones are dropped and counted."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cutoff = now - self.max_age_s  # (no RETURNING: SQLite 3.34 has none)
                expired = self._db.execute(
                    "SELECT key FROM outbox WHERE created < ?", (cutoff,)
                ).fetchall()
                self._db.execute("DELETE FROM outbox WHERE created < ?", (cutoff,))
                self._count_drops([k for (k,) in expired], f"older than {self.max_age_s:.0f} s")
                keys = [
                    key
                    for key, last_sent, attempts in self._db.execute(
                        "SELECT key, last_sent, attempts FROM outbox ORDER BY id"
                    )
                    if key not in skip
                    and now - last_sent >= self._wait(resend_after_s, int(attempts))
                ]
                self._db.executemany(
                    "UPDATE outbox SET last_sent = ?, attempts = attempts + 1 WHERE key = ?",
                    [(now, key) for key in keys],
                )
                rows = [
                    self._db.execute(
                        "SELECT key, topic, payload, attempts FROM outbox WHERE key = ?", (key,)
                    ).fetchone()
                    for key in keys
                ]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [Pending(row[0], row[1], bytes(row[2]), int(row[3])) for row in rows]

    def _wait(self, resend_after_s: float, attempts: int) -> float:
        if attempts <= 0:
            return 0.0
        backoff = resend_after_s * 2.0 ** min(attempts - 1, 40)
        return min(self.max_resend_s, backoff) * (0.9 + 0.1 * random.random())

    def mark_sent(self, key: str) -> None:
        """Record that the message under `key` was just sent."""
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET last_sent = ?, attempts = attempts + 1 WHERE key = ?",
                (time.time(), key),
            )

    def hurry(self, resend_after_s: float, now: float | None = None) -> None:
        """Forget the back-off: the coordinator was just heard from, so a message waiting
        (perhaps minutes) for its next send goes at the next `due` (then 10 s, 20 s, ...);
        one sent within `resend_after_s` is left alone (its copy may be on its way)."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET last_sent = 0, attempts = 0 WHERE attempts > 0"
                " AND last_sent <= ?",
                (now - resend_after_s,),
            )

    def reset_sent(self) -> None:
        """Mark everything unsent: after this agent's reconnect, resend at once (the number
        of attempts, and so the wait after this send, is kept)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET last_sent = 0")

    def depth(self) -> int:
        """Messages waiting."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


def _open(path: Path) -> sqlite3.Connection:
    """The outbox database at `path`, created if missing; sqlite3.DatabaseError if damaged."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an enqueued update survives power loss
        (check,) = db.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise _DamagedError(f"quick_check: {check}")
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


class _DamagedError(sqlite3.DatabaseError):
    """SQLite's own check found the database damaged."""


def _is_damaged(exc: sqlite3.DatabaseError) -> bool:
    """Whether the file is not a database, or a damaged one (not merely busy, full,
    read-only or unreadable, which a person can fix without losing its contents)."""
    name = str(getattr(exc, "sqlite_errorname", ""))
    return isinstance(exc, _DamagedError) or name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def _set_aside(path: Path) -> Path:
    """Move a damaged database (and its WAL files) out of the way; where it went."""
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            part.replace(Path(f"{target}{suffix}"))
    return target
