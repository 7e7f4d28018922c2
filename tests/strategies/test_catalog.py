"""The strategy catalog: names, typed parameters, and errors that list the valid choices."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_coordinator.strategies import catalog
from cloud_coordinator.strategies.catalog import (
    STRATEGY_NAMES,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedProx,
    Krum,
    MultiKrum,
    NormBounded,
    StrategyError,
    TrimmedMean,
    client_prox_mu,
    is_server_optimiser,
    needs_every_update,
    parse_strategy,
    strategy_parameters,
    strategy_params_json,
)

ROOT = Path(__file__).resolve().parents[2]


def test_every_name_has_a_class_of_that_name() -> None:
    assert STRATEGY_NAMES == (
        "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox",
        "median", "trimmed_mean", "krum", "multi_krum", "norm_bounded",
    )  # fmt: skip
    for name in STRATEGY_NAMES:
        p = parse_strategy(name, {})
        assert p.name == name
        assert dataclasses.is_dataclass(p)


def test_defaults() -> None:
    assert parse_strategy("fedavgm", {}) == FedAvgM(server_lr=1.0, momentum=0.9)
    assert parse_strategy("fedadam", {}) == FedAdam(0.01, 0.9, 0.99, 1e-3)
    assert parse_strategy("fedadagrad", {}) == FedAdagrad(0.01, 1e-3, 0.0)
    assert parse_strategy("fedprox", {}) == FedProx(mu=0.01)
    assert parse_strategy("trimmed_mean", {}) == TrimmedMean(trim_fraction=0.2)
    assert parse_strategy("krum", {}) == Krum(byzantine=1)
    assert parse_strategy("multi_krum", {}) == MultiKrum(byzantine=1, keep=0)
    assert parse_strategy("norm_bounded", {}) == NormBounded(norm_bound=1.0)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_json_round_trips(name: str) -> None:
    p = parse_strategy(name, {})
    assert parse_strategy(name, strategy_params_json(p)) == p


def test_given_values_are_kept_and_ints_become_floats() -> None:
    p = parse_strategy("fedadam", {"server_lr": 1, "beta1": 0.5, "beta2": 0, "eps": 1e-8})
    assert p == FedAdam(server_lr=1.0, beta1=0.5, beta2=0.0, eps=1e-8)
    assert isinstance(p, FedAdam)
    assert type(p.server_lr) is float
    assert type(p.beta2) is float
    assert strategy_params_json(p) == {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.0, "eps": 1e-8}
    assert parse_strategy("multi_krum", {"keep": 3}) == MultiKrum(byzantine=1, keep=3)


def test_unknown_strategy_lists_every_name() -> None:
    with pytest.raises(StrategyError) as info:
        parse_strategy("fedsgd", {})
    message = str(info.value)
    assert "'fedsgd'" in message
    assert all(name in message for name in STRATEGY_NAMES)
    assert isinstance(info.value, ValueError)


def test_unknown_parameter_lists_the_strategys_parameters() -> None:
    with pytest.raises(StrategyError) as info:
        parse_strategy("fedadam", {"lr": 0.1, "beta1": 0.9})
    assert str(info.value) == (
        "strategy 'fedadam' has no parameter 'lr'; its parameters: server_lr: float > 0;"
        " beta1: float in [0, 1); beta2: float in [0, 1); eps: float > 0"
    )
    with pytest.raises(StrategyError, match="'median' has no parameter 'k'; its parameters: none"):
        parse_strategy("median", {"k": 1})


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("fedprox", {"mu": 0}, "mu: float > 0, got 0"),
        ("fedprox", {"mu": -0.1}, "mu: float > 0, got -0.1"),
        ("fedprox", {"mu": "0.1"}, "mu: float > 0, got '0.1'"),
        ("fedprox", {"mu": True}, "mu: float > 0, got True"),
        ("fedprox", {"mu": float("inf")}, "mu: float > 0, got inf"),
        ("fedavgm", {"momentum": 1.0}, "momentum: float in [0, 1), got 1.0"),
        ("fedadam", {"beta2": float("nan")}, "beta2: float in [0, 1), got nan"),
        ("fedyogi", {"eps": 0.0}, "eps: float > 0, got 0.0"),
        ("fedadagrad", {"initial_accumulator": -1}, "initial_accumulator: float >= 0"),
        ("trimmed_mean", {"trim_fraction": 0.5}, "trim_fraction: float in [0, 0.5), got 0.5"),
        ("krum", {"byzantine": -1}, "byzantine: int >= 0, got -1"),
        ("krum", {"byzantine": 1.0}, "byzantine: int >= 0, got 1.0 (not an integer)"),
        ("multi_krum", {"keep": False}, "keep: int >= 0, got False"),
        ("norm_bounded", {"norm_bound": 0}, "norm_bound: float > 0, got 0"),
    ],
)
def test_bad_values_name_the_parameter_and_its_range(
    name: str, params: dict[str, object], expected: str
) -> None:
    with pytest.raises(StrategyError) as info:
        parse_strategy(name, params)
    assert str(info.value).startswith(f"strategy {name!r}: parameter {expected}")


def test_parameters_are_frozen() -> None:
    p = FedProx(mu=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.mu = 1.0  # type: ignore[misc]


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(StrategyError, match="norm_bound"):
        NormBounded(norm_bound=-1.0)
    assert FedProx(mu=1).mu == 1.0


def test_strategy_parameters_describe_types_and_ranges() -> None:
    assert strategy_parameters("multi_krum") == {
        "byzantine": "byzantine: int >= 0",
        "keep": "keep: int >= 0",
    }
    assert strategy_parameters("fedavg") == {}
    with pytest.raises(StrategyError, match="choose one of fedavg"):
        strategy_parameters("nope")


def test_predicates() -> None:
    by_name = {name: parse_strategy(name, {}) for name in STRATEGY_NAMES}
    assert {n for n, p in by_name.items() if is_server_optimiser(p)} == {
        "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    }  # fmt: skip
    assert {n for n, p in by_name.items() if needs_every_update(p)} == {
        "median", "trimmed_mean", "krum", "multi_krum",
    }  # fmt: skip
    assert client_prox_mu(parse_strategy("fedprox", {"mu": 0.5})) == 0.5
    assert all(client_prox_mu(p) == 0.0 for n, p in by_name.items() if n != "fedprox")


def test_catalog_and_package_do_not_import_torch() -> None:
    code = (
        "import sys, cloud_coordinator.strategies, cloud_coordinator.strategies.catalog\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_module_exports_are_real() -> None:
    assert all(hasattr(catalog, name) for name in catalog.__all__)
