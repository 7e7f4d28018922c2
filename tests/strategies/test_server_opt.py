"""Server optimisers step the head exactly as torch.optim steps a parameter with grad -Δ."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt
import pytest
import torch

from cloud_coordinator.aggregation import AggregationError
from cloud_coordinator.strategies import (
    STRATEGY_NAMES,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    StrategyParams,
    is_server_optimiser,
    make_server_optimiser,
    parse_strategy,
)
from cloud_coordinator.strategies.server_opt import ServerOptimiser

F32 = npt.NDArray[np.float32]
SHAPES = {"w": (3, 4), "b": (4,)}
TorchFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

CASES: dict[str, tuple[StrategyParams, TorchFactory]] = {
    "fedavgm": (
        FedAvgM(server_lr=0.5, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
    ),
    "fedadam": (
        FedAdam(server_lr=0.1, beta1=0.8, beta2=0.95, eps=1e-3),
        lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.95), eps=1e-3),
    ),
    "fedadagrad": (
        FedAdagrad(server_lr=0.1, eps=1e-3, initial_accumulator=0.5),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-3, initial_accumulator_value=0.5),
    ),
}


def _deltas(seed: int) -> Iterator[dict[str, F32]]:
    rng = np.random.default_rng(seed)
    while True:
        yield {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _head(seed: int = 0) -> dict[str, F32]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _make(p: StrategyParams, device: torch.device) -> ServerOptimiser:
    opt = make_server_optimiser(p, SHAPES, device)
    assert opt is not None
    return opt


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_optim_across_a_state_round_trip(device: torch.device, name: str) -> None:
    params, torch_factory = CASES[name]
    head = _head()
    torch_params = [torch.nn.Parameter(torch.tensor(head[n])) for n in SHAPES]
    reference = torch_factory(torch_params)
    opt = _make(params, device)
    deltas = _deltas(1)
    for step in range(8):
        if step == 4:  # persist and restore into a fresh optimiser mid-way
            fresh = _make(params, device)
            fresh.load_state(opt.state())
            opt = fresh
        delta = next(deltas)
        for p, n in zip(torch_params, SHAPES, strict=True):
            p.grad = -torch.tensor(delta[n])
        reference.step()
        head = opt.step(head, delta)
        for p, n in zip(torch_params, SHAPES, strict=True):
            assert head[n].dtype == np.float32
            np.testing.assert_allclose(head[n], p.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert opt.steps == 8


def _yogi_reference(
    head: dict[str, F32], deltas: list[dict[str, F32]], p: FedYogi
) -> dict[str, npt.NDArray[np.float64]]:
    """Yogi by hand in float64, with Adam's bias correction."""
    out = {}
    for n in SHAPES:
        x = head[n].astype(np.float64)
        m, v = np.zeros_like(x), np.zeros_like(x)
        for t, delta in enumerate(deltas, start=1):
            g = -delta[n].astype(np.float64)
            m = p.beta1 * m + (1 - p.beta1) * g
            v = v - (1 - p.beta2) * g**2 * np.sign(v - g**2)
            m_hat = m / (1 - p.beta1**t)
            v_hat = v / (1 - p.beta2**t)
            x = x - p.server_lr * m_hat / (np.sqrt(v_hat) + p.eps)
        out[n] = x
    return out


def test_yogi_matches_a_numpy_reference(device: torch.device) -> None:
    p = FedYogi(server_lr=0.1, beta1=0.8, beta2=0.95, eps=1e-3)
    deltas = _deltas(2)
    taken = [next(deltas) for _ in range(6)]
    head = _head()
    opt = _make(p, device)
    for i, delta in enumerate(taken):
        if i == 3:
            fresh = _make(p, device)
            fresh.load_state(opt.state())
            opt = fresh
        head = opt.step(head, delta)
    expected = _yogi_reference(_head(), taken, p)
    for n in SHAPES:
        np.testing.assert_allclose(head[n], expected[n], rtol=1e-5, atol=1e-6)


def test_yogi_differs_from_adam_once_the_gradient_shrinks(device: torch.device) -> None:
    adam, yogi = _make(FedAdam(), device), _make(FedYogi(), device)
    big = {n: np.full(s, 10.0, dtype=np.float32) for n, s in SHAPES.items()}
    small = {n: np.full(s, 0.1, dtype=np.float32) for n, s in SHAPES.items()}
    heads = [_head(), _head()]
    for delta in (big, small, small):
        heads = [adam.step(heads[0], delta), yogi.step(heads[1], delta)]
    assert not np.allclose(heads[0]["w"], heads[1]["w"])


