"""What a federated training job asks for: one frozen, validated object.

Invalid values are rejected when the job is created, with a message naming the field and
the valid choices, so a job never fails hours later on a typo.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from protocols.topics import valid_id

STRATEGIES = ("fedavg",)
COMPRESSIONS = ("f32", "f16", "bf16", "int8", "topk")
SCHEMES = ("iid", "dirichlet")


class JobSpecError(ValueError):
    """A job specification is invalid; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A federated training job."""

    job_id: str
    template: str = "digits_mlp"
    model_name: str = ""
    strategy: str = "fedavg"
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

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> JobSpecError:
            return JobSpecError(f"job field {field!r}: {why}")

        if not valid_id(self.job_id):
            raise bad("job_id", "use 1-64 characters from A-Z a-z 0-9 _ . -")
        if self.model_name and not valid_id(self.model_name):
            raise bad("model_name", "use 1-64 characters from A-Z a-z 0-9 _ . -")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}")
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

    @property
    def model(self) -> str:
        """The model name versions are published under."""
        return self.model_name or self.template.replace("_", "-")

    @property
    def effective_quorum(self) -> int:
        """Updates needed to close a round (0 in the spec means every selected device)."""
        return self.quorum or self.devices_per_round

    def hyperparams(self) -> dict[str, str | int | float | bool]:
        """What a device needs to train, as sent in its task."""
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "prox_mu": self.prox_mu,
            "clip_norm": self.clip_norm,
            "topk_fraction": self.topk_fraction,
            "max_seconds": self.max_train_seconds,
            "seed": self.seed,
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
            expected = type(getattr(_DEFAULTS, name)) if name != "job_id" else str
            if expected is float and isinstance(raw, int) and not isinstance(raw, bool):
                raw = float(raw)
            if type(raw) is not expected:
                raise JobSpecError(f"job field {name!r} must be {expected.__name__}, got {raw!r}")
            kwargs[name] = raw
        if "job_id" not in kwargs:
            raise JobSpecError("job field 'job_id' is required")
        return cls(**kwargs)


_DEFAULTS = JobSpec(job_id="defaults")
