"""Aggregation of model updates: wire tensors onto a torch device, folded as they arrive.

The kernels are pure functions over tensors that take a ``device``, so the same code runs
(and is tested) on ``cpu`` and ``cuda``; the rules are small classes over them. torch stays
inside the aggregation modules: rules take `WireTensor`s and hand back numpy arrays.
FedAvg is here; the other strategies (robust rules, norm bounding, server optimisers) are
in `cloud_coordinator.strategies`, built on the decoding and checks of
`cloud_coordinator.update_tensors` (re-exported here).

Every update is decoded and checked (names, shape, byte count, indices, NaN/Inf) as a
whole, so a bad update leaves the aggregate unchanged. A rejection raises
`AggregationError`, whose ``reason`` is one of `REASONS`.

On the CPU, `StreamingFedAvg` folds each update in one pass that also checks every new
sum (`cloud_coordinator.checked_sums`, a C kernel), restoring the sums exactly when an
update is refused; that also refuses an update whose sum overflows float32. Where that
kernel is not built, and on a GPU, an update costs two passes (a NaN/Inf sum over it,
then the fold), and an overflowed sum is refused by `StreamingFedAvg.result` instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from cloud_coordinator import checked_sums
from cloud_coordinator.update_tensors import (
    REASONS,
    AggregationError,
    DecodedTensor,
    all_finite,
    check_weight,
    decode_to_torch,
    decode_update,
    dense_to_torch,
    sparse_to_torch,
)
from protocols.tensors import WireTensor

Report = dict[str, str | int | float | list[str]]

FloatArray = npt.NDArray[np.float32]


def set_threads(threads: int) -> None:
    """Use `threads` CPU threads for aggregation (torch's intra-op pool, process-wide)."""
    torch.set_num_threads(threads)


def pick_device(preference: str = "auto") -> torch.device:
    """``cuda`` for "auto" when available, else ``cpu``; "cuda" without a GPU raises."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise AggregationError(
                "aggregation device 'cuda' was asked for, but torch sees no CUDA GPU"
                f" (torch {torch.__version__}); use 'auto' or 'cpu'",
                reason="no_device",
            )
        return torch.device("cuda")
    raise AggregationError(
        f"unknown aggregation device {preference!r}; choose 'auto', 'cpu' or 'cuda'",
        reason="no_device",
    )


def fold(acc: torch.Tensor, update: DecodedTensor, weight: float) -> None:
    """Flat `acc` += weight * update, in place (a sparse update adds at its indices only)."""
    if update.flat is None:
        acc.add_(update.values, alpha=weight)
    else:
        acc.index_add_(0, update.flat, update.values, alpha=weight)


_F32_MAX = float(torch.finfo(torch.float32).max)


def _peak(values: torch.Tensor) -> float:
    """The largest magnitude in `values` (0 if empty)."""
    return float(values.abs().max()) if values.numel() else 0.0


class Aggregator(Protocol):
    """An aggregation rule fed one update at a time."""

    @property
    def count(self) -> int:
        """Updates folded in so far."""
        ...

    @property
    def total_weight(self) -> float:
        """Sum of the weights of the updates folded in."""
        ...

    def add(self, tensors: Sequence[WireTensor], weight: float, source: str = "") -> None:
        """Fold in one update from `source` (a device id), or raise and change nothing."""
        ...

    def result(self) -> dict[str, FloatArray]:
        """The aggregate, as float32 arrays on the host."""
        ...

    def report(self) -> Report:
        """What the round record keeps: ``rule``, ``aggregation_device`` and rule details."""
        ...


class StreamingFedAvg:
    """Weighted mean of updates (FedAvg), folded in as they arrive in O(model) memory.

    On the CPU each update is folded and checked in one pass (`checked_sums.CheckedSums`,
    which keeps up to `keep_bytes` of accepted updates, by default
    `checked_sums.KEEP_BYTES`, to restore the sums from); with ``keep_bytes=0``, on a GPU,
    or without the C kernel, it is checked, then folded.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device,
        rule: str = "fedavg",
        keep_bytes: int | None = None,
    ) -> None:
        self._rule = rule  # the strategy name for report(): fedavg, fedprox, fedadam, ...
        self._shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        if any(d < 0 for shape in self._shapes.values() for d in shape):
            raise ValueError(f"negative dimension in model shapes {self._shapes}")
        self._device = torch.device(device)
        self._acc = {  # flat running sums: sum of weight * update
            name: torch.zeros(math.prod(shape), dtype=torch.float32, device=self._device)
            for name, shape in self._shapes.items()
        }
        keep = checked_sums.KEEP_BYTES if keep_bytes is None else keep_bytes
        self._checked = (
            checked_sums.CheckedSums(self._acc, keep)
            if checked_sums.usable(self._acc, keep)
            else None
        )
        self._count = 0
        self._total_weight = 0.0
        self._bounds: dict[str, float] = {}  # (two-pass) per tensor: >= max |running sum|

    @property
    def one_pass(self) -> bool:
        """Whether each update is folded and checked in one pass (the CPU kernel)."""
        return self._checked is not None

    @property
    def device(self) -> torch.device:
        """Where the running sums live."""
        return self._device

    @property
    def count(self) -> int:
        """Updates folded in so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights of the updates folded in."""
        return self._total_weight

    def add(self, tensors: Sequence[WireTensor], weight: float, source: str = "") -> None:
        """Fold in one update of `weight` >= 0, or raise AggregationError and change nothing."""
        weight = check_weight(weight)
        # the one-pass fold checks what it adds; an update of weight 0 is checked here
        check = self._checked is None or weight == 0
        self._fold(decode_update(tensors, self._shapes, self._device, check), weight, weight)

    def _fold(self, decoded: list[DecodedTensor], scale: float, weight: float) -> None:
        """Add scale * the update to the sums and count `weight` in the total.

        The update must be checked already, unless the sums check it (`one_pass`).
        """
        if scale > 0:
            if self._checked is not None:
                try:
                    self._checked.add([(d.name, d.values, d.flat) for d in decoded], scale)
                except checked_sums.NotFiniteError as exc:
                    raise AggregationError(str(exc), reason="non_finite") from exc
            else:  # refused before any sum changes if it could overflow one (the one-pass
                # kernel checks as it adds; here a later overflow would fail the whole round)
                bounds = {d.name: self._bounds.get(d.name, 0.0) + scale * _peak(d.values)
                          for d in decoded}  # fmt: skip
                if not all(b <= _F32_MAX for b in bounds.values()):
                    raise AggregationError(
                        "this update, weighted, could overflow float32 in the sums",
                        reason="non_finite",
                    )
                self._bounds.update(bounds)
                acc = self._acc
                for update in decoded:
                    if update.flat is None:
                        acc[update.name].add_(update.values, alpha=scale)
                    else:
                        fold(acc[update.name], update, scale)
        self._count += 1
        self._total_weight += weight

    def result(self) -> dict[str, FloatArray]:
        """The weighted mean of every tensor, float32 on the host; AggregationError if none."""
        if self._total_weight <= 0:
            raise AggregationError(
                f"no weight to average ({self._count} updates, total weight 0)", reason="empty"
            )
        means = [torch.div(acc, self._total_weight) for acc in self._acc.values()]
        if not all_finite(means):
            raise AggregationError(
                "the weighted sum overflowed float32: some update held values near 3e38",
                reason="non_finite",
            )
        return {
            name: mean.view(self._shapes[name]).cpu().numpy()
            for name, mean in zip(self._acc, means, strict=True)
        }

    def report(self) -> Report:
        """The rule's name, where it ran, and how many updates of what total weight."""
        return {
            "rule": self._rule,
            "aggregation_device": str(self._device),
            "updates": self._count,
            "total_weight": self._total_weight,
        }


__all__ = [
    "REASONS",
    "AggregationError",
    "Aggregator",
    "DecodedTensor",
    "Report",
    "StreamingFedAvg",
    "all_finite",
    "check_weight",
    "decode_to_torch",
    "decode_update",
    "dense_to_torch",
    "fold",
    "pick_device",
    "sparse_to_torch",
]
