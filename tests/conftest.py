"""Shared fixtures: a real Mosquitto per test, started from a config the test writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.broker import Mosquitto
from tests.pki import TestCA

# No per-example deadline: `make test` runs the unit tiers on parallel workers, and a busy
# machine's slow example is not a bug (each test keeps its own example count).
settings.register_profile("fedge", deadline=None)
settings.load_profile("fedge")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Integration tests first: on parallel workers the long ones start at once, and the
    short unit tests fill the gaps and the end (the order within each group is kept)."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto with a plain and an mTLS listener on free loopback ports, stopped by PID."""
    broker = Mosquitto(tmp_path / "broker", TestCA(tmp_path / "pki"))
    broker.directory.mkdir(parents=True)
    broker.start()
    yield broker
    broker.stop()
