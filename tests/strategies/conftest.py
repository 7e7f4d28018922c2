"""Every strategy test runs on each device: ``cpu`` always, ``cuda`` when torch has a GPU
(the same `device` fixture as the aggregation tests)."""

from __future__ import annotations

from tests.aggregation.conftest import DEVICES, device

__all__ = ["DEVICES", "device"]
