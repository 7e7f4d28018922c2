"""Uplink compression in federated training: top-k int8 with error feedback vs dense f32.

Two figures, each against a baseline measured in the same run.

**Accuracy and bytes.** An in-process federated simulation of the digits MLP (whole
64-512-256-10 MLP trains, 167,178 parameters) over a Dirichlet(0.5) split, run twice on
the identical split, seeds and rounds: once with dense ``f32`` updates, once with ``topk``
(int8 values, delta-coded indices, error feedback). It goes through the product's own code
wherever it can: `datasets.prepare_fleet` writes each device's files and
`agent.local_data.load_local_data` reads them; every device trains with
`agent.train_worker.train_head` (one torch thread, the job's default hyper-parameters, seed
``job seed + round`` as the agent sends it), compresses ``trained - base`` with its own
`agent.compression.Compressor` (residuals kept in memory), and the update is encoded as
a `ModelUpdate` with `protocols.messages.encode`; the coordinator's side decodes that
payload, folds it into a CPU `StreamingFedAvg` weighted by the device's sample count, adds
the mean delta to the base head, writes it into the bundle with `bundles.next_bundle` and
scores it with `bundles.evaluate` on the server's holdout, as `cloud_coordinator.jobs`
does. No MQTT, no processes, every device every round (as in the demo, 10 of 10), and no
training wall-time bound (on a busy machine it would cut training and add noise).
Compressor sampling draws from a generator seeded per device, so a run is reproducible.

``bytes_ratio`` = dense uplink bytes / top-k uplink bytes, both the sum of the encoded
`ModelUpdate` payload sizes (headers, metrics, indices and all). The jobs run on seeds
``seed .. seed+repeats-1`` (data split and job seed alike), because one run is noisy: the
holdout has 360 samples (one is 0.28 points) and dense FedAvg's own accuracy moves by
about half a point from round to round. ``accuracy_drop_points`` = 100 x (dense final
accuracy - top-k final accuracy), averaged over the seeds; ``dense_accuracy`` and
``topk_accuracy`` are the mean final accuracies; ``..._each`` and ``..._max`` give every
seed's figure and the worst.

**Encode cost.** ``encode_cost_passes`` = median time of one top-k encode of a 1M-parameter
float32 update (`Compressor.compress` with scheme ``topk`` on a 1024x1024 weight and its
bias, plus `encode` of the `ModelUpdate` that carries it) / median time of one ``np.abs``
pass over the same arrays (into an output buffer allocated once, so it pays no page faults,
like the compressor's reused scratch), timed alternately. Cache state matters more than
anything else here, so both are timed from the same one: before every timed call a 64 MB
buffer is rewritten, which leaves nothing of either in any cache. That is the state a
device encodes in: once per round, after training, inference and networking have used the
caches since the residual was last touched. Simply alternating the two would not be fair:
each would start from what the other left (the encode reads the update, so the pass after
it would find some of it cached, and the other way round). ``encode_cost_passes_warm`` is
the same ratio with each call timed right after a call of its own, everything cached: a
warm ``np.abs`` streams from L3 several times faster than from DRAM, while most of the
encode is computation (sampling, partition, ``nonzero``, varints), so that ratio comes out
much larger. It is reported, not the target. The compressor is not reset between calls,
so its residual is in the steady state of a device that has sent many updates.

Run: ``python -m bench.compression [--rounds 20] [--devices 10] [--fraction F]
[--seed 0] [--repeats 8] [--trials 30] [--quiet]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from agent.compression import Compressor
from agent.local_data import LocalData, load_local_data
from agent.train_worker import train_head
from bench._encode_cost import encode_cost
from bench._timing import emit
from cloud_coordinator import bundles, datasets
from cloud_coordinator.job_spec import JobSpec
from cloud_coordinator.strategies import make_aggregator, make_server_optimiser
from cloud_coordinator.strategies.catalog import (
    FedAvg,
    StrategyParams,
    parse_strategy,
    strategy_params_json,
)
from cloud_coordinator.templates import Template, get_template
from protocols.messages import ModelUpdate, decode_as, encode
from protocols.model_format import MODEL_FILE, head_shapes

TEMPLATE = "digits_mlp"
ALPHA = 0.5
MAX_PAYLOAD = 1 << 30
#: The top-k job's strategy: server momentum makes up for the rounds by which error
#: feedback delays what top-k holds back (see docs/benchmarks.md for the measurements).
TOPK_STRATEGY = "fedavgm:momentum=0.5"

Progress = Callable[[str, int, float, int], None]


@dataclass(frozen=True, slots=True)
class Device:
    """One simulated device: its id and the files `prepare_fleet` wrote for it."""

    device_id: str
    data: LocalData


@dataclass(slots=True)
class JobResult:
    """What one simulated job did: holdout accuracy after each round, bytes sent up."""

    scheme: str
    accuracy: list[float] = field(default_factory=list)
    uplink_bytes: int = 0
    updates: int = 0
    elements: int = 0
    sent_elements: int = 0

    @property
    def final_accuracy(self) -> float:
        """Holdout accuracy of the last version."""
        return self.accuracy[-1]


def load_fleet(template: Template, devices: int, seed: int, directory: Path) -> list[Device]:
    """Write a Dirichlet(`ALPHA`) fleet with `prepare_fleet` and read it back as agents do."""
    dirs = datasets.prepare_fleet(template, devices, "dirichlet", ALPHA, seed, directory)
    return [Device(d.name, load_local_data(d)) for d in dirs]


def hyperparams(seed: int) -> dict[str, Any]:
    """The training hyper-parameters a default job sends (`JobSpec` defaults)."""
    spec = JobSpec(job_id="bench", seed=seed)
    return {
        "lr": spec.lr,
        "momentum": spec.momentum,
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "prox_mu": spec.prox_mu,
    }


def local_delta(
    device: Device,
    head: Mapping[str, npt.NDArray[np.float32]],
    template: Template,
    hp: Mapping[str, Any],
    seed: int,
) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, float]]:
    """What `device` trains from `head` as an agent does: its delta and its metrics."""
    data = device.data
    request = {
        "features": data.x_train.reshape(len(data.x_train), -1),
        "labels": data.y_train,
        "val_features": data.x_val.reshape(len(data.x_val), -1),
        "val_labels": data.y_val,
        "head": dict(head),
        "layers": template.head_layers,
        "max_seconds": None,
        "seed": seed,
        "threads": 1,
        **hp,
    }
    trained = train_head(request)
    delta = {name: trained["head"][name] - head[name] for name in head}
    metrics = {k: float(v) for k, v in trained["metrics"].items() if isinstance(v, int | float)}
    return delta, metrics


def run_job(
    start: bundles.Bundle,
    template: Template,
    fleet: Sequence[Device],
    holdout: datasets.Samples,
    scheme: str,
    *,
    rounds: int,
    seed: int,
    fraction: float,
    strategy: StrategyParams | None = None,
    progress: Progress | None = None,
) -> JobResult:
    """`rounds` rounds of `strategy` (FedAvg) from `start`, all devices; updates in `scheme`."""
    strategy = strategy or FedAvg()
    shapes = head_shapes(template.head_layers)
    hp = hyperparams(seed)
    compressors = [Compressor(None, autosave=False) for _ in fleet]
    rngs = [np.random.default_rng((seed, number)) for number in range(len(fleet))]
    cpu = torch.device("cpu")
    server = make_server_optimiser(strategy, shapes, cpu)
    bundle, head = start, start.head_state()
    result = JobResult(scheme)
    for round_no in range(1, rounds + 1):
        aggregate = make_aggregator(strategy, shapes, cpu, expected_updates=len(fleet))
        round_bytes = 0
        for device, compressor, rng in zip(fleet, compressors, rngs, strict=True):
            delta, metrics = local_delta(device, head, template, hp, seed + round_no)
            tensors = compressor.compress(delta, scheme, topk_fraction=fraction, rng=rng)
            stats = compressor.last_stats
            assert stats is not None
            update = ModelUpdate(
                device.device_id, "bench", round_no, bundle.manifest.version, round_no,
                device.data.train_samples, tensors, metrics,
            )  # fmt: skip
            payload = encode(update)
            round_bytes += len(payload)
            result.elements += stats.elements
            result.sent_elements += stats.sent_elements
            received = decode_as(ModelUpdate, payload, MAX_PAYLOAD)
            aggregate.add(received.tensors, float(received.num_samples))
        mean_delta = aggregate.result()
        if server is not None:  # as cloud_coordinator.versions steps the head
            head = server.step(head, mean_delta)
        else:
            head = {name: (head[name] + mean_delta[name]).astype(np.float32) for name in head}
        bundle = bundles.next_bundle(bundle, head, f"bench.{scheme}.r{round_no}")
        accuracy, _ = bundles.evaluate(bundle.files[MODEL_FILE], holdout.x, holdout.y)
        result.accuracy.append(accuracy)
        result.uplink_bytes += round_bytes
        result.updates += len(fleet)
        if progress is not None:
            progress(scheme, round_no, accuracy, round_bytes)
    return result


def start_bundle(template: Template, seed: int, exported: bundles.Bundle | None) -> bundles.Bundle:
    """The job's first version: `initial_bundle` once, then only its head changes per seed."""
    if exported is None:
        return bundles.initial_bundle(template, "bench", "bench.r0", seed)[0]
    state = {k: v.detach().numpy() for k, v in template.build_head(seed).state_dict().items()}
    return bundles.next_bundle(exported, state, "bench.r0")


