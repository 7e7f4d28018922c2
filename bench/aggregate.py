"""Streaming FedAvg throughput: decode and fold 100 updates vs. a plain sum of the same bytes.

Each of ``--updates`` encoded `ModelUpdate` payloads carries one float32 tensor of
``--params`` elements (distinct random data, distinct weights). Timed, interleaved, as
medians:

- ``fedavg``: for each payload ``messages.decode`` then `StreamingFedAvg.add` (shape, bytes
  and NaN/Inf checks included), then ``result()``. On the CPU with the C kernel built
  (``one_pass`` in the JSON line) each update is folded and checked in one pass
  (`cloud_coordinator.checked_sums`); otherwise checked, then folded;
- ``fedavg_two_pass``: the same with the one-pass kernel turned off (``keep_bytes=0``):
  what a GPU-less coordinator without the kernel does, and what FedAvg did before it;
- ``sum_in_payload``: ``acc += np.frombuffer(bytes)`` over the tensor bytes inside the
  payloads, located once up front. The codec leaves them at an address that is not a
  multiple of 4, which sends numpy down its slow unaligned path, so we also time
- ``sum_aligned``: the same sum over an aligned copy of the same values (copied up front,
  not timed): the cheapest plain sum of this data we know how to write with numpy;
- ``torch_add``: ``acc.add_(u, alpha=w)`` over the in-payload bytes with no decoding and no
  checks: the floor for the fold itself;
- ``check_then_add``: the same fold after ``u.sum()`` is checked to be finite, still with no
  decoding: the two passes of ``fedavg_two_pass`` over each update (all-or-nothing needs
  every value checked before any is added), without the codec and the Python around them.

``ratio_to_sum`` = (the faster of the two numpy sums) / ``fedavg``: 1.0 means decoding,
checking and averaging the updates costs exactly what adding up their bytes does.
``ratio_to_sum_in_payload`` uses the literal in-payload sum instead;
``two_pass_ratio_to_sum`` is ``ratio_to_sum`` for ``fedavg_two_pass``. For the two-pass
path the gap splits into ``torch_add`` / ``check_then_add`` (what the finiteness pass
costs) and ``check_then_add`` / ``fedavg_two_pass`` (decoding and the Python per update);
the one-pass path reads each update once, like ``torch_add``, and adds a copy of the sums
every 16 updates (its snapshot, `checked_sums.KEEP_BYTES`).

Run: ``python -m bench.aggregate [--updates N] [--params N] [--trials N] [--device D]``.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from bench._timing import emit, interleaved_medians
from cloud_coordinator.aggregation import StreamingFedAvg, pick_device
from protocols import messages
from protocols.messages import ModelUpdate
from protocols.tensors import encode_dense

F32 = npt.NDArray[np.float32]


def make_payloads(updates: int, params: int, seed: int = 0) -> tuple[list[bytes], list[int]]:
    """Encoded updates with distinct random float32 data, and their sample counts."""
    rng = np.random.default_rng(seed)
    payloads, weights = [], []
    for i in range(updates):
        values = rng.standard_normal(params, dtype=np.float32)
        samples = int(rng.integers(10, 1000))
        update = ModelUpdate(f"dev-{i}", "job-1", 3, "v7", 0, samples, (encode_dense("w", values),))
        payloads.append(messages.encode(update))
        weights.append(samples)
    return payloads, weights


def fedavg(
    payloads: list[bytes], params: int, device: torch.device, cap: int, keep: int | None = None
) -> dict[str, F32]:
    """Decode every payload, fold it into a streaming FedAvg, return the mean."""
    agg = StreamingFedAvg({"w": (params,)}, device, keep_bytes=keep)
    for payload in payloads:
        update = messages.decode_as(ModelUpdate, payload, cap)
        agg.add(update.tensors, update.num_samples)
    return agg.result()


def plain_sum(buffers: list[memoryview], params: int) -> F32:
    """The cheapest sum of the same bytes: no decoding, no checks, no weights."""
    acc = np.zeros(params, dtype=np.float32)
    for buf in buffers:
        acc += np.frombuffer(buf, dtype=np.float32)
    return acc


def torch_add(buffers: list[torch.Tensor], weights: list[int], params: int) -> torch.Tensor:
    """The fold alone over the in-payload bytes: no decoding, no checks."""
    acc = torch.zeros(params, dtype=torch.float32)
    for u, w in zip(buffers, weights, strict=True):
        acc.add_(u, alpha=w)
    return acc


def check_then_add(buffers: list[torch.Tensor], weights: list[int], params: int) -> torch.Tensor:
    """Both passes StreamingFedAvg makes per update (finiteness sum, then the fold), bare."""
    acc = torch.zeros(params, dtype=torch.float32)
    for u, w in zip(buffers, weights, strict=True):
        if not math.isfinite(u.sum().item()):
            raise SystemExit("non-finite benchmark data")
        acc.add_(u, alpha=w)
    return acc


def _locate(payloads: list[bytes], cap: int) -> list[memoryview]:
    """The tensor bytes inside each payload (views, not copies)."""
    views = []
    for payload in payloads:
        data = messages.decode_as(ModelUpdate, payload, cap).tensors[0].data
        view = memoryview(data)
        if view.obj is not payload:
            raise SystemExit("decoder copied the tensor bytes; the baseline would not be fair")
        views.append(view)
    return views


def _check(payloads: list[bytes], weights: list[int], params: int, device: torch.device) -> None:
    cap = params * 4 + 4096
    expected = np.zeros(params, dtype=np.float64)
    for view, w in zip(_locate(payloads, cap), weights, strict=True):
        expected += w * np.frombuffer(view, dtype=np.float32).astype(np.float64)
    expected /= sum(weights)
    for keep in (None, 0):
        got = fedavg(payloads, params, device, cap, keep)["w"]
        if got.dtype != np.float32 or not np.allclose(got, expected, rtol=1e-5, atol=1e-6):
            raise SystemExit(
                f"FedAvg (keep_bytes={keep}) differs from the numpy weighted mean by"
                f" {np.abs(got - expected).max()}"
            )


def measure(updates: int, params: int, trials: int, device: torch.device) -> dict[str, float]:
    """Median seconds of FedAvg and of the plain sums over the same payloads."""
    payloads, weights = make_payloads(updates, params)
    cap = params * 4 + 4096
    _check(payloads, weights, params, device)
    in_payload = _locate(payloads, cap)
    misaligned = sum(np.frombuffer(v, np.uint8).ctypes.data % 4 != 0 for v in in_payload)
    print(f"{misaligned} of {updates} in-payload tensors start at an address not a multiple of 4")
    aligned = [np.frombuffer(v, dtype=np.float32).copy() for v in in_payload]
    aligned_views = [a.data.cast("B") for a in aligned]
    # (_check ran StreamingFedAvg first, which silenced torch's once-per-process warning.)
    torch_views = [torch.frombuffer(v, dtype=torch.float32) for v in in_payload]
    return interleaved_medians(
        {
            "fedavg": lambda: fedavg(payloads, params, device, cap),
            "fedavg_two_pass": lambda: fedavg(payloads, params, device, cap, keep=0),
            "sum_in_payload": lambda: plain_sum(in_payload, params),
            "sum_aligned": lambda: plain_sum(aligned_views, params),
            "torch_add": lambda: torch_add(torch_views, weights, params),
            "check_then_add": lambda: check_then_add(torch_views, weights, params),
        },
        trials=trials,
    )


def main() -> None:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=100, help="updates per round")
    parser.add_argument("--params", type=int, default=1 << 20, help="float32 elements each")
    parser.add_argument("--trials", type=int, default=21, help="timed trials per candidate")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    load_before = os.getloadavg()[0]
    m = measure(args.updates, args.params, args.trials, device)
    load_after = os.getloadavg()[0]
    gigabytes = args.updates * args.params * 4 / 1e9
    best_sum = min(m["sum_in_payload"], m["sum_aligned"])
    for name, seconds in m.items():
        print(f"{name:>15}: {seconds * 1e3:8.2f} ms  ({gigabytes / seconds:5.1f} GB/s)")
    print(
        f"FedAvg on {device} with {torch.get_num_threads()} torch threads;"
        f" ratio to the cheapest plain sum {best_sum / m['fedavg']:.3f}"
    )
    result: dict[str, Any] = {
        "bench": "aggregate",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "updates": args.updates,
        "params": args.params,
        "trials": args.trials,
        "one_pass": StreamingFedAvg({"w": (args.params,)}, device).one_pass,
        "fedavg_ms": round(m["fedavg"] * 1e3, 2),
        "fedavg_two_pass_ms": round(m["fedavg_two_pass"] * 1e3, 2),
        "sum_in_payload_ms": round(m["sum_in_payload"] * 1e3, 2),
        "sum_aligned_ms": round(m["sum_aligned"] * 1e3, 2),
        "torch_add_ms": round(m["torch_add"] * 1e3, 2),
        "check_then_add_ms": round(m["check_then_add"] * 1e3, 2),
        "fedavg_gbps": round(gigabytes / m["fedavg"], 2),
        "sum_gbps": round(gigabytes / best_sum, 2),
        "ratio_to_sum": round(best_sum / m["fedavg"], 3),
        "ratio_to_sum_in_payload": round(m["sum_in_payload"] / m["fedavg"], 3),
        "two_pass_ratio_to_sum": round(best_sum / m["fedavg_two_pass"], 3),
        "ratio_to_torch_add": round(m["torch_add"] / m["fedavg"], 3),
        "ratio_to_check_then_add": round(m["check_then_add"] / m["fedavg"], 3),
        "loadavg_1m": [round(load_before, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))},
    }
    emit(result)


if __name__ == "__main__":
    main()