def test_state_names_shapes_and_step() -> None:
    opt = _make(FedAdam(), torch.device("cpu"))
    opt.step(_head(), _head(1))
    state = opt.state()
    assert sorted(state) == ["exp_avg/b", "exp_avg/w", "exp_avg_sq/b", "exp_avg_sq/w", "step"]
    assert state["step"].shape == ()
    assert int(state["step"]) == 1
    assert state["exp_avg/w"].shape == (3, 4)
    assert state["exp_avg/w"].dtype == np.float32
    state["exp_avg/w"][:] = 99  # a copy: scribbling on it changes nothing
    assert not (opt.state()["exp_avg/w"] == 99).any()
    assert sorted(_make(FedAvgM(), torch.device("cpu")).state()) == [
        "momentum_buffer/b", "momentum_buffer/w", "step",
    ]  # fmt: skip
    adagrad = _make(FedAdagrad(initial_accumulator=0.25), torch.device("cpu")).state()
    assert np.all(adagrad["sum/w"] == 0.25)


def _bad_states() -> dict[str, dict[str, npt.NDArray[np.generic]]]:
    good: dict[str, npt.NDArray[np.generic]] = {**_make(FedAdam(), torch.device("cpu")).state()}

    def but(key: str, value: npt.NDArray[np.generic] | None) -> dict[str, npt.NDArray[np.generic]]:
        out = dict(good)
        if value is None:
            del out[key]
        else:
            out[key] = value
        return out

    return {
        "missing": but("exp_avg/w", None),
        "unknown": but("momentum_buffer/w", np.zeros((3, 4), np.float32)),
        "wrong shape": but("exp_avg/b", np.zeros(5, np.float32)),
        "not float": but("exp_avg/b", np.zeros(4, np.int64)),
        "nan": but("exp_avg/b", np.full(4, np.nan, np.float32)),
        "negative second moment": but("exp_avg_sq/b", np.full(4, -1.0, np.float32)),
        "negative step": but("step", np.array(-1)),
        "float step": but("step", np.array(1.0)),
        "two steps": but("step", np.array([1, 2])),
    }


@pytest.mark.parametrize("case", sorted(_bad_states()))
def test_a_bad_state_is_refused_and_changes_nothing(case: str) -> None:
    opt = _make(FedAdam(), torch.device("cpu"))
    opt.step(_head(), _head(1))
    before = opt.state()
    with pytest.raises(AggregationError) as info:
        opt.load_state(_bad_states()[case])
    assert info.value.reason == "bad_state"
    after = opt.state()
    assert sorted(after) == sorted(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_a_bad_head_or_delta_is_refused_and_changes_nothing(device: torch.device) -> None:
    opt = _make(FedAvgM(), device)
    opt.step(_head(), _head(1))
    before = opt.state()
    bad_delta = {**_head(1), "b": np.zeros(5, np.float32)}
    with pytest.raises(AggregationError) as info:
        opt.step(_head(), bad_delta)
    assert info.value.reason == "bad_shape"
    with pytest.raises(AggregationError) as info:
        opt.step(_head(), {"w": _head(1)["w"]})
    assert info.value.reason == "bad_tensor"
    with pytest.raises(AggregationError) as info:
        opt.step(_head(), {**_head(1), "b": np.full(4, np.inf, np.float32)})
    assert info.value.reason == "non_finite"
    assert opt.steps == 1
    for key, value in opt.state().items():
        np.testing.assert_array_equal(value, before[key])


def test_the_callers_head_is_not_modified(device: torch.device) -> None:
    head = _head()
    head["w"].flags.writeable = False  # read-only input is fine too
    original = {n: a.copy() for n, a in head.items()}
    new = _make(FedAdam(), device).step(head, _head(1))
    for n in SHAPES:
        np.testing.assert_array_equal(head[n], original[n])
        assert not np.array_equal(new[n], original[n])


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_make_server_optimiser_only_for_server_optimisers(name: str) -> None:
    p = parse_strategy(name, {})
    opt = make_server_optimiser(p, SHAPES, torch.device("cpu"))
    assert (opt is not None) == is_server_optimiser(p)


def test_fedavgm_with_lr_one_and_no_momentum_is_fedavg(device: torch.device) -> None:
    opt = _make(FedAvgM(server_lr=1.0, momentum=0.0), device)
    head, delta = _head(), _head(1)
    new = opt.step(head, delta)
    for n in SHAPES:
        np.testing.assert_allclose(new[n], head[n] + delta[n], rtol=1e-6)
