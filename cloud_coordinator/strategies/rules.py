"""The aggregation rules beyond plain FedAvg, as `Aggregator`s over the pure `kernels`.

`NormBoundedFedAvg` streams like `StreamingFedAvg` (O(model) memory): each checked update
is scaled by ``min(1, norm_bound / ||update||)`` (its L2 norm over all its tensors; a
sparse tensor's values) and folded in with its sample weight; the mean divides by the
sample weights, so clipping shrinks an update, never its share.

`BufferedRule` (median, trimmed mean, Krum, Multi-Krum) needs every update at once: each
checked update becomes one flat float32 row of a matrix on the aggregation device, grown
by doubling (so no final stack copies it again); ``result()`` runs the kernel on the
filled rows and splits the flat answer back into the model's named tensors. Median and
trimmed mean are unweighted; Krum returns the chosen update itself; Multi-Krum the
sample-weighted mean of the kept ones. An update is decoded and fully checked before any
of it is written, so a refused update leaves the buffer unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from cloud_coordinator.aggregation import (
    AggregationError,
    FloatArray,
    Report,
    StreamingFedAvg,
    all_finite,
    check_weight,
    decode_update,
)
from cloud_coordinator.strategies import kernels
from cloud_coordinator.strategies.catalog import Krum, Median, MultiKrum, TrimmedMean
from protocols.tensors import WireTensor

BufferedParams = Median | TrimmedMean | Krum | MultiKrum


class NormBoundedFedAvg(StreamingFedAvg):
    """FedAvg of updates each scaled to an L2 norm of at most `norm_bound`; O(model) memory."""

    def __init__(
        self, shapes: Mapping[str, tuple[int, ...]], device: torch.device, norm_bound: float
    ) -> None:
        if not (math.isfinite(norm_bound) and norm_bound > 0):
            raise ValueError(f"norm_bound must be finite and > 0, got {norm_bound}")
        super().__init__(shapes, device, rule="norm_bounded")
        self._norm_bound = float(norm_bound)
        self._clipped = 0

    @property
    def clipped(self) -> int:
        """Updates whose norm was above the bound, so were scaled down."""
        return self._clipped

    def add(self, tensors: Sequence[WireTensor], weight: float, source: str = "") -> None:
        """Fold in one update scaled to the norm bound, or raise and change nothing."""
        weight = check_weight(weight)
        decoded = decode_update(tensors, self._shapes, self._device)
        norm = kernels.update_norm([d.values for d in decoded], self._device)
        factor = kernels.clip_factor(norm, self._norm_bound)
        self._fold(decoded, weight * factor, weight)
        if factor < 1.0:
            self._clipped += 1

    def report(self) -> Report:
        """FedAvg's report plus ``norm_bound`` and ``clipped`` (how many were scaled down)."""
        return super().report() | {"norm_bound": self._norm_bound, "clipped": self._clipped}


class BufferedRule:
    """Median, trimmed mean, Krum or Multi-Krum over every update, kept as rows on a device."""

    def __init__(
        self,
        params: BufferedParams,
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device,
        capacity: int = 8,
    ) -> None:
        self._params = params
        self._shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        if any(d < 0 for shape in self._shapes.values() for d in shape):
            raise ValueError(f"negative dimension in model shapes {self._shapes}")
        self._device = torch.device(device)
        self._spans: dict[str, tuple[int, int]] = {}  # name -> (start, stop) in a row
        start = 0
        for name, shape in self._shapes.items():
            self._spans[name] = (start, start + math.prod(shape))
            start += math.prod(shape)
        self._buffer = torch.empty(
            (max(1, capacity), start), dtype=torch.float32, device=self._device
        )
        self._weights: list[float] = []
        self._sources: list[str] = []
        self._selected: list[str] = []

    @property
    def device(self) -> torch.device:
        """Where the rows live and the rule runs."""
        return self._device

    @property
    def count(self) -> int:
        """Updates kept so far."""
        return len(self._weights)

    @property
    def total_weight(self) -> float:
        """Sum of the weights of the updates kept."""
        return math.fsum(self._weights)

    @property
    def capacity(self) -> int:
        """Rows the buffer holds before it next doubles."""
        return int(self._buffer.shape[0])

    def add(self, tensors: Sequence[WireTensor], weight: float, source: str = "") -> None:
        """Keep one checked update as a row, or raise AggregationError and change nothing."""
        weight = check_weight(weight)
        decoded = decode_update(tensors, self._shapes, self._device)
        n = self.count
        if n == self.capacity:
            grown = torch.empty(
                (2 * n, self._buffer.shape[1]), dtype=torch.float32, device=self._device
            )
            grown[:n] = self._buffer[:n]
            self._buffer = grown
        row = self._buffer[n]
        for update in decoded:
            start, stop = self._spans[update.name]
            segment = row[start:stop]
            if update.flat is None:
                segment.copy_(update.values)
            else:
                segment.zero_()
                segment.index_copy_(0, update.flat, update.values)
        self._weights.append(weight)
        self._sources.append(source)

    def _rows(self) -> torch.Tensor:
        if not self._weights:
            raise AggregationError(f"no updates for {self._params.name}", reason="empty")
        return self._buffer[: self.count]

    def _aggregate(self) -> torch.Tensor:
        """The flat aggregate on the device; records the kept sources for Krum rules."""
        self._selected = []
        rows, p = self._rows(), self._params
        if isinstance(p, Median):
            return kernels.coordinate_median(rows, self._device)
        if isinstance(p, TrimmedMean):
            k = kernels.trim_count(self.count, p.trim_fraction)
            return kernels.trimmed_mean(rows, k, self._device)
        if isinstance(p, Krum):
            (best,) = kernels.krum_select(rows, p.byzantine, 1, self._device)
            self._selected = [self._sources[best]]
            return rows[best].clone()
        keep = p.keep or self.count - p.byzantine
        kept = kernels.krum_select(rows, p.byzantine, keep, self._device)
        self._selected = [self._sources[i] for i in kept]
        weights = torch.zeros(self.count, dtype=torch.float32)
        weights[kept] = torch.tensor([self._weights[i] for i in kept], dtype=torch.float32)
        if not float(weights.sum()) > 0:
            raise AggregationError(
                f"the {keep} updates Multi-Krum kept carry no weight", reason="empty"
            )
        return kernels.weighted_mean(rows, weights, self._device)

    def result(self) -> dict[str, FloatArray]:
        """The rule's aggregate as float32 host arrays; AggregationError if it cannot run."""
        flat = self._aggregate()
        if not all_finite([flat]):
            raise AggregationError(
                f"the {self._params.name} aggregate overflowed float32", reason="non_finite"
            )
        host = flat.to("cpu", copy=True).numpy()
        return {
            name: host[start:stop].reshape(self._shapes[name])
            for name, (start, stop) in self._spans.items()
        }

    def report(self) -> Report:
        """Rule, devices, update count; ``trimmed_per_side`` or (after result) ``selected``."""
        out: Report = {
            "rule": self._params.name,
            "aggregation_device": str(self._device),
            "buffer_device": str(self._buffer.device),
            "updates": self.count,
            "weighted": isinstance(self._params, MultiKrum),
        }
        if isinstance(self._params, TrimmedMean):
            out["trimmed_per_side"] = kernels.trim_count(self.count, self._params.trim_fraction)
        if isinstance(self._params, Krum | MultiKrum):
            out["selected"] = list(self._selected)
        return out


__all__ = ["BufferedParams", "BufferedRule", "NormBoundedFedAvg"]
