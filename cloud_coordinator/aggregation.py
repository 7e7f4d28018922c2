"""Aggregation of model updates: wire tensors onto a torch device, folded as they arrive.

The kernels are pure functions over tensors that take a ``device``, so the same code runs
(and is tested) on ``cpu`` and ``cuda``; the rules are small classes over them. torch stays
inside the aggregation modules: rules take `WireTensor`s and hand back numpy arrays.
FedAvg is here; the other strategies (robust rules, norm bounding, server optimisers) are
in `cloud_coordinator.strategies`, built on the decoding and checks below.

Every tensor of an update is decoded and checked (names, shape, byte count, indices,
NaN/Inf) before any of it touches the aggregate, so a bad update leaves it unchanged. A
rejection raises `AggregationError`, whose ``reason`` is one of `REASONS`. Finite values
large enough to overflow the float32 sum (|x| near 3e38) are not refused one by one, as
that would cost another pass per update: `StreamingFedAvg.result` refuses the overflowed
aggregate instead.

So a dense update costs two passes on CPU: the NaN/Inf sum, then the fold, which finds the
update still in cache. torch has no op that adds and reduces in one pass, and the ways to
check each block just before adding it (a snapshot of the aggregate, or a second one to
swap in, for exact undo) measured slower than the second pass they save.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from cloud_coordinator.errors import CoordinatorError
from protocols.errors import DecodeError
from protocols.tensors import WireTensor, varint_decode

REASONS = frozenset(
    {
        "bad_shape",
        "non_finite",
        "bad_tensor",
        "bad_weight",
        "empty",
        "no_device",
        "too_few",  # fewer updates than the rule needs (Krum: n > 2f + 2)
        "bad_state",  # server optimiser state that does not fit the model
    }
)

Report = dict[str, str | int | float | list[str]]

_WIRE_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i8": torch.int8,
}

FloatArray = npt.NDArray[np.float32]


class AggregationError(CoordinatorError):
    """An update (or a request to the aggregate) was refused; ``reason`` says why."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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


@functools.cache
def _allow_readonly_views() -> None:
    """Let `torch.frombuffer` view read-only payloads (we only ever read them)."""
    # torch warns once per process that it cannot protect a read-only buffer; have it done.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(memoryview(b"\0\0\0\0").toreadonly(), dtype=torch.uint8)


def _raw(t: WireTensor, count: int, device: torch.device) -> torch.Tensor:
    """`count` elements of `t.data` in their wire dtype, viewed on CPU and moved to `device`."""
    dtype = _WIRE_DTYPES.get(t.dtype)
    if dtype is None:
        raise AggregationError(f"tensor {t.name!r}: unknown dtype {t.dtype!r}", reason="bad_tensor")
    if not (math.isfinite(t.scale) and t.scale >= 0) or not -128 <= t.zero_point <= 127:
        raise AggregationError(f"tensor {t.name!r}: bad scale or zero point", reason="bad_tensor")
    view = memoryview(t.data)
    if not view.c_contiguous:
        raise AggregationError(f"tensor {t.name!r}: data is not contiguous", reason="bad_tensor")
    if view.nbytes != count * dtype.itemsize:
        raise AggregationError(
            f"tensor {t.name!r}: {view.nbytes} data bytes for {count} x {t.dtype}",
            reason="bad_tensor",
        )
    if count == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    _allow_readonly_views()
    # Zero copy on CPU; to another device the compact wire bytes travel, not float32.
    raw = torch.frombuffer(view, dtype=dtype)
    return raw if device.type == "cpu" else raw.to(device)


def _dequantise(raw: torch.Tensor, t: WireTensor) -> torch.Tensor:
    """float32 values of `raw` (on its own device): f16/bf16 widened, i8 as (q - zp) * scale."""
    if raw.dtype == torch.float32:
        return raw
    if raw.dtype == torch.int8:
        return raw.to(torch.float32).sub_(t.zero_point).mul_(t.scale)
    return raw.to(torch.float32)


def _check_shape(t: WireTensor, expected_shape: tuple[int, ...]) -> int:
    if tuple(t.shape) != tuple(expected_shape):
        raise AggregationError(
            f"tensor {t.name!r}: shape {tuple(t.shape)} where the model has {expected_shape}",
            reason="bad_shape",
        )
    return math.prod(expected_shape)


