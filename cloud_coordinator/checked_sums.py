"""Running weighted sums on the CPU, each update folded and checked in one pass.

`StreamingFedAvg` must refuse an update holding NaN or Inf and leave its sums exactly as
they were. With torch alone that costs two passes over each update: a finiteness sum,
then the fold (torch has no operation that adds and reduces at once). `CheckedSums` does
both in one pass, with the C kernel ``cloud_coordinator._fold`` (`_fold.c`): it adds
``scale * update`` into the sums in place and tests each new value while it is still in a
register. That also refuses an update whose sum would overflow float32, at the update
that does it.

A refused update has already been written into the sums when it is found out, so they
are restored, bit for bit: from a snapshot (or zeros), then by folding again, in order,
the updates accepted since the snapshot, which it keeps (their tensors are views into
their payloads, so keeping them costs the payloads' memory). A new snapshot is taken
once those would exceed ``keep_bytes``; with the 64 MiB default and a 4 MB update that is
one copy of the sums every 16 updates. Folding is elementwise, so the replay gives the
same bits whatever the thread count.

`usable` says whether the kernel is built and the sums suit it (CPU, float32, and at
least two updates' worth of ``keep_bytes``); otherwise `StreamingFedAvg` keeps its
two-pass torch path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

_fold_f32: Callable[[npt.NDArray[np.float32], npt.NDArray[Any], float, int], bool] | None
try:  # torch first (above): the kernel then shares torch's OpenMP runtime and threads
    from cloud_coordinator._fold import fold_f32 as _fold_f32
except ImportError:  # not built (no C compiler or OpenMP where fedge was installed)
    _fold_f32 = None

KEEP_BYTES = 64 << 20

# (name of the sum, float32 values, flat int64 indices or None for every element)
Part = tuple[str, torch.Tensor, torch.Tensor | None]


class NotFiniteError(ArithmeticError):
    """Folding an update made a sum NaN or Inf; the sums were restored. ``name``: which."""

    def __init__(self, name: str) -> None:
        super().__init__(f"tensor {name!r} holds NaN or Inf, or its sum overflows float32")
        self.name = name


def kernel_built() -> bool:
    """Whether the C kernel was compiled into this installation."""
    return _fold_f32 is not None


def usable(sums: Mapping[str, torch.Tensor], keep_bytes: int = KEEP_BYTES) -> bool:
    """Whether `CheckedSums` can hold `sums`: kernel built, CPU float32, room to replay."""
    if _fold_f32 is None or not sums:
        return False
    size = sum(s.numel() * 4 for s in sums.values())
    return 2 * size <= keep_bytes and all(
        s.device.type == "cpu" and s.dtype == torch.float32 and s.is_contiguous()
        for s in sums.values()
    )


class CheckedSums:
    """Zero-started float32 sums += scale * update, each update all or nothing."""

    def __init__(self, sums: Mapping[str, torch.Tensor], keep_bytes: int = KEEP_BYTES) -> None:
        if not usable(sums, keep_bytes):
            raise ValueError("CheckedSums needs the C kernel and CPU float32 sums (see usable)")
        self._sums = dict(sums)
        self._arrays: dict[str, npt.NDArray[np.float32]] = {
            name: s.view(-1).numpy() for name, s in self._sums.items()
        }
        self._keep_bytes = keep_bytes
        self._snapshot: dict[str, torch.Tensor] | None = None  # None: all zeros
        self._since: list[tuple[Sequence[Part], float]] = []
        self._since_bytes = 0
        self.snapshots = 0  # how many were taken (for tests and reports)
        self.restores = 0

    def add(self, parts: Sequence[Part], scale: float) -> None:
        """Add `scale` * each part to its sum, or raise NotFiniteError with the sums unchanged."""
        for name, values, _ in parts:  # checked first: nothing is folded unless all can be
            if name not in self._sums or values.dtype != torch.float32:
                raise ValueError(f"tensor {name!r}: no such sum, or values not float32")
            if not values.is_contiguous():
                raise ValueError(f"tensor {name!r}: values must be contiguous")
        size = sum(_nbytes(part) for part in parts)
        if self._since_bytes + size > self._keep_bytes:
            self._take_snapshot()
        for part in parts:
            if not self._fold(part, scale):
                self._restore()
                raise NotFiniteError(part[0])
        self._since.append((parts, scale))
        self._since_bytes += size

    def _fold(self, part: Part, scale: float) -> bool:
        name, values, flat = part
        if flat is None:
            assert _fold_f32 is not None
            return _fold_f32(self._arrays[name], values.numpy(), scale, torch.get_num_threads())
        acc = self._sums[name].view(-1)
        acc.index_add_(0, flat, values, alpha=scale)
        # only the elements it touched can have become NaN or Inf
        return math.isfinite(acc[flat].sum().item()) or bool(torch.isfinite(acc[flat]).all())

    def _take_snapshot(self) -> None:
        if self._snapshot is None:
            self._snapshot = {name: torch.empty_like(s) for name, s in self._sums.items()}
        for name, s in self._sums.items():
            self._snapshot[name].copy_(s)
        self._since.clear()
        self._since_bytes = 0
        self.snapshots += 1

    def _restore(self) -> None:
        for name, s in self._sums.items():
            if self._snapshot is None:
                s.zero_()
            else:
                s.copy_(self._snapshot[name])
        for parts, scale in self._since:
            for part in parts:
                if not self._fold(part, scale):  # it passed before: the same bits again
                    raise RuntimeError(f"replaying {part[0]!r} gave a different result")
        self.restores += 1


def _nbytes(part: Part) -> int:
    _, values, flat = part
    return values.numel() * values.element_size() + (0 if flat is None else flat.numel() * 8)


__all__ = ["KEEP_BYTES", "CheckedSums", "NotFiniteError", "Part", "kernel_built", "usable"]
