"""train_head in-process: digits with the 64-512-256-10 MLP, FedProx, time bound, bad requests."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from agent.errors import AgentError
from agent.train_messages import TrainingError, decode_message, encode_message
from agent.train_worker import build_head, train_head
from protocols.model_format import LayerSpec, head_shapes
from tests.agent_training.conftest import MLP, Digits


def _request(digits: Digits, **overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "features": digits.x_train,
        "labels": digits.y_train,
        "val_features": digits.x_val,
        "val_labels": digits.y_val,
        "layers": MLP,
        "threads": 1,
    }
    request.update(overrides)
    return request


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


def test_build_head_matches_the_shared_shapes() -> None:
    head = build_head(MLP)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == head_shapes(MLP)


def test_digits_go_from_chance_to_above_90_percent(digits: Digits) -> None:
    started = time.monotonic()
    result = train_head(_request(digits, epochs=3))
    elapsed = time.monotonic() - started
    metrics = result["metrics"]
    assert metrics["val_acc_before"] < 0.2
    assert metrics["val_acc_after"] > 0.9
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["samples"] == len(digits.y_train)
    assert metrics["samples_seen"] == 3 * len(digits.y_train)
    assert metrics["epochs_done"] == 3
    assert metrics["stopped_by_time"] is False
    assert metrics["val_samples"] == len(digits.y_val)
    assert 0 < metrics["train_seconds"] <= elapsed
    head = result["head"]
    assert {k: v.shape for k, v in head.items()} == head_shapes(MLP)
    assert all(v.dtype == np.float32 for v in head.values())


def test_a_given_head_is_the_starting_point(digits: Digits) -> None:
    first = train_head(_request(digits, epochs=1))
    second = train_head(_request(digits, head=first["head"], epochs=1, seed=1))
    assert second["metrics"]["val_acc_before"] == pytest.approx(first["metrics"]["val_acc_after"])
    assert second["metrics"]["val_loss_before"] == pytest.approx(
        first["metrics"]["val_loss_after"], rel=1e-5
    )


def test_same_seed_same_result(digits: Digits) -> None:
    a = train_head(_request(digits, epochs=1, seed=7))
    b = train_head(_request(digits, epochs=1, seed=7))
    for name in a["head"]:
        np.testing.assert_array_equal(a["head"][name], b["head"][name])


def test_the_callers_head_is_not_modified(digits: Digits) -> None:
    base = train_head(_request(digits, epochs=1))["head"]
    copies = {k: v.copy() for k, v in base.items()}
    train_head(_request(digits, head=base, epochs=1))
    for name in base:
        np.testing.assert_array_equal(base[name], copies[name])


def test_fedprox_with_a_huge_mu_stays_at_the_base(digits: Digits) -> None:
    base = train_head(_request(digits, epochs=1))["head"]
    free = train_head(_request(digits, head=base, epochs=1, prox_mu=0.0))["head"]
    held = train_head(_request(digits, head=base, epochs=1, prox_mu=1e6))["head"]
    moved = _distance(free, base)
    assert moved > 0.1
    assert _distance(held, base) < 1e-3 * moved


def test_fedprox_with_a_moderate_mu_moves_less(digits: Digits) -> None:
    base = train_head(_request(digits, epochs=1))["head"]
    free = train_head(_request(digits, head=base, epochs=2))["head"]
    prox = train_head(_request(digits, head=base, epochs=2, prox_mu=1.0))["head"]
    assert _distance(prox, base) < _distance(free, base)


@pytest.mark.wallclock
def test_max_seconds_stops_between_batches(digits: Digits) -> None:
    started = time.monotonic()
    result = train_head(_request(digits, epochs=100_000, max_seconds=0.5))
    elapsed = time.monotonic() - started
    metrics = result["metrics"]
    assert metrics["stopped_by_time"] is True
    assert metrics["steps"] >= 1
    assert metrics["epochs_done"] < 100_000
    assert elapsed < 0.5 + 1.0  # one batch plus the final evaluation, with slack for CI


def test_at_least_one_batch_runs(digits: Digits) -> None:
    metrics = train_head(_request(digits, max_seconds=0.0))["metrics"]
    assert metrics["steps"] == 1
    assert metrics["samples_seen"] == 16  # the default batch size


def test_without_a_validation_split_there_are_no_val_metrics(digits: Digits) -> None:
    request = _request(digits, epochs=1)
    del request["val_features"], request["val_labels"]
    metrics = train_head(request)["metrics"]
    assert not any(key.startswith("val_") for key in metrics)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"features": np.zeros((4, 63), np.float32), "labels": np.zeros(4)}, "do not fit"),
        ({"labels": np.full(1437, 10)}, r"labels must lie in 0\.\.9"),  # 1437 training rows
        ({"labels": np.zeros(3)}, "labels for"),
        ({"head": {"0.weight": np.zeros((2, 2))}}, "do not match the layers"),
        ({"layers": (LayerSpec("linear", 64, 8), LayerSpec("linear", 9, 10))}, "bad head layers"),
        ({"layers": (LayerSpec("relu"),)}, "no linear layer"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"prox_mu": -1.0}, "prox_mu must not be negative"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr": 1e6, "epochs": 1}, "diverged"),
    ],
)
def test_bad_requests_raise_a_training_error(
    digits: Digits, overrides: dict[str, Any], message: str
) -> None:
    request = _request(digits, **overrides)
    with pytest.raises(TrainingError, match=message) as info:
        train_head(request)
    assert isinstance(info.value, AgentError)


def test_messages_round_trip_without_pickle(digits: Digits) -> None:
    request = _request(digits, lr=0.1, epochs=2, prox_mu=0.5, max_seconds=None)
    request["head"] = train_head(_request(digits, epochs=1))["head"]
    payload = encode_message("train", request)
    assert b"pickle" not in payload
    op, back = decode_message(payload)
    assert op == "train"
    np.testing.assert_array_equal(back["features"], digits.x_train)
    np.testing.assert_array_equal(back["labels"], digits.y_train)
    assert back["labels"].dtype == np.int64
    np.testing.assert_array_equal(back["val_labels"], digits.y_val)
    assert back["layers"] == MLP
    assert (back["lr"], back["epochs"], back["prox_mu"], back["max_seconds"]) == (0.1, 2, 0.5, None)
    for name, array in request["head"].items():
        np.testing.assert_array_equal(back["head"][name], array)


def test_results_round_trip(digits: Digits) -> None:
    result = train_head(_request(digits, epochs=1))
    op, back = decode_message(encode_message("result", result))
    assert op == "result"
    assert back["metrics"] == result["metrics"]
    for name, array in result["head"].items():
        np.testing.assert_array_equal(back["head"][name], array)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00garbage", b"\x81\xa1v\x02", b"\x83\xa1v\x01\xa2op\xa5train\xa7tensors\x91\x01"],
)
def test_malformed_messages_raise_a_training_error(payload: bytes) -> None:
    with pytest.raises(TrainingError):
        decode_message(payload)
