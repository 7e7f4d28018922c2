"""Updates as torch tensors: each wire tensor of an update decoded onto a device and checked.

`decode_update` turns the `WireTensor`s of one update into flat float32 tensors on the
aggregation device (zero-copy views of the payload on the CPU for f32; on another device
the compact wire bytes travel, then widen), after checking the tensors' names, shapes,
byte counts, sparse indices and, unless the caller's fold does it, NaN/Inf. A refusal
raises `AggregationError`, whose ``reason`` is one of `REASONS`. `cloud_coordinator.aggregation`
re-exports all of it.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
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

_WIRE_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i8": torch.int8,
}


class AggregationError(CoordinatorError):
    """An update (or a request to the aggregate) was refused; ``reason`` says why."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    check_finite: bool = True,
) -> list[DecodedTensor]:
    """Every tensor of one update, flat on `device` and checked, or AggregationError.

    With ``check_finite=False`` NaN and Inf pass: for a caller whose fold checks them.
    """
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
    if check_finite and not all_finite([d.values for d in decoded]):
        bad = [d.name for d in decoded if not all_finite([d.values])]
        raise AggregationError(f"tensors {bad} hold NaN or Inf", reason="non_finite")
    return decoded


def check_weight(weight: float) -> float:
    """`weight` as a float if finite and >= 0, else AggregationError ``bad_weight``."""
    weight = float(weight)
    if not (math.isfinite(weight) and weight >= 0):
        raise AggregationError(f"update weight {weight} is not >= 0", reason="bad_weight")
    return weight


__all__ = [
    "REASONS",
    "AggregationError",
    "DecodedTensor",
    "all_finite",
    "check_weight",
    "decode_to_torch",
    "decode_update",
    "dense_to_torch",
    "sparse_to_torch",
]
