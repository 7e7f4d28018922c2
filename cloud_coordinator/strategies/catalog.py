"""The aggregation strategies a job may name, and their typed, validated parameters.

One frozen dataclass per strategy; `parse_strategy` builds one from a name and a mapping
(a job file, the API, the CLI), refusing unknown names, unknown parameters, wrong types
and out-of-range values with a `StrategyError` that lists the valid choices. Pure: no
torch here, so job validation and the CLI can import it cheaply.

Semantics (the rules themselves live in `kernels`, `rules` and `server_opt`):

- ``fedavg``: sample-weighted mean of the updates; new head = head + mean.
- ``fedprox``: the same aggregate; devices add ``mu/2 * ||w - w_head||^2`` to their loss.
- ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``: the weighted mean Δ is a
  pseudo-gradient ``g = -Δ`` for a server optimiser (SGD with momentum, Adam, Yogi,
  Adagrad as torch defines them) that steps the head.
- ``median``, ``trimmed_mean``: coordinate-wise and unweighted (every accepted update
  counts once, whatever its sample count).
- ``krum``: the one update with the lowest Krum score; ``multi_krum``: the sample-weighted
  mean of the ``keep`` lowest-scoring updates (scores computed once).
- ``norm_bounded``: FedAvg of updates each scaled by ``min(1, norm_bound / ||update||)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

STRATEGY_NAMES: tuple[str, ...] = (
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "norm_bounded",
)


class StrategyError(ValueError):
    """A strategy name or parameter is invalid; the message lists the valid choices."""


def _param(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with its allowed range kept in the field's metadata."""
    return field(default=default, metadata={"gt": gt, "ge": ge, "lt": lt})


def _describe(f: dataclasses.Field[Any]) -> str:
    """``name: type range`` of one parameter, e.g. ``momentum: float in [0, 1)``."""
    kind = "int" if f.type in (int, "int") else "float"
    gt, ge, lt = f.metadata.get("gt"), f.metadata.get("ge"), f.metadata.get("lt")
    low = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else None
    if low is not None and lt is not None:
        return f"{f.name}: {kind} in {low}, {lt:g})"
    if gt is not None:
        return f"{f.name}: {kind} > {gt:g}"
    if ge is not None:
        return f"{f.name}: {kind} >= {ge:g}"
    return f"{f.name}: {kind}"


class _Params:
    """Checks every field against its declared type and range after construction."""

    __slots__ = ()
    name: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            given = getattr(self, f.name)
            wants_int = f.type in (int, "int")
            bad = f"strategy {self.name!r}: parameter {_describe(f)}, got {given!r}"
            if isinstance(given, bool) or not isinstance(given, int | float):
                raise StrategyError(bad)
            if wants_int and not isinstance(given, int):
                raise StrategyError(f"{bad} (not an integer)")
            value = given if wants_int else float(given)
            gt, ge, lt = f.metadata.get("gt"), f.metadata.get("ge"), f.metadata.get("lt")
            if (
                not math.isfinite(value)
                or (gt is not None and not value > gt)
                or (ge is not None and not value >= ge)
                or (lt is not None and not value < lt)
            ):
                raise StrategyError(bad)
            object.__setattr__(self, f.name, value)  # ints are accepted for floats


@dataclass(frozen=True, slots=True)
class FedAvg(_Params):
    """Sample-weighted mean of the updates."""

    name: ClassVar[str] = "fedavg"


@dataclass(frozen=True, slots=True)
class FedProx(_Params):
    """FedAvg on the server; `mu` is the proximal term's weight in each device's loss."""

    name: ClassVar[str] = "fedprox"
    mu: float = _param(0.01, gt=0)


@dataclass(frozen=True, slots=True)
class FedAvgM(_Params):
    """Server SGD with momentum on the pseudo-gradient -mean (torch.optim.SGD semantics)."""

    name: ClassVar[str] = "fedavgm"
    server_lr: float = _param(1.0, gt=0)
    momentum: float = _param(0.9, ge=0, lt=1)


@dataclass(frozen=True, slots=True)
class FedAdam(_Params):
    """Server Adam on the pseudo-gradient -mean (torch.optim.Adam, bias-corrected)."""

    name: ClassVar[str] = "fedadam"
    server_lr: float = _param(0.01, gt=0)
    beta1: float = _param(0.9, ge=0, lt=1)
    beta2: float = _param(0.99, ge=0, lt=1)
    eps: float = _param(1e-3, gt=0)


