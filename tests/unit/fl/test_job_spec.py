"""JobSpec: defaults, validation messages naming the field, JSON in and out."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from cloud_coordinator.job_spec import COMPRESSIONS, JobSpec, JobSpecError
from protocols.messages import TrainTask, decode_as, encode

FIELD_NAMES = sorted(f.name for f in dataclasses.fields(JobSpec))


def test_defaults_are_valid() -> None:
    spec = JobSpec(job_id="job-1")
    assert spec.template == "digits_mlp"
    assert spec.strategy == "fedavg"
    assert spec.compression == "f32"
    assert spec.model == "digits-mlp"  # the template name, with '-' for '_'
    assert spec.effective_quorum == spec.devices_per_round == 10
    assert JobSpec(job_id="j", model_name="my.model_2").model == "my.model_2"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_id", ""),
        ("job_id", "has space"),
        ("job_id", "a/b"),
        ("job_id", "x" * 65),
        ("model_name", "bad/name"),
        ("strategy", "fedsgd"),
        ("mode", "semi-sync"),
        ("async_buffer", -1),
        ("max_staleness", -1),
        ("staleness_exponent", -0.5),
        ("compression", "f64"),
        ("rounds", 0),
        ("devices_per_round", 0),
        ("quorum", -1),
        ("quorum", 11),
        ("round_deadline_s", 0.0),
        ("round_deadline_s", -1.0),
        ("max_train_seconds", 0.0),  # was reported as 'round_deadline_s'
        ("topk_fraction", 0.0),
        ("topk_fraction", 1.5),
        ("lr", 0.0),
        ("lr", -0.1),
        ("epochs", 0),
        ("batch_size", 0),
        ("prox_mu", -0.5),
        ("clip_norm", -1.0),
    ],
)
def test_each_validation_error_names_its_field(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {"job_id": "job-1", field: value}
    with pytest.raises(JobSpecError) as info:
        JobSpec(**kwargs)
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)  # the HTTP API maps ValueError to 400


def test_choice_errors_list_the_valid_choices() -> None:
    with pytest.raises(JobSpecError, match="fedavg"):
        JobSpec(job_id="j", strategy="nope")
    with pytest.raises(JobSpecError) as info:
        JobSpec(job_id="j", compression="f64")
    assert all(choice in str(info.value) for choice in COMPRESSIONS)


def test_boundaries_that_are_valid() -> None:
    # the longest id whose last version id, "<job_id>.r20", still fits 64 characters
    JobSpec(job_id="x" * 60, topk_fraction=1.0, quorum=10, devices_per_round=10)
    JobSpec(job_id="j", quorum=0, prox_mu=0.0, clip_norm=0.0, rounds=1, epochs=1)


def test_a_job_id_too_long_for_its_version_ids_is_refused() -> None:
    with pytest.raises(JobSpecError, match="job_id"):
        JobSpec(job_id="x" * 61, rounds=20)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_momentum_outside_zero_one_is_refused(momentum: float) -> None:
    with pytest.raises(JobSpecError, match="momentum"):
        JobSpec(job_id="j", momentum=momentum)


@pytest.mark.parametrize(
    "field",
    [
        "lr",
        "round_deadline_s",
        "max_train_seconds",
        "clip_norm",
        "prox_mu",
        "momentum",
        "topk_fraction",
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_floats_are_rejected(field: str, value: float) -> None:
    """Every comparison with NaN is False, so range checks alone let NaN through."""
    with pytest.raises(JobSpecError, match=field):
        JobSpec.from_json({"job_id": "j", field: value})


def test_nan_in_json_text_is_refused() -> None:
    """json.loads (as the HTTP API uses it) parses NaN; such a job used to be created, and
    then every task failed to encode (EncodeError: NaN or Inf) at each tick."""
    with pytest.raises(JobSpecError, match="'lr'"):
        JobSpec.from_json(json.loads('{"job_id": "j", "lr": NaN}'))


def test_a_valid_specs_hyperparams_travel_in_a_task() -> None:
    spec = JobSpec(job_id="j", lr=0.125, clip_norm=2, seed=11)
    task = TrainTask("t", "j", 1, spec.model, "j.r0", 1e9, hyperparams=spec.hyperparams())
    assert decode_as(TrainTask, encode(task)).hyperparams == spec.hyperparams()


def test_from_json_rejects_unknown_fields_and_lists_valid_ones() -> None:
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_json({"job_id": "j", "learning_rate": 0.1, "epoch": 2})
    message = str(info.value)
    assert "epoch'" in message
    assert "learning_rate" in message
    assert all(name in message for name in FIELD_NAMES)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rounds", "20"),
        ("rounds", 2.0),
        ("rounds", True),  # bool is not an int here
        ("lr", "0.1"),
        ("lr", None),
        ("template", 3),
        ("job_id", 7),
        ("compression", ["f32"]),
    ],
)
def test_from_json_rejects_wrong_types_naming_the_field(field: str, value: object) -> None:
    body: dict[str, object] = {"job_id": "j", field: value}
    with pytest.raises(JobSpecError, match=repr(field)):
        JobSpec.from_json(body)


@pytest.mark.parametrize("body", [[], "job", None, 3, [("job_id", "j")]])
def test_from_json_needs_an_object(body: object) -> None:
    with pytest.raises(JobSpecError, match="object"):
        JobSpec.from_json(body)


def test_from_json_requires_job_id() -> None:
    with pytest.raises(JobSpecError, match="'job_id' is required"):
        JobSpec.from_json({"rounds": 3})


def test_from_json_validates_values_too() -> None:
    with pytest.raises(JobSpecError, match="rounds"):
        JobSpec.from_json({"job_id": "j", "rounds": 0})


def test_ints_are_accepted_for_float_fields() -> None:
    spec = JobSpec.from_json({"job_id": "j", "lr": 1, "round_deadline_s": 5, "clip_norm": 0})
    assert spec.lr == 1.0
    assert type(spec.lr) is float
    assert type(spec.round_deadline_s) is float
    assert spec.round_deadline_s == 5.0
    assert type(spec.clip_norm) is float


def test_to_json_from_json_round_trip_through_text() -> None:
    spec = JobSpec(
        job_id="job.7",
        template="digits_cnn",
        model_name="cnn",
        rounds=3,
        devices_per_round=4,
        quorum=2,
        round_deadline_s=12.5,
        compression="topk",
        topk_fraction=0.05,
        clip_norm=1.5,
        lr=0.01,
        momentum=0.0,
        epochs=3,
        batch_size=32,
        prox_mu=0.01,
        max_train_seconds=9.0,
        data_seed=4,
        seed=9,
    )
    body = spec.to_json()
    assert sorted(body) == FIELD_NAMES
    assert JobSpec.from_json(json.loads(json.dumps(body))) == spec
    assert JobSpec.from_json(JobSpec(job_id="d").to_json()) == JobSpec(job_id="d")


@pytest.mark.parametrize(("devices", "quorum", "effective"), [(10, 0, 10), (10, 3, 3), (1, 1, 1)])
def test_effective_quorum(devices: int, quorum: int, effective: int) -> None:
    spec = JobSpec(job_id="j", devices_per_round=devices, quorum=quorum)
    assert spec.effective_quorum == effective


def test_hyperparams_carry_what_a_device_trains_with() -> None:
    spec = JobSpec(job_id="j", lr=0.2, epochs=5, max_train_seconds=7.0, seed=3, topk_fraction=0.1)
    hp = spec.hyperparams()
    assert set(hp) == {
        "lr", "momentum", "epochs", "batch_size", "prox_mu", "clip_norm",
        "topk_fraction", "max_seconds", "seed",
    }  # fmt: skip
    assert (hp["lr"], hp["epochs"], hp["max_seconds"], hp["seed"]) == (0.2, 5, 7.0, 3)
    assert hp["topk_fraction"] == 0.1
    assert all(type(v) in (int, float) for v in hp.values())


def test_spec_is_frozen() -> None:
    spec = JobSpec(job_id="j")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rounds = 3  # type: ignore[misc]


def test_strategy_parameters_are_typed_and_checked_when_the_job_is_created() -> None:
    spec = JobSpec(job_id="j", strategy="fedadam", strategy_params={"server_lr": 0.1})
    assert spec.strategy_config.server_lr == 0.1  # type: ignore[union-attr]
    with pytest.raises(JobSpecError) as info:
        JobSpec(job_id="j", strategy="fedadam", strategy_params={"lr": 0.1})
    assert "server_lr" in str(info.value)  # lists the parameters fedadam takes
    with pytest.raises(JobSpecError, match="trim_fraction"):
        JobSpec(job_id="j", strategy="trimmed_mean", strategy_params={"trim_fraction": 0.5})
    with pytest.raises(JobSpecError) as info:
        JobSpec(job_id="j", strategy="fedsgd")
    assert all(name in str(info.value) for name in ("median", "multi_krum", "fedyogi"))


def test_krum_needs_enough_updates_per_version() -> None:
    # Krum with f Byzantine devices needs n > 2f + 2 updates
    JobSpec(job_id="j", strategy="krum", strategy_params={"byzantine": 1}, devices_per_round=5)
    with pytest.raises(JobSpecError, match="quorum"):
        JobSpec(job_id="j", strategy="krum", strategy_params={"byzantine": 2},
                devices_per_round=10, quorum=6)  # fmt: skip
    with pytest.raises(JobSpecError, match="async_buffer"):
        JobSpec(job_id="j", strategy="multi_krum", mode="async", async_buffer=4)


def test_fedprox_sends_its_mu_to_devices() -> None:
    spec = JobSpec(job_id="j", strategy="fedprox", strategy_params={"mu": 0.1})
    assert spec.hyperparams()["prox_mu"] == 0.1
    with pytest.raises(JobSpecError, match="prox_mu"):
        JobSpec(job_id="j", strategy="fedprox", strategy_params={"mu": 0.1}, prox_mu=0.2)


def test_async_spec_and_staleness_weight() -> None:
    spec = JobSpec(job_id="j", mode="async", devices_per_round=4, staleness_exponent=0.5)
    assert spec.updates_per_version == 4  # async_buffer 0: the quorum
    assert JobSpec(job_id="j", mode="async", async_buffer=3).updates_per_version == 3
    assert spec.staleness_weight(0) == 1.0
    assert spec.staleness_weight(3) == pytest.approx(0.5)


def test_strategy_params_from_json() -> None:
    body = {"job_id": "j", "strategy": "multi_krum", "strategy_params": {"byzantine": 2}}
    spec = JobSpec.from_json(body)
    assert JobSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    for bad in ({"byzantine": "2"}, {"byzantine": True}, [1]):
        with pytest.raises(JobSpecError, match="strategy"):
            JobSpec.from_json({**body, "strategy_params": bad})


def test_multi_krum_cannot_keep_more_than_the_good_updates() -> None:
    with pytest.raises(JobSpecError, match="keep 50 is more than the 4 updates"):
        JobSpec(job_id="j", strategy="multi_krum", devices_per_round=10, quorum=5,
                strategy_params={"byzantine": 1, "keep": 50})  # fmt: skip
    with pytest.raises(JobSpecError, match="keep 5 is more than the 4"):
        JobSpec(job_id="j", strategy="multi_krum", devices_per_round=10, quorum=5,
                strategy_params={"byzantine": 1, "keep": 5})  # fmt: skip
    spec = JobSpec(job_id="j", strategy="multi_krum", devices_per_round=10, quorum=5,
                   strategy_params={"byzantine": 1, "keep": 4})  # fmt: skip
    assert spec.updates_per_version == 5
