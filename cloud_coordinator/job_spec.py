"""What a federated training job asks for: one frozen, validated object.

Invalid values are rejected when the job is created, with a message naming the field and
the valid choices, so a job never fails hours later on a typo.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from cloud_coordinator.strategies.catalog import (
    STRATEGY_NAMES,
    StrategyError,
    StrategyParams,
    client_prox_mu,
    parse_strategy,
)
from protocols.topics import valid_id

STRATEGIES = STRATEGY_NAMES
COMPRESSIONS = ("f32", "f16", "bf16", "int8", "topk")
SCHEMES = ("iid", "dirichlet")
MODES = ("sync", "async")


class JobSpecError(ValueError):
    """A job specification is invalid; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A federated training job."""

    job_id: str
    template: str = "digits_mlp"
    model_name: str = ""
    strategy: str = "fedavg"
    strategy_params: dict[str, float | int] = field(default_factory=dict)
    mode: str = "sync"
    async_buffer: int = 0
    max_staleness: int = 4
    staleness_exponent: float = 0.5
    rounds: int = 20
    devices_per_round: int = 10
    quorum: int = 0
    round_deadline_s: float = 30.0
    compression: str = "f32"
    topk_fraction: float = 0.01
    clip_norm: float = 0.0
    lr: float = 0.05
    momentum: float = 0.9
    epochs: int = 2
    batch_size: int = 16
    prox_mu: float = 0.0
    max_train_seconds: float = 20.0
    data_seed: int = 0
    seed: int = 0
    int8_variant: bool = True
    max_samples_per_update: int = 100_000

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> JobSpecError:
            return JobSpecError(f"job field {field!r}: {why}")

        if not valid_id(self.job_id):
            raise bad("job_id", "use 1-64 characters from A-Z a-z 0-9 _ . -")
        if self.model_name and not valid_id(self.model_name):
            raise bad("model_name", "use 1-64 characters from A-Z a-z 0-9 _ . -")
        try:
            strategy = parse_strategy(self.strategy, self.strategy_params)
        except StrategyError as exc:
            raise JobSpecError(f"job field 'strategy': {exc}") from None
        if self.mode not in MODES:
            raise bad("mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        if self.compression not in COMPRESSIONS:
            raise bad(
                "compression", f"{self.compression!r} is not one of {', '.join(COMPRESSIONS)}"
            )
        if self.rounds < 1:
            raise bad("rounds", "must be at least 1")
        if self.devices_per_round < 1:
            raise bad("devices_per_round", "must be at least 1")
        if not 0 <= self.quorum <= self.devices_per_round:
            raise bad("quorum", f"must be 0..devices_per_round ({self.devices_per_round}); 0 = all")
        for name in ("topk_fraction", "clip_norm", "lr", "momentum", "prox_mu",
                     "round_deadline_s", "max_train_seconds"):  # fmt: skip
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a finite number")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1)")
        if len(f"{self.job_id}.r{self.rounds}") > 64:
            raise bad("job_id", "too long: version ids '<job_id>.r<round>' must fit 64 characters")
        if self.round_deadline_s <= 0:
            raise bad("round_deadline_s", "must be positive")
        if self.max_train_seconds <= 0:
            raise bad("max_train_seconds", "must be positive")
        if not 0 < self.topk_fraction <= 1:
            raise bad("topk_fraction", "must be in (0, 1]")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise bad("lr/epochs/batch_size", "must be positive")
        if self.prox_mu < 0 or self.clip_norm < 0:
            raise bad("prox_mu/clip_norm", "must be >= 0")
        if self.prox_mu and client_prox_mu(strategy) and self.prox_mu != client_prox_mu(strategy):
            raise bad("prox_mu", "conflicts with the fedprox strategy's 'mu'; set only 'mu'")
        if not 0 <= self.async_buffer <= 100_000:
            raise bad("async_buffer", "must be 0..100000 (0 = the quorum)")
        if not 1 <= self.max_samples_per_update <= 1 << 40:
            raise bad("max_samples_per_update", "must be 1..2**40")
        if not 0 <= self.max_staleness <= 1000:
            raise bad("max_staleness", "must be 0..1000 versions")
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise bad("staleness_exponent", "must be a finite number >= 0")
        needed = _updates_needed(strategy)
        if self.updates_per_version < needed:
            where = "async_buffer" if self.mode == "async" else "quorum"
            raise bad(
                where,
                f"strategy {self.strategy!r} needs at least {needed} updates per version,"
                f" but a version is made from {self.updates_per_version}",
            )
        keep, byzantine = getattr(strategy, "keep", 0), getattr(strategy, "byzantine", 0)
        if keep and keep > self.updates_per_version - byzantine:
            raise bad(
                "strategy_params",
                f"keep {keep} is more than the {self.updates_per_version - byzantine} updates"
                f" left of {self.updates_per_version} without {byzantine} bad ones: it would"
                " always keep a bad one (0 keeps n - byzantine)",
            )

    @property
    def model(self) -> str:
        """The model name versions are published under."""
        return self.model_name or self.template.replace("_", "-")

    @property
    def effective_quorum(self) -> int:
        """Updates needed to close a round (0 in the spec means every selected device)."""
        return self.quorum or self.devices_per_round

    @property
    def updates_per_version(self) -> int:
        """Fewest updates a new version is made from: the quorum, or the async buffer."""
        if self.mode == "async":
            return self.async_buffer or self.effective_quorum
        return self.effective_quorum

    @property
    def strategy_config(self) -> StrategyParams:
        """The strategy with its typed parameters."""
        return parse_strategy(self.strategy, self.strategy_params)

    def staleness_weight(self, staleness: int) -> float:
        """The factor an async update `staleness` versions old is folded in with."""
        return float((1.0 + staleness) ** -self.staleness_exponent)

    def hyperparams(self) -> dict[str, str | int | float | bool]:
        """What a device needs to train, as sent in its task."""
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "prox_mu": client_prox_mu(self.strategy_config) or self.prox_mu,
            "clip_norm": self.clip_norm,
            "topk_fraction": self.topk_fraction,
            "max_seconds": self.max_train_seconds,
            "seed": self.seed,
            **({"base": "latest"} if self.mode == "async" else {}),
        }

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: object) -> JobSpec:
        """Build and validate a spec from decoded JSON; JobSpecError naming what is wrong."""
        if not isinstance(value, dict):
            raise JobSpecError("a job must be a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise JobSpecError(f"unknown job fields {unknown}; valid: {', '.join(sorted(fields))}")
        kwargs: dict[str, Any] = {}
        for name, raw in value.items():
            if name == "strategy_params":
                kwargs[name] = _strategy_params(raw)
                continue
            expected = type(getattr(_DEFAULTS, name)) if name != "job_id" else str
            if expected is float and isinstance(raw, int) and not isinstance(raw, bool):
                raw = float(raw)
            if type(raw) is not expected:
                raise JobSpecError(f"job field {name!r} must be {expected.__name__}, got {raw!r}")
            kwargs[name] = raw
        if "job_id" not in kwargs:
            raise JobSpecError("job field 'job_id' is required")
        return cls(**kwargs)


def _strategy_params(raw: object) -> dict[str, float | int]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise JobSpecError("job field 'strategy_params' must be an object of named numbers")
    out: dict[str, float | int] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JobSpecError(f"strategy parameter {key!r} must be a number, got {value!r}")
        out[key] = value
    return out


def _updates_needed(strategy: StrategyParams) -> int:
    """Krum and Multi-Krum need n > 2f + 2 updates; every other rule works from one."""
    byzantine = getattr(strategy, "byzantine", None)
    return 2 * byzantine + 3 if isinstance(byzantine, int) else 1


_DEFAULTS = JobSpec(job_id="defaults")
