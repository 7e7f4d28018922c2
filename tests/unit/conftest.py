"""Fixtures of the unit tier: a registry file in tmp_path, a store for contract tests, and
a clean environment for command-line processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_coordinator.registry import Registry
from tests.unit.fakes import FakeStore, InspectableStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where a coordinator with data dir ``tmp_path/data`` keeps its registry."""
    return tmp_path / "data" / "coordinator.db"


@pytest.fixture
def registry(db_path: Path) -> Iterator[Registry]:
    """A real SQLite registry, closed after the test."""
    reg = Registry(db_path)
    yield reg
    reg.close()


@pytest.fixture(params=["fake", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InspectableStore]:
    """Every `DeviceStore` implementation in turn: contract tests run against each."""
    if request.param == "fake":
        yield FakeStore()
        return
    reg = Registry(tmp_path / "contract" / "coordinator.db")
    yield reg
    reg.close()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment without FEDGE_* or systemd variables, HOME and XDG in tmp."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FEDGE_", "XDG_", "NOTIFY_", "WATCHDOG_", "JOURNAL_"))
    }
    clean["HOME"] = str(tmp_path / "home")
    clean["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    clean["XDG_DATA_HOME"] = str(tmp_path / "share")
    return clean
