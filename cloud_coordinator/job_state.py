"""A running job's in-memory state: its current version, its strategy and the round (or,
in async mode, the version buffer) being collected."""

from __future__ import annotations

import torch

from cloud_coordinator import bundles, datasets
from cloud_coordinator.aggregation import Aggregator
from cloud_coordinator.job_spec import JobSpec
from cloud_coordinator.job_store import JobRecord
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.rounds import RoundState
from cloud_coordinator.strategies import make_aggregator, make_server_optimiser
from cloud_coordinator.strategies.server_opt import ServerOptimiser
from cloud_coordinator.templates import get_template
from protocols.errors import DecodeError
from protocols.messages import ModelUpdate
from protocols.model_format import HEAD_FILE, head_shapes, unpack_tensors


def update_key(update: ModelUpdate) -> str:
    """The acknowledgement reference of an update (`ModelUpdate.ack_ref`)."""
    return update.ack_ref


def check_weight(spec: JobSpec, update: ModelUpdate) -> None:
    """DecodeError (``bad_weight``) if `update` claims more samples than the job allows: its
    weight in the average is its sample count, which a device could otherwise inflate."""
    if update.num_samples > spec.max_samples_per_update:
        raise DecodeError(
            f"update claims {update.num_samples} samples; the job allows "
            f"{spec.max_samples_per_update} per update (max_samples_per_update)",
            reason="bad_weight",
        )


def version_id(job_id: str, round_no: int) -> str:
    """The model version a job's round produces (round 0: the initial model)."""
    return f"{job_id}.r{round_no}"


class ActiveJob:
    """A running job: the version devices train from, and the updates collected so far.

    In sync mode ``round_no`` is the round being collected and ``selected`` the devices
    tasked in it. In async mode ``round_no`` is the version being collected (the buffer),
    ``tasked`` remembers which devices were sent a task in each recent buffer, and
    ``outstanding`` which device still works on a task, from which buffer, until when.
    """

    def __init__(self, record: JobRecord, models: ModelRegistry, device: torch.device) -> None:
        spec = record.spec
        self.spec = spec
        self.device = device
        self.template = get_template(spec.template)
        self.holdout = datasets.server_data(self.template, spec.data_seed).holdout
        manifest = models.manifest(spec.model, record.current_version)  # StoreError if missing
        self.version = record.current_version
        self.bundle = bundles.Bundle(
            {f.name: models.blob(f.sha256) for f in manifest.files}, manifest
        )
        self.head = unpack_tensors(self.bundle.files[HEAD_FILE])
        self.shapes = head_shapes(self.template.head_layers)
        self.strategy = spec.strategy_config
        self.dense_bytes = 4 * sum(int(a.size) for a in self.head.values())
        self.round_no = record.current_round
        self.state = RoundState.DONE
        self.selected: tuple[str, ...] = ()
        self.received: set[str] = set()
        self.deadline = 0.0
        self.resumed = False  # a round resumed at start: its grace counts from the broker
        self.started = 0.0
        self.uplink = 0
        self.device_val: list[tuple[float, int]] = []
        self.staleness: list[int] = []
        self.aggregate: Aggregator | None = None
        self.optimiser_state: bytes | None = None  # the server optimiser after `version`
        self.tasked: dict[int, set[str]] = {}
        self.outstanding: dict[str, tuple[int, float]] = {}
        self.parked: set[str] = set()  # async: stored for the next buffer (this one is full)

    @property
    def is_async(self) -> bool:
        """True for a FedBuff-style asynchronous job."""
        return self.spec.mode == "async"

    def open_collection(self, round_no: int, started: float, deadline: float) -> None:
        """Start collecting round (or buffer) `round_no` with an empty aggregate."""
        self.round_no = round_no
        self.received = set()
        self.parked = set()
        self.uplink = 0
        self.device_val = []
        self.staleness = []
        self.started = started
        self.deadline = deadline
        expected = max(self.spec.devices_per_round, self.spec.updates_per_version)
        self.aggregate = make_aggregator(
            self.strategy, self.shapes, self.device, expected_updates=expected
        )

    def new_optimiser(self) -> ServerOptimiser | None:
        """A fresh server optimiser for this job's strategy (None when it has none)."""
        return make_server_optimiser(self.strategy, self.shapes, self.device)

    def count_update(self, update: ModelUpdate, size: int, staleness: int = 0) -> None:
        """Record an accepted update in the round's bookkeeping."""
        self.received.add(update.device_id)
        self.uplink += size
        self.staleness.append(staleness)
        self.outstanding.pop(update.device_id, None)
        val = update.metrics.get("val_acc_before")
        if val is not None and 0.0 <= val <= 1.0:  # (an accuracy; anything else is ignored)
            self.device_val.append((val, update.num_samples))
