"""Every aggregation test runs on each device: ``cpu`` always, ``cuda`` when torch has a GPU.

On the CPU, FedAvg folds with the one-pass C kernel when it is built
(`cloud_coordinator.checked_sums`); ``cpu-two-pass`` runs the same tests with it turned
off, so the torch path that GPUs and installations without the kernel take is tested here
too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from cloud_coordinator import checked_sums

CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)"
    ),
)
# torch device names, for tests that take no fixture (Hypothesis)
TORCH_DEVICES = ["cpu", CUDA]
# the `device` fixture's cases
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not checked_sums.kernel_built(),
            reason="the C kernel cloud_coordinator._fold is not built (see pyproject.toml)",
        ),
    ),
    "cpu-two-pass",
    CUDA,
]


@pytest.fixture(params=DEVICES)
def device(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[torch.device]:
    """The device under test (``cpu-two-pass``: the CPU without the one-pass kernel)."""
    if request.param == "cpu-two-pass":
        monkeypatch.setattr(checked_sums, "KEEP_BYTES", 0)
        yield torch.device("cpu")
    else:
        yield torch.device(request.param)
