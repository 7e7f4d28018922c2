"""Fixtures of the agent training tests: sklearn digits split in two, and the MLP head."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits

from protocols.model_format import LayerSpec

MLP = (
    LayerSpec("linear", 64, 512),
    LayerSpec("relu"),
    LayerSpec("linear", 512, 256),
    LayerSpec("relu"),
    LayerSpec("linear", 256, 10),
)


@dataclass(frozen=True)
class Digits:
    """A shuffled 80/20 split of sklearn digits, pixels scaled to [0, 1]."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_val: npt.NDArray[np.float32]
    y_val: npt.NDArray[np.int64]


@pytest.fixture(scope="session")
def digits() -> Digits:
    """The digits data set, split once per session."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x = (x[order] / 16.0).astype(np.float32)
    y = y[order].astype(np.int64)
    cut = int(0.8 * len(x))
    return Digits(x[:cut], y[:cut], x[cut:], y[cut:])