def sparse_to_torch(
    t: WireTensor, device: torch.device, expected_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat int64 indices and float32 values of sparse `t` on `device`; no finiteness check."""
    if t.indices is None:
        raise AggregationError(f"tensor {t.name!r} is dense", reason="bad_tensor")
    size = _check_shape(t, expected_shape)
    try:
        gaps = varint_decode(t.indices, size)
    except DecodeError as exc:
        raise AggregationError(f"tensor {t.name!r}: {exc}", reason="bad_tensor") from exc
    if gaps.size > 1 and not bool(np.all(gaps[1:])):
        raise AggregationError(f"tensor {t.name!r}: repeated index", reason="bad_tensor")
    flat = np.cumsum(gaps)
    if flat.size and int(flat[-1]) >= size:
        raise AggregationError(
            f"tensor {t.name!r}: index {int(flat[-1])} outside {size}", reason="bad_tensor"
        )
    values = _dequantise(_raw(t, int(flat.size), device), t)
    return torch.from_numpy(flat).to(device), values


def _dense_flat(
    t: WireTensor, device: torch.device, expected_shape: tuple[int, ...]
) -> torch.Tensor:
    if t.indices is not None:
        raise AggregationError(f"tensor {t.name!r} is sparse", reason="bad_tensor")
    return _dequantise(_raw(t, _check_shape(t, expected_shape), device), t)


def dense_to_torch(
    t: WireTensor, device: torch.device, expected_shape: tuple[int, ...]
) -> torch.Tensor:
    """Dense float32 `t` on `device` (a zero-copy view on CPU for f32); no finiteness check."""
    return _dense_flat(t, device, expected_shape).view(expected_shape)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no element of `tensors` is NaN or +-Inf; one host sync for all of them."""
    if not tensors:
        return True
    # A NaN or Inf anywhere makes its sum non-finite, so a finite total proves there is none:
    # one pass that reads each tensor once and writes nothing (isfinite(x).all() writes a
    # bool per element and is ~10x slower here). Only a non-finite total, which finite
    # values can also give by overflowing, pays for the exact test.
    if tensors[0].is_cpu:
        total = 0.0
        for x in tensors:
            total += x.sum().item()
        finite = math.isfinite(total)
    else:  # one host sync for the whole update, not one per tensor
        finite = bool(torch.isfinite(torch.stack([x.sum() for x in tensors]).sum()))
    return finite or all(bool(torch.isfinite(x).all()) for x in tensors)


def decode_to_torch(
    t: WireTensor, device: torch.device, expected_shape: tuple[int, ...]
) -> torch.Tensor:
    """`t` as a dense float32 tensor on `device`; AggregationError if bad or not finite."""
    if t.indices is None:
        out = dense_to_torch(t, device, expected_shape)
        checked = out
    else:
        flat, checked = sparse_to_torch(t, device, expected_shape)
        out = torch.zeros(math.prod(expected_shape), dtype=torch.float32, device=device)
        out[flat] = checked
        out = out.view(expected_shape)
    if not all_finite([checked]):
        raise AggregationError(f"tensor {t.name!r} holds NaN or Inf", reason="non_finite")
    return out


@dataclass(frozen=True, slots=True)
class DecodedTensor:
    """One checked tensor of an update: all its values (flat), or flat indices and values."""

    name: str
    values: torch.Tensor
    flat: torch.Tensor | None = None


def decode_update(
    tensors: Sequence[WireTensor],
    shapes: Mapping[str, tuple[int, ...]],
    device: torch.device,
) -> list[DecodedTensor]:
    """Every tensor of one update, flat on `device` and checked, or AggregationError."""
    # Refused: a tensor missing, unknown or repeated, misshapen, malformed, or not finite.
    names = {t.name for t in tensors}
    if len(names) != len(tensors) or names != shapes.keys():
        raise AggregationError(
            f"update tensors {[t.name for t in tensors]} do not match the model's"
            f" {sorted(shapes)} (missing, unknown or repeated)",
            reason="bad_tensor",
        )
    decoded = []
    for t in tensors:
        shape = shapes[t.name]
        if t.indices is None:
            decoded.append(DecodedTensor(t.name, _dense_flat(t, device, shape)))
        else:
            flat, values = sparse_to_torch(t, device, shape)
            decoded.append(DecodedTensor(t.name, values, flat))
    if not all_finite([d.values for d in decoded]):
        bad = [d.name for d in decoded if not all_finite([d.values])]
        raise AggregationError(f"tensors {bad} hold NaN or Inf", reason="non_finite")
    return decoded


def fold(acc: torch.Tensor, update: DecodedTensor, weight: float) -> None:
    """Flat `acc` += weight * update, in place (a sparse update adds at its indices only)."""
    if update.flat is None:
        acc.add_(update.values, alpha=weight)
    else:
        acc.index_add_(0, update.flat, update.values, alpha=weight)


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


def check_weight(weight: float) -> float:
    """`weight` as a float if finite and >= 0, else AggregationError ``bad_weight``."""
    weight = float(weight)
    if not (math.isfinite(weight) and weight >= 0):
        raise AggregationError(f"update weight {weight} is not >= 0", reason="bad_weight")
    return weight


class StreamingFedAvg:
    """Weighted mean of updates (FedAvg), folded in as they arrive in O(model) memory."""

    def __init__(
        self, shapes: Mapping[str, tuple[int, ...]], device: torch.device, rule: str = "fedavg"
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
        self._count = 0
        self._total_weight = 0.0

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
        self._fold(decode_update(tensors, self._shapes, self._device), weight, weight)

    def _fold(self, decoded: list[DecodedTensor], scale: float, weight: float) -> None:
        """Add scale * the checked update to the sums and count `weight` in the total."""
        if scale > 0:
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