@dataclass(frozen=True, slots=True)
class Comparison:
    """Dense and top-k jobs of one seed."""

    seed: int
    dense: JobResult
    topk: JobResult

    @property
    def drop_points(self) -> float:
        """Dense final accuracy minus top-k final accuracy, in points."""
        return 100.0 * (self.dense.final_accuracy - self.topk.final_accuracy)

    @property
    def bytes_ratio(self) -> float:
        """Dense uplink bytes per top-k uplink byte."""
        return self.dense.uplink_bytes / self.topk.uplink_bytes


def compare(
    devices: int,
    rounds: int,
    seed: int,
    fraction: float,
    exported: bundles.Bundle | None = None,
    progress: Progress | None = None,
    topk_strategy: StrategyParams | None = None,
) -> tuple[Comparison, bundles.Bundle]:
    """Dense f32 FedAvg and a top-k job (`topk_strategy`, FedAvg by default) on the same
    split and seeds; also the bundle to reuse."""
    template = get_template(TEMPLATE)
    holdout = datasets.server_data(template, seed).holdout
    start = start_bundle(template, seed, exported)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        fleet = load_fleet(template, devices, seed, Path(tmp))
    common: dict[str, Any] = {"rounds": rounds, "seed": seed, "fraction": fraction}
    dense = run_job(start, template, fleet, holdout, "f32", progress=progress, **common)
    topk = run_job(
        start, template, fleet, holdout, "topk", strategy=topk_strategy, progress=progress, **common
    )
    return Comparison(seed, dense, topk), start


