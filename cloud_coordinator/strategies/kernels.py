"""Pure tensor kernels of the aggregation strategies, the same code on ``cpu`` and ``cuda``.

Every tensor function takes a ``device``: inputs are moved there (and made float32) when
they are not already, and results stay there. Updates come stacked as ``rows``, an
``n x d`` float32 matrix with one flattened update per row. Nothing here validates update
contents (the rules do that before a row is stored); a count a rule cannot work with is
an `AggregationError` with reason ``too_few``.

Choices made here:

- the median of an even count is the mean of the two middle values (not torch's lower
  middle), so a median of two updates is their mean;
- median and trimmed mean work on column blocks of about 2**21 elements on CPU (cache
  sized; 2**26 elsewhere), which also bounds the memory of the sort's index output;
- squared distances use the Gram form ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product, fast
  on GPU) in float32, clamped at 0; one that overflows float32 counts as +inf;
- Multi-Krum scores every row once and keeps the ``keep`` lowest (ties: lower row first),
  rather than re-scoring after each pick.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from cloud_coordinator.aggregation import AggregationError

_CPU_BLOCK = 1 << 21
_GPU_BLOCK = 1 << 26


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` as float32 on `device` (itself when it already is)."""
    return x.to(device=device, dtype=torch.float32)


def _by_columns(
    rows: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> torch.Tensor:
    """``fn`` applied to blocks of whole columns of `rows`, concatenated into one row."""
    rows = _on(rows, device)
    n, d = rows.shape
    width = max(1, (_CPU_BLOCK if rows.device.type == "cpu" else _GPU_BLOCK) // max(n, 1))
    if width >= d:
        return fn(rows)
    out = torch.empty(d, dtype=torch.float32, device=rows.device)
    for start in range(0, d, width):
        out[start : start + width] = fn(rows[:, start : start + width])
    return out


def _need_rows(rows: torch.Tensor, needed: int, what: str) -> None:
    if rows.dim() != 2:
        raise ValueError(f"rows must be an n x d matrix, got shape {tuple(rows.shape)}")
    if rows.shape[0] < needed:
        raise AggregationError(
            f"{what} needs at least {needed} updates, got {rows.shape[0]}", reason="too_few"
        )


def weighted_sum(
    rows: torch.Tensor, weights: torch.Tensor | Sequence[float], device: torch.device
) -> torch.Tensor:
    """``sum_i weights[i] * rows[i]``: one d-vector from an n x d matrix and n weights."""
    rows = _on(rows, device)
    w = torch.as_tensor(weights, dtype=torch.float32).to(rows.device)
    if w.shape != rows.shape[:1]:
        raise ValueError(f"{w.numel()} weights for {rows.shape[0]} rows")
    return w @ rows  # one pass over the rows (a matrix-vector product)


def weighted_mean(
    rows: torch.Tensor, weights: torch.Tensor | Sequence[float], device: torch.device
) -> torch.Tensor:
    """`weighted_sum` divided by the total weight, which must be > 0."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    total = float(w.sum())
    if not total > 0:
        raise AggregationError(f"no weight to average (total weight {total})", reason="empty")
    return weighted_sum(rows, w, device).div_(total)


def _median_block(block: torch.Tensor) -> torch.Tensor:
    n = block.shape[0]
    lower = torch.median(block, dim=0).values  # torch's median: the lower middle value
    if n % 2:
        return lower
    # The upper middle is `lower` again when more than n/2 values are <= it, else the
    # smallest value above it: two elementwise passes instead of a second selection.
    above = block > lower
    next_up = torch.where(above, block, math.inf).amin(dim=0)
    upper = torch.where(n - above.sum(dim=0) > n // 2, lower, next_up)
    # Of opposite signs, the two cannot overflow their sum, and the gap would lose the
    # small difference between them (-1 and 1 + 2**-23 give 0, not 2**-24): half the sum.
    # Of the same sign, the gap cannot overflow, and lower + half of it stays within
    # [lower, upper], subnormals included.
    straddle = (lower < 0) != (upper < 0)
    return torch.where(straddle, (lower + upper) * 0.5, torch.add(lower, upper - lower, alpha=0.5))


def coordinate_median(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-coordinate median of the rows; for an even count the mean of the middle two."""
    _need_rows(rows, 1, "the median")
    return _by_columns(rows, _median_block, device)


def trim_count(n: int, trim_fraction: float) -> int:
    """How many values trimmed mean drops at each end of n: floor(trim_fraction * n)."""
    return math.floor(trim_fraction * n)


def trimmed_mean(rows: torch.Tensor, trim_per_side: int, device: torch.device) -> torch.Tensor:
    """Per-coordinate mean after dropping the `trim_per_side` lowest and highest values."""
    if trim_per_side < 0:
        raise ValueError(f"trim_per_side must be >= 0, got {trim_per_side}")
    _need_rows(rows, 2 * trim_per_side + 1, f"trimmed mean dropping {trim_per_side} per side")
    n, k = rows.shape[0], trim_per_side
    if k == 0:
        return _on(rows, device).mean(dim=0)

    def block_mean(block: torch.Tensor) -> torch.Tensor:
        return torch.sort(block, dim=0).values[k : n - k].mean(dim=0)

    return _by_columns(rows, block_mean, device)


def pairwise_sq_distances(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """n x n squared L2 distances between rows (Gram form, float32, >= 0, zero diagonal).

    The rows are centred on their coordinate-wise median first: distances do not change,
    but the Gram form's cancellation (|a|² + |b|² - 2a·b, each term of the size of |a|²)
    would drown small distances between updates that share a large common part. The
    median, unlike the mean, is not dragged away by an outlier (the rows Krum exists for)."""
    rows = _on(rows, device)
    rows = rows - rows.median(dim=0, keepdim=True).values
    gram = rows @ rows.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :]).sub_(gram, alpha=2)
    dist = torch.nan_to_num(dist, nan=math.inf, posinf=math.inf).clamp_(min=0)  # inf - inf
    return dist.fill_diagonal_(0)


def krum_scores(distances: torch.Tensor, byzantine: int, device: torch.device) -> torch.Tensor:
    """Each row's Krum score: the sum of its n - byzantine - 2 smallest distances to others."""
    n = distances.shape[0]
    _need_rows(distances, 2 * byzantine + 3, f"Krum with {byzantine} Byzantine updates")
    others = _on(distances, device).clone().fill_diagonal_(math.inf)
    return torch.topk(others, n - byzantine - 2, dim=1, largest=False).values.sum(dim=1)


def krum_select(rows: torch.Tensor, byzantine: int, keep: int, device: torch.device) -> list[int]:
    """Indices of the `keep` rows with the lowest Krum scores, best first (ties: lower index)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    _need_rows(rows, max(2 * byzantine + 3, keep), f"Krum keeping {keep} of n, {byzantine} bad")
    scores = krum_scores(pairwise_sq_distances(rows, device), byzantine, device)
    return [int(i) for i in torch.sort(scores.cpu(), stable=True).indices[:keep]]


def update_norm(values: Sequence[torch.Tensor], device: torch.device) -> float:
    """The L2 norm of all the tensors together as one vector (exact past float32's range)."""
    if not values:
        return 0.0
    on = [_on(v, device) for v in values]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in on])))
    if math.isinf(norm):  # squares overflowed float32: redo the rare huge update in float64
        parts = [torch.linalg.vector_norm(v, dtype=torch.float64) for v in on]
        norm = float(torch.linalg.vector_norm(torch.stack(parts)))
    return norm


