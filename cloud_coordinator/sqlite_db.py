"""The coordinator's SQLite files: opened one way (WAL, full sync, the schema applied)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cloud_coordinator.errors import StoreError


def open_db(path: Path, schema: str, what: str) -> sqlite3.Connection:
    """`path` open for any thread, in WAL mode with every commit synced and `schema` applied;
    StoreError naming `what` (e.g. "the job store") if it cannot be."""
    try:
        db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {what} {path}: {exc}") from exc
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # what was acknowledged survives a power cut
        with db:
            db.executescript(schema)
    except sqlite3.Error as exc:
        db.close()
        raise StoreError(f"cannot open {what} {path}: {exc}") from exc
    return db