@dataclass(frozen=True, slots=True)
class FedYogi(_Params):
    """Server Yogi on the pseudo-gradient -mean (Adam with Yogi's additive second moment)."""

    name: ClassVar[str] = "fedyogi"
    server_lr: float = _param(0.01, gt=0)
    beta1: float = _param(0.9, ge=0, lt=1)
    beta2: float = _param(0.99, ge=0, lt=1)
    eps: float = _param(1e-3, gt=0)


@dataclass(frozen=True, slots=True)
class FedAdagrad(_Params):
    """Server Adagrad on the pseudo-gradient -mean (torch.optim.Adagrad, no lr decay)."""

    name: ClassVar[str] = "fedadagrad"
    server_lr: float = _param(0.01, gt=0)
    eps: float = _param(1e-3, gt=0)
    initial_accumulator: float = _param(0.0, ge=0)


@dataclass(frozen=True, slots=True)
class Median(_Params):
    """Coordinate-wise median of the updates, unweighted (even count: mean of the middle two)."""

    name: ClassVar[str] = "median"


@dataclass(frozen=True, slots=True)
class TrimmedMean(_Params):
    """Coordinate-wise mean after dropping floor(trim_fraction * n) values at each end."""

    name: ClassVar[str] = "trimmed_mean"
    trim_fraction: float = _param(0.2, ge=0, lt=0.5)


@dataclass(frozen=True, slots=True)
class Krum(_Params):
    """The update closest to its n - byzantine - 2 nearest others (needs n > 2*byzantine + 2)."""

    name: ClassVar[str] = "krum"
    byzantine: int = _param(1, ge=0)


@dataclass(frozen=True, slots=True)
class MultiKrum(_Params):
    """Weighted mean of the `keep` best Krum-scored updates (0: n - byzantine of them)."""

    name: ClassVar[str] = "multi_krum"
    byzantine: int = _param(1, ge=0)
    keep: int = _param(0, ge=0)


@dataclass(frozen=True, slots=True)
class NormBounded(_Params):
    """FedAvg of updates each scaled down to an L2 norm of at most `norm_bound`."""

    name: ClassVar[str] = "norm_bounded"
    norm_bound: float = _param(1.0, gt=0)


StrategyParams: TypeAlias = (
    FedAvg
    | FedAvgM
    | FedAdam
    | FedYogi
    | FedAdagrad
    | FedProx
    | Median
    | TrimmedMean
    | Krum
    | MultiKrum
    | NormBounded
)

_CLASSES: dict[str, type[StrategyParams]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedProx,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
        NormBounded,
    )
}


def strategy_parameters(name: str) -> dict[str, str]:
    """Each parameter of strategy `name` with its type and range; StrategyError if unknown."""
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise StrategyError(
            f"unknown aggregation strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}"
        )
    return {f.name: _describe(f) for f in dataclasses.fields(cls)}


def parse_strategy(name: str, params: Mapping[str, object]) -> StrategyParams:
    """The validated parameters of strategy `name`, defaults filled in; else StrategyError."""
    described = strategy_parameters(name)
    unknown = sorted(str(key) for key in params if key not in described)
    if unknown:
        valid = "; ".join(described.values()) or "none"
        raise StrategyError(
            f"strategy {name!r} has no parameter {', '.join(map(repr, unknown))};"
            f" its parameters: {valid}"
        )
    return _CLASSES[name](**params)  # type: ignore[arg-type]


def strategy_params_json(p: StrategyParams) -> dict[str, float | int]:
    """Every parameter of `p` by name: what `parse_strategy(p.name, ...)` takes back."""
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}


def client_prox_mu(p: StrategyParams) -> float:
    """The proximal weight devices train with: FedProx's `mu`, else 0.0."""
    return p.mu if isinstance(p, FedProx) else 0.0


def is_server_optimiser(p: StrategyParams) -> bool:
    """True when the aggregate is a pseudo-gradient for a stateful server optimiser."""
    return isinstance(p, FedAvgM | FedAdam | FedYogi | FedAdagrad)


def needs_every_update(p: StrategyParams) -> bool:
    """True when the rule keeps every update until the round ends (not streaming)."""
    return isinstance(p, Median | TrimmedMean | Krum | MultiKrum)


__all__ = [
    "STRATEGY_NAMES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Krum",
    "Median",
    "MultiKrum",
    "NormBounded",
    "StrategyError",
    "StrategyParams",
    "TrimmedMean",
    "client_prox_mu",
    "is_server_optimiser",
    "needs_every_update",
    "parse_strategy",
    "strategy_parameters",
    "strategy_params_json",
]
