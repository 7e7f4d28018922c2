"""Deployments: what the coordinator publishes on a device's retained ``dev/{id}/deploy``.

Each publish is a `protocols.messages.Deployment` signed with the model-signing key: the
device it is for, the version's signed manifest, the time, and a sequence number taken
from one counter in the coordinator's database (table ``deploy_sequence``). A device
refuses a deployment whose number is below the highest it accepted (a replay of an older,
validly signed one), so a deployment back to an earlier version (a rollback) is a new
deployment with a new number.

The next number is the larger of the counter plus one and the wall clock in milliseconds.
The counter makes the numbers grow strictly across every device and every restart, even
when the clock steps back; the clock keeps them growing when the counter does not: a
database restored from a backup (or a coordinator rebuilt on a new disk) numbers its next
deployment above everything it sent before the backup was taken, as long as the clock has
moved on since (see docs/operations.md).
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cloud_coordinator.errors import StoreError
from cloud_coordinator.sqlite_db import open_db
from protocols.messages import Deployment, ModelManifest, encode
from protocols.signing import sign_deployment

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deploy_sequence (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
"""


class DeploymentSigner:
    """Numbers and signs deployments; the counter lives in the coordinator's SQLite file."""

    def __init__(
        self, db_path: Path, signing_key: bytes, clock: Callable[[], float] = time.time
    ) -> None:
        self.signing_key = signing_key
        self.clock = clock
        self._lock = threading.Lock()
        self._db = open_db(db_path, _SCHEMA, "the deployment counter in")

    def next_seq(self) -> int:
        """Take the next sequence number (committed before it is used); StoreError if not."""
        with self._lock:
            try:
                with self._db:
                    self._db.execute(
                        "INSERT INTO deploy_sequence VALUES (1, :floor)"
                        " ON CONFLICT (id) DO UPDATE SET seq = max(seq + 1, :floor)",
                        {"floor": self._clock_floor()},
                    )
                    (seq,) = self._db.execute(
                        "SELECT seq FROM deploy_sequence WHERE id = 1"
                    ).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot take a deployment sequence number: {exc}") from exc
        return int(seq)

    def _clock_floor(self) -> int:
        """The wall clock in milliseconds (at least 1; 1 for a clock that reads nonsense)."""
        now = self.clock()
        return int(now * 1000) if math.isfinite(now) and 0 < now < 1e15 else 1

    def deployment(self, device_id: str, manifest: ModelManifest) -> Deployment:
        """A new signed deployment of `manifest` to `device_id`; StoreError if unnumbered."""
        unsigned = Deployment(device_id, self.next_seq(), self.clock(), manifest)
        return sign_deployment(unsigned, self.signing_key)

    def payload(self, device_id: str, manifest: ModelManifest) -> bytes:
        """`deployment` encoded: the bytes to publish retained on the device's deploy topic."""
        return encode(self.deployment(device_id, manifest))

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
