"""The model registry: every published model version, its lineage, and its files' bytes.

Layout under ``root``::

    blobs/<sha256>   file contents, content-addressed, written atomically, verified on read
    models.db        SQLite (WAL): one row per version, with its encoded manifest, the
                     job and round that produced it, the devices that took part, metrics

A version's parent must already be registered under the same name, so insertion order is a
lineage order. Blobs are written (and fsynced) before the row that refers to them commits,
so a crash leaves at worst an unreferenced blob, never a version with a missing file. This
module does not import torch: a bundle is anything with ``files`` and ``manifest``.
Metrics are JSON scalars; a NaN or infinite number is stored as ``None``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cloud_coordinator.errors import StoreError
from protocols.errors import DecodeError
from protocols.field_checks import valid_sha256
from protocols.messages import ModelManifest, decode_as, encode

SCHEMA_VERSION = 1
DB_FILE = "models.db"
BLOB_DIR = "blobs"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    name     TEXT NOT NULL,
    version  TEXT NOT NULL,
    parent   TEXT,
    created  REAL NOT NULL,
    manifest BLOB NOT NULL,
    job_id   TEXT,
    round    INTEGER,
    devices  TEXT NOT NULL DEFAULT '[]',
    metrics  TEXT NOT NULL DEFAULT '{}',
    UNIQUE (name, version)
);
"""
_COLUMNS = "name, version, parent, created, manifest, job_id, round, devices, metrics"
Metric = str | int | float | bool | None


