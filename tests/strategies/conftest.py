"""Every strategy test runs on each device: ``cpu`` always, ``cuda`` when torch has a GPU
(the same `device` fixture as the aggregation tests)."""

from __future__ import annotations

from tests.aggregation.conftest import DEVICES, TORCH_DEVICES, device

__all__ = ["DEVICES", "TORCH_DEVICES", "device"]
