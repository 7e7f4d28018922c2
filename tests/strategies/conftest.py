"""Every strategy test runs on each device: ``cpu`` always, ``cuda`` when torch has a GPU."""

from __future__ import annotations

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)"
        ),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device under test."""
    return torch.device(request.param)