class BundleLike(Protocol):
    """What `ModelRegistry.put` stores: file bytes by name and the manifest listing them."""

    @property
    def files(self) -> Mapping[str, bytes]: ...

    @property
    def manifest(self) -> ModelManifest: ...


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One registered model version and how it was made."""

    name: str
    version: str
    parent: str | None
    created: float
    manifest: ModelManifest
    job_id: str | None = None
    round: int | None = None
    devices: tuple[str, ...] = ()
    metrics: dict[str, Metric] = field(default_factory=dict)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModelRegistry:
    """Read-write access to one registry directory, from any thread.

    Its one SQLite connection is shared by the coordinator's threads (jobs, ingest, HTTP,
    rollouts): each use of it holds a lock, so one thread's transaction never takes in
    another's statements.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.RLock()
        self._blobs = root / BLOB_DIR
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(root / DB_FILE, timeout=5.0, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the model registry at {root}: {exc}") from exc
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        path = self.root / DB_FILE
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path} has schema version {version}; this coordinator knows {SCHEMA_VERSION}"
                )
            with self._db:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot use the model registry {path}: {exc}") from exc

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Blobs

    def has_blob(self, sha256: str) -> bool:
        """True when a blob with this hash is stored."""
        return self._blob_path(sha256).is_file()

    def blob(self, sha256: str) -> bytes:
        """The bytes whose sha256 is `sha256`; StoreError if missing or corrupt."""
        path = self._blob_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {sha256} is not in the registry") from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {sha256}: {exc}") from exc
        if _sha256(data) != sha256:
            raise StoreError(f"blob {sha256} is corrupt on disk ({path})")
        return data

    def put_blob(self, data: bytes) -> str:
        """Store `data` under its sha256 (atomically, once) and return the hash."""
        digest = _sha256(data)
        path = self._blob_path(digest)
        if path.is_file() and _sha256(path.read_bytes()) == digest:
            return digest
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self._blobs)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            directory = os.open(self._blobs, os.O_RDONLY)
            try:  # the rename is on disk before a version row can name the blob
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise StoreError(f"cannot write blob {digest}: {exc}") from exc
        return digest

    def _blob_path(self, sha256: str) -> Path:
        if not valid_sha256(sha256):
            raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
        return self._blobs / sha256

    # Versions

    def put(
        self,
        bundle: BundleLike,
        job_id: str | None = None,
        round: int | None = None,
        devices: Sequence[str] = (),
        metrics: Mapping[str, Metric] | None = None,
    ) -> VersionRecord:
        """Store a bundle's files and register its version; StoreError if it conflicts."""
        manifest = bundle.manifest
        listed = {entry.name: entry for entry in manifest.files}
        if set(listed) != set(bundle.files):
            raise ValueError(f"manifest lists {sorted(listed)}, bundle has {sorted(bundle.files)}")
        for name, data in bundle.files.items():
            if _sha256(data) != listed[name].sha256 or len(data) != listed[name].size:
                raise ValueError(f"{name} does not match its manifest entry")
        encoded = encode(manifest)
        existing = self._row(manifest.name, manifest.version)
        if existing is not None:
            if existing["manifest"] != encoded:
                raise StoreError(f"{manifest.name} {manifest.version} is already registered")
            return _record(existing)
        parent = manifest.parent_version
        if parent is not None and self._row(manifest.name, parent) is None:
            raise StoreError(
                f"parent {parent} of {manifest.name} {manifest.version} is not registered"
            )
        row = (
            manifest.name,
            manifest.version,
            manifest.parent_version,
            manifest.created,
            encoded,
            job_id,
            round,
            json.dumps(list(devices)),
            _metrics_json(metrics or {}),
        )
        for data in bundle.files.values():
            self.put_blob(data)
        try:
            with self._lock, self._db:
                self._db.execute(
                    f"INSERT INTO versions ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", row
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot register {manifest.name} {manifest.version}: {exc}") from exc
        return self.record(manifest.name, manifest.version)

    def record(self, name: str, version: str) -> VersionRecord:
        """Everything known about one version; StoreError if it is not registered."""
        row = self._row(name, version)
        if row is None:
            raise StoreError(f"model {name} has no version {version!r}")
        return _record(row)

    def manifest(self, name: str, version: str) -> ModelManifest:
        """The manifest of one version; StoreError if it is not registered."""
        return self.record(name, version).manifest

    def files(self, name: str, version: str) -> dict[str, bytes]:
        """The bytes of every file of one version, by file name (verified)."""
        return {e.name: self.blob(e.sha256) for e in self.manifest(name, version).files}

    def latest(self, name: str) -> VersionRecord | None:
        """The most recently registered version of `name`, or None."""
        rows = self._query("WHERE name = ? ORDER BY seq DESC LIMIT 1", (name,))
        return _record(rows[0]) if rows else None

    def versions(self, name: str) -> list[VersionRecord]:
        """Every version of `name`, oldest first (each after its parent)."""
        return [_record(row) for row in self._query("WHERE name = ? ORDER BY seq", (name,))]

    def names(self) -> list[str]:
        """Names of all registered models, sorted."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT name FROM versions ORDER BY name").fetchall()
        return [str(row[0]) for row in rows]

    def record_metrics(self, name: str, version: str, metrics: Mapping[str, Metric]) -> None:
        """Merge `metrics` into the version's metrics; StoreError if it is not registered."""
        try:
            with self._lock, self._db:  # (read and write as one: no update is lost)
                merged = _metrics_json({**self.record(name, version).metrics, **metrics})
                self._db.execute(
                    "UPDATE versions SET metrics = ? WHERE name = ? AND version = ?",
                    (merged, name, version),
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record metrics of {name} {version}: {exc}") from exc

    def _row(self, name: str, version: str) -> dict[str, Any] | None:
        rows = self._query("WHERE name = ? AND version = ?", (name, version))
        return rows[0] if rows else None

    def _query(self, where: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        try:
            with self._lock:
                cursor = self._db.execute(f"SELECT {_COLUMNS} FROM versions {where}", args)
                names = [d[0] for d in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the model registry: {exc}") from exc


def _metrics_json(metrics: Mapping[str, Metric]) -> str:
    """JSON text of `metrics`, with non-finite numbers as null; ValueError for other types."""
    clean: dict[str, Metric] = {}
    for key, value in metrics.items():
        if value is not None and not isinstance(value, str | int | float):
            raise ValueError(f"metric {key!r} is a {type(value).__name__}, not a JSON scalar")
        finite = not isinstance(value, float) or math.isfinite(value)
        clean[str(key)] = value if finite else None
    return json.dumps(clean, allow_nan=False)


def _record(row: Mapping[str, Any]) -> VersionRecord:
    try:
        manifest = decode_as(ModelManifest, bytes(row["manifest"]))
        devices = json.loads(row["devices"])
        metrics = json.loads(row["metrics"])
    except (DecodeError, ValueError) as exc:
        raise StoreError(f"registry row {row['name']} {row['version']} is unreadable") from exc
    return VersionRecord(
        name=row["name"],
        version=row["version"],
        parent=row["parent"],
        created=row["created"],
        manifest=manifest,
        job_id=row["job_id"],
        round=row["round"],
        devices=tuple(devices),
        metrics=dict(metrics),
    )
