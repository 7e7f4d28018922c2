"""cloud_coordinator.registry on a real SQLite file: restarts, read-only readers, bad files."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_coordinator.errors import StoreError
from cloud_coordinator.registry import (
    SCHEMA_VERSION,
    Registry,
    read_devices,
    read_rejections,
)
from protocols.messages import OFFLINE
from tests.unit import builders


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
    db.close()
    return version


def test_a_new_registry_creates_its_directory_and_schema(db_path: Path) -> None:
    assert not db_path.parent.exists()
    Registry(db_path).close()
    assert db_path.is_file()
    assert user_version(db_path) == SCHEMA_VERSION
    assert read_devices(db_path) == []
    assert read_rejections(db_path) == {}


def test_data_survives_a_restart(db_path: Path) -> None:
    first = Registry(db_path)
    first.apply_status(builders.status("cam-1", ts=100.0, agent_version="1.0"), 10)
    first.record_telemetry(builders.telemetry("cam-1", seq=4), 11)
    first.apply_status(builders.status("cam-2", state=OFFLINE, ts=90.0, reason="will"), 12)
    first.count_rejection("status", "stale", 2)
    before = first.devices()
    first.close()

    second = Registry(db_path)
    try:
        assert second.devices() == before
        assert second.rejections() == {("status", "stale"): 2}
        # The session order survives too: an old status is still stale after the restart.
        assert not second.apply_status(builders.status("cam-1", state=OFFLINE, ts=50.0), 20)
        second.count_rejection("status", "stale")
        assert second.rejections() == {("status", "stale"): 3}
    finally:
        second.close()
    assert user_version(db_path) == SCHEMA_VERSION


def test_readers_see_the_writers_commits_while_it_is_open(
    registry: Registry, db_path: Path
) -> None:
    registry.apply_status(builders.status("cam-1", ts=100.0), 10)
    assert [(d.device_id, d.online) for d in read_devices(db_path)] == [("cam-1", True)]
    registry.apply_status(builders.status("cam-1", state=OFFLINE, ts=100.0), 20)
    registry.count_rejection("telemetry", "malformed")
    assert [(d.device_id, d.online) for d in read_devices(db_path)] == [("cam-1", False)]
    assert read_rejections(db_path) == {("telemetry", "malformed"): 1}
    # ... and reading does not lock the writer out.
    registry.touch("cam-2", 30)
    assert [d.device_id for d in read_devices(db_path)] == ["cam-1", "cam-2"]


def test_reader_records_equal_the_writers(registry: Registry, db_path: Path) -> None:
    registry.apply_status(builders.status("cam-1", ts=100.0, agent_version="3"), 10)
    registry.record_telemetry(builders.telemetry("cam-1", model_versions={"m": "v1"}), 11)
    assert read_devices(db_path) == registry.devices()


def test_a_missing_database_is_a_store_error_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "coordinator.db"
    for read in (read_devices, read_rejections):
        with pytest.raises(StoreError) as err:
            read(path)
        message = str(err.value)
        assert f"no registry at {path}" in message
        assert "--data-dir" in message
        assert "FEDGE_DATA_DIR" in message
    assert not path.parent.exists()


def test_a_newer_schema_is_refused_and_left_alone(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError) as err:
        Registry(db_path)
    assert f"{db_path} has schema version 99" in str(err.value)
    assert f"knows {SCHEMA_VERSION}" in str(err.value)
    assert "Upgrade fedge" in str(err.value)
    assert user_version(db_path) == 99
    with sqlite3.connect(db_path) as db:
        tables = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    db.close()
    assert tables == []


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[sqlite3.Connection]]:
    """Every SQLite connection opened during the test."""
    connections: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = real_connect(*args, **kwargs)
        connections.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    yield connections
    for conn in connections:
        conn.close()


def _is_open(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return False
    return True


def test_a_refused_database_is_closed(db_path: Path, opened: list[sqlite3.Connection]) -> None:
    db_path.parent.mkdir(parents=True)
    setup = sqlite3.connect(db_path)
    setup.execute("PRAGMA user_version=99")
    setup.close()
    with pytest.raises(StoreError):
        Registry(db_path)
    assert not any(_is_open(conn) for conn in opened)


def test_readers_close_their_connections(
    registry: Registry, db_path: Path, opened: list[sqlite3.Connection]
) -> None:
    read_devices(db_path)
    read_rejections(db_path)
    assert len(opened) == 2
    assert not any(_is_open(conn) for conn in opened)


@pytest.mark.parametrize("content", [b"this is not a database" * 100, b"\x00" * 4096])
def test_a_file_that_is_not_a_database_is_a_store_error(db_path: Path, content: bytes) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(content)
    with pytest.raises(StoreError, match=str(db_path)):
        read_devices(db_path)
    with pytest.raises(StoreError, match="cannot open the state database"):
        Registry(db_path)


def test_a_directory_where_the_database_should_be_is_a_store_error(db_path: Path) -> None:
    db_path.mkdir(parents=True)
    with pytest.raises(StoreError, match="cannot open the state database"):
        Registry(db_path)
    with pytest.raises(StoreError, match="no registry at"):
        read_devices(db_path)


def test_readers_never_create_the_schema(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    sqlite3.connect(db_path).close()  # an empty database someone else made
    with pytest.raises(StoreError, match=r"cannot read .*no such table: devices"):
        read_devices(db_path)
    with pytest.raises(StoreError, match=r"cannot read .*no such table: rejections"):
        read_rejections(db_path)
    assert db_path.stat().st_size == 0
    assert user_version(db_path) == 0


@pytest.mark.parametrize("dirname", ["a#b", "a?b", "a%41b"])
def test_a_data_dir_with_uri_characters_can_be_read(tmp_path: Path, dirname: str) -> None:
    path = tmp_path / dirname / "coordinator.db"
    writer = Registry(path)
    try:
        writer.touch("cam-1", 1)
        assert [d.device_id for d in read_devices(path)] == ["cam-1"]
    finally:
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [dirname]


def test_as_json_says_online_or_offline(registry: Registry) -> None:
    registry.apply_status(builders.status("cam-1", ts=100.0), 10)
    registry.touch("cam-2", 11)
    states = {d.device_id: d.as_json()["state"] for d in registry.devices()}
    assert states == {"cam-1": "online", "cam-2": "offline"}
    assert set(registry.devices()[0].as_json()) == {
        "device_id",
        "state",
        "first_seen",
        "last_seen",
        "status_changed",
        "status_reason",
        "agent_version",
        "telemetry",
        "model_versions",
        "fleet",
    }


def test_a_schema_1_registry_gains_the_fleet_column(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:  # the devices table as schema 1 made it
        db.execute(
            "CREATE TABLE devices (device_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, "
            "last_seen REAL NOT NULL, online INTEGER NOT NULL DEFAULT 0, session_ts REAL NOT "
            "NULL DEFAULT 0, status_changed REAL, status_reason TEXT NOT NULL DEFAULT '', "
            "agent_version TEXT NOT NULL DEFAULT '', telemetry TEXT, telemetry_ts REAL, "
            "model_versions TEXT NOT NULL DEFAULT '{}')"
        )
        db.execute("INSERT INTO devices (device_id, first_seen, last_seen) VALUES ('old', 1, 1)")
        db.execute("PRAGMA user_version=1")
    db.close()
    assert [d.fleet for d in read_devices(db_path)] == [""]  # readers cope before migrating
    registry = Registry(db_path)
    try:
        assert user_version(db_path) == SCHEMA_VERSION == 2
        status = builders.status("cam-1", ts=100.0)
        registry.apply_status(dataclasses.replace(status, fleet="lab-2"), 10)
        registry.apply_status(dataclasses.replace(status, ts=101.0), 11)  # no fleet: kept
        fleets = {d.device_id: d.fleet for d in registry.devices()}
        assert fleets == {"old": "", "cam-1": "lab-2"}
        assert read_devices(db_path)[0].as_json()["fleet"] == "lab-2"
    finally:
        registry.close()