# --- command line --------------------------------------------------------------------------


def _print_round(scheme: str, round_no: int, accuracy: float, round_bytes: int) -> None:
    print(f"  {scheme:>4} round {round_no:>2}: accuracy {accuracy:.4f}, {round_bytes:>9,} B up")


def _print_comparison(c: Comparison) -> None:
    sent = c.topk.sent_elements / c.topk.elements
    print(
        f"seed {c.seed}: dense {c.dense.final_accuracy:.4f}, top-k {c.topk.final_accuracy:.4f}"
        f" (drop {c.drop_points:+.2f} points); uplink {c.dense.uplink_bytes:,} B vs"
        f" {c.topk.uplink_bytes:,} B ({c.bytes_ratio:.1f}x fewer); {sent:.3%} of elements sent"
    )


def summary(comparisons: Sequence[Comparison], cost: Mapping[str, float]) -> dict[str, Any]:
    """The final JSON figures: means over the seeds run, each seed's, and the encode cost."""
    drops = [c.drop_points for c in comparisons]
    dense_bytes = sum(c.dense.uplink_bytes for c in comparisons)
    topk_bytes = sum(c.topk.uplink_bytes for c in comparisons)
    jobs = len(comparisons)
    return {
        "seeds": [c.seed for c in comparisons],
        "dense_accuracy": round(statistics.fmean(c.dense.final_accuracy for c in comparisons), 4),
        "topk_accuracy": round(statistics.fmean(c.topk.final_accuracy for c in comparisons), 4),
        "accuracy_drop_points": round(statistics.fmean(drops), 2),
        "accuracy_drop_points_max": round(max(drops), 2),
        "accuracy_drop_points_each": [round(d, 2) for d in drops],
        "dense_accuracy_each": [round(c.dense.final_accuracy, 4) for c in comparisons],
        "topk_accuracy_each": [round(c.topk.final_accuracy, 4) for c in comparisons],
        "bytes_ratio": round(dense_bytes / topk_bytes, 1),
        "bytes_ratio_min": round(min(c.bytes_ratio for c in comparisons), 1),
        "dense_uplink_bytes_per_job": dense_bytes // jobs,
        "topk_uplink_bytes_per_job": topk_bytes // jobs,
        "topk_sent_fraction": round(
            sum(c.topk.sent_elements for c in comparisons)
            / sum(c.topk.elements for c in comparisons),
            5,
        ),
        "encode_ms_1m": round(cost["encode_s"] * 1e3, 3),
        "pass_ms_1m": round(cost["pass_s"] * 1e3, 3),
        "encode_cost_passes": round(cost["encode_s"] / cost["pass_s"], 2),
        "encode_ms_1m_warm": round(cost["encode_warm_s"] * 1e3, 3),
        "pass_ms_1m_warm": round(cost["pass_warm_s"] * 1e3, 3),
        "encode_cost_passes_warm": round(cost["encode_warm_s"] / cost["pass_warm_s"], 2),
    }


