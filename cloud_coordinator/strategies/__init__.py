"""Aggregation strategies: the catalog of names and parameters, and the factories for them.

Importing this package (or `catalog`) does not import torch: job validation and the CLI
only need the catalog. The factories import the torch-backed rules when first called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from cloud_coordinator.strategies.catalog import (
    STRATEGY_NAMES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    NormBounded,
    StrategyError,
    StrategyParams,
    TrimmedMean,
    client_prox_mu,
    is_server_optimiser,
    needs_every_update,
    parse_strategy,
    strategy_parameters,
    strategy_params_json,
)

if TYPE_CHECKING:
    import torch

    from cloud_coordinator.aggregation import Aggregator
    from cloud_coordinator.strategies.server_opt import ServerOptimiser


def make_aggregator(
    p: StrategyParams,
    shapes: Mapping[str, tuple[int, ...]],
    device: torch.device,
    *,
    expected_updates: int = 0,
) -> Aggregator:
    """A fresh aggregator for one round of strategy `p` (buffered rules preallocate rows)."""
    from cloud_coordinator.aggregation import StreamingFedAvg
    from cloud_coordinator.strategies.rules import BufferedRule, NormBoundedFedAvg

    if isinstance(p, NormBounded):
        return NormBoundedFedAvg(shapes, device, p.norm_bound)
    if isinstance(p, Median | TrimmedMean | Krum | MultiKrum):
        return BufferedRule(p, shapes, device, capacity=max(8, expected_updates))
    return StreamingFedAvg(shapes, device, rule=p.name)


def make_server_optimiser(
    p: StrategyParams, shapes: Mapping[str, tuple[int, ...]], device: torch.device
) -> ServerOptimiser | None:
    """The server optimiser of `p`, or None when the new head is simply head + aggregate."""
    from cloud_coordinator.strategies import server_opt

    if isinstance(p, FedAvgM):
        return server_opt.FedAvgMOptimiser(p, shapes, device)
    if isinstance(p, FedAdam):
        return server_opt.FedAdamOptimiser(p, shapes, device)
    if isinstance(p, FedYogi):
        return server_opt.FedYogiOptimiser(p, shapes, device)
    if isinstance(p, FedAdagrad):
        return server_opt.FedAdagradOptimiser(p, shapes, device)
    return None


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
    "make_aggregator",
    "make_server_optimiser",
    "needs_every_update",
    "parse_strategy",
    "strategy_parameters",
    "strategy_params_json",
]