def clip_factor(norm: float, norm_bound: float) -> float:
    """``min(1, norm_bound / norm)``: the scale that brings an update's L2 norm within bound."""
    if not norm_bound > 0:
        raise ValueError(f"norm_bound must be > 0, got {norm_bound}")
    return 1.0 if norm <= norm_bound else norm_bound / norm


def sgd_momentum_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    device: torch.device,
) -> None:
    """In place, as torch.optim.SGD (no dampening, no Nesterov): buf = m*buf + g; p -= lr*buf."""
    momentum_buffer.mul_(momentum).add_(_on(grad, device))
    param.add_(momentum_buffer, alpha=-lr)


def _adaptive_step(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), as torch's Adam."""
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    device: torch.device,
) -> None:
    """In place, as torch.optim.Adam at step number `step` (>= 1), bias-corrected."""
    g = _on(grad, device)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    _adaptive_step(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)


def yogi_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    device: torch.device,
) -> None:
    """In place: Adam with Yogi's v -= (1 - beta2) * g^2 * sign(v - g^2), same bias terms."""
    g = _on(grad, device)
    exp_avg.lerp_(g, 1 - beta1)
    g2 = g * g
    exp_avg_sq.addcmul_(g2, torch.sign(exp_avg_sq - g2), value=-(1 - beta2))
    _adaptive_step(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)


def adagrad_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    sum_sq: torch.Tensor,
    *,
    lr: float,
    eps: float,
    device: torch.device,
) -> None:
    """In place, as torch.optim.Adagrad without lr decay: s += g^2; p -= lr*g/(sqrt(s)+eps)."""
    g = _on(grad, device)
    sum_sq.addcmul_(g, g, value=1)
    param.addcdiv_(g, sum_sq.sqrt().add_(eps), value=-lr)


__all__ = [
    "adagrad_step",
    "adam_step",
    "clip_factor",
    "coordinate_median",
    "krum_scores",
    "krum_select",
    "pairwise_sq_distances",
    "sgd_momentum_step",
    "trim_count",
    "trimmed_mean",
    "update_norm",
    "weighted_mean",
    "weighted_sum",
    "yogi_step",
]