def strategy_from_text(text: str) -> StrategyParams:
    """``name`` or ``name:key=value,...`` as a strategy; ValueError saying what is wrong."""
    name, _, rest = text.partition(":")
    params: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        number = value.strip()
        params[key.strip()] = int(number) if number.lstrip("-").isdigit() else float(number)
    return parse_strategy(name.strip(), params)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument(
        "--fraction",
        type=float,
        default=JobSpec(job_id="defaults").topk_fraction,
        help="top-k fraction (default: what a job uses, JobSpec.topk_fraction)",
    )
    parser.add_argument("--seed", type=int, default=0, help="first data and job seed")
    parser.add_argument("--repeats", type=int, default=8, help="seeds run: seed, seed+1, ...")
    parser.add_argument("--trials", type=int, default=30, help="timed trials of the encode")
    parser.add_argument("--quiet", action="store_true", help="no per-round lines")
    parser.add_argument(
        "--topk-strategy",
        default=TOPK_STRATEGY,
        metavar="NAME[:KEY=VALUE,...]",
        help=f"the top-k job's strategy, as a job names it (default {TOPK_STRATEGY}; the dense"
        " job is always fedavg)",
    )
    args = parser.parse_args(argv)
    try:
        topk_strategy = strategy_from_text(args.topk_strategy)
    except ValueError as exc:
        parser.error(f"--topk-strategy: {exc}")
    started = time.perf_counter()
    progress = None if args.quiet else _print_round
    comparisons: list[Comparison] = []
    exported: bundles.Bundle | None = None
    for seed in range(args.seed, args.seed + args.repeats):
        print(
            f"seed {seed}: {TEMPLATE}, {args.devices} devices, Dirichlet({ALPHA}),"
            f" {args.rounds} rounds, dense f32 fedavg then top-k {args.fraction} int8 + error"
            f" feedback with {args.topk_strategy}"
        )
        comparison, exported = compare(
            args.devices, args.rounds, seed, args.fraction, exported, progress, topk_strategy
        )
        _print_comparison(comparison)
        comparisons.append(comparison)
    cost = encode_cost(args.fraction, args.trials)
    print(
        f"1M-parameter update, caches flushed: top-k encode {cost['encode_s'] * 1e3:.2f} ms,"
        f" np.abs pass {cost['pass_s'] * 1e3:.3f} ms; warm: {cost['encode_warm_s'] * 1e3:.2f}"
        f" ms and {cost['pass_warm_s'] * 1e3:.3f} ms"
    )
    result: dict[str, Any] = {
        "bench": "compression",
        "template": TEMPLATE,
        "devices": args.devices,
        "rounds": args.rounds,
        "topk_fraction": args.fraction,
        "topk_strategy": {"name": topk_strategy.name, **strategy_params_json(topk_strategy)},
        **summary(comparisons, cost),
        "seconds": round(time.perf_counter() - started, 1),
    }
    emit(result)


if __name__ == "__main__":
    main()
