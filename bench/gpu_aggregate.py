"""Aggregation kernels on the aggregation device: the weighted sum against memory bandwidth,
and the robust rules (coordinate-wise median, Multi-Krum) on the GPU against the CPU.

Workload: ``--updates`` rows of ``--params`` float32 values (N(0,1), one flattened update
per row) and their sample weights (10..999), generated on the device before any timing:
what `BufferedRule` holds when ``result()`` is called. Decoding is not timed here
(``bench.aggregate`` times it).

Each candidate is timed as the median of ``--trials`` interleaved trials after one warm-up
call (`bench._timing.interleaved_medians`); on CUDA every call ends with
``torch.cuda.synchronize()`` inside the timed region, so a time covers the kernels, not
just their launch. Fast candidates repeat ``--inner`` times per trial. Candidates:

- ``copy``: ``dst.copy_(rows)``, the whole matrix device to device; ``2 * bytes / time``;
- ``read``: ``rows.sum()``, a read-only pass; ``bytes / time``;
- ``sum``: `kernels.weighted_sum` (one matrix-vector product), which reads the matrix and
  the weights and writes one row: ``(n * d + n + d) * 4`` bytes;
- ``median``: `kernels.coordinate_median` (even counts: mean of the two middle values);
- ``multi_krum``: what `BufferedRule` does for Multi-Krum with ``f = --byzantine``: Gram
  distances, scores, the ``n - f`` best rows (a host sync), their weighted mean.

``bandwidth_gbps`` = the faster of ``copy`` and ``read``, this device's memory bandwidth as
measured in this run; ``sum_bandwidth_fraction`` = the weighted sum's bytes per second over
it (1.0: the sum runs at the speed of memory). With a GPU, ``median`` and ``multi_krum``
are also run on a host copy of the same data with ``device=cpu`` (same kernels), and
``median_speedup`` / ``krum_speedup`` = CPU time / GPU time; without one the benchmark
times the CPU alone, and both speedups are null with a ``note``.

Run: ``python -m bench.gpu_aggregate [--updates N] [--params N] [--trials N] [--device D]``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch

from bench._timing import emit, interleaved_medians
from cloud_coordinator.aggregation import pick_device
from cloud_coordinator.strategies import kernels


def synchronised(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` followed by a wait for the device's queued work, so timing covers all of it."""
    if device.type != "cuda":
        return fn

    def call() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def multi_krum(
    rows: torch.Tensor, weights: torch.Tensor, byzantine: int, device: torch.device
) -> torch.Tensor:
    """Multi-Krum as `BufferedRule` runs it: keep the n - f best rows, weighted mean of them."""
    n = rows.shape[0]
    kept = kernels.krum_select(rows, byzantine, n - byzantine, device)
    mask = torch.zeros(n, dtype=torch.float32)
    mask[kept] = 1.0
    return kernels.weighted_mean(rows, weights.cpu() * mask, device)


def make_rows(
    updates: int, params: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float32 updates (n x d) and sample weights, generated on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randn((updates, params), generator=gen, device=device, dtype=torch.float32)
    weights = torch.randint(10, 1000, (updates,), generator=gen, device=device).float()
    return rows, weights


def measure(
    updates: int, params: int, trials: int, inner: int, byzantine: int, device: torch.device
) -> tuple[dict[str, float], bool | None]:
    """Median seconds of each candidate; and, with a GPU, whether GPU and CPU results agree."""
    rows, weights = make_rows(updates, params, device)
    dst = torch.empty_like(rows)
    fast = {
        "copy": lambda: dst.copy_(rows),
        "read": lambda: rows.sum(),
        "sum": lambda: kernels.weighted_sum(rows, weights, device),
    }
    slow: dict[str, Callable[[], object]] = {
        "median": lambda: kernels.coordinate_median(rows, device),
        "multi_krum": lambda: multi_krum(rows, weights, byzantine, device),
    }
    agree = None
    if device.type != "cpu":
        cpu = torch.device("cpu")
        host_rows, host_weights = rows.cpu(), weights.cpu()
        slow["median_cpu"] = lambda: kernels.coordinate_median(host_rows, cpu)
        slow["multi_krum_cpu"] = lambda: multi_krum(host_rows, host_weights, byzantine, cpu)
        same_median = torch.allclose(
            kernels.coordinate_median(rows, device).cpu(),
            kernels.coordinate_median(host_rows, cpu),
        )
        same_krum = kernels.krum_select(rows, byzantine, 1, device) == kernels.krum_select(
            host_rows, byzantine, 1, cpu
        )
        agree = bool(same_median and same_krum)
    timings = interleaved_medians(
        {name: synchronised(fn, device) for name, fn in fast.items()}, trials, inner
    )
    timings |= interleaved_medians(
        {name: synchronised(fn, device) for name, fn in slow.items()}, trials
    )
    return timings, agree


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--updates", type=int, default=100, help="rows (updates)")
    parser.add_argument("--params", type=int, default=1 << 20, help="float32 values per row")
    parser.add_argument("--trials", type=int, default=5, help="timed trials per candidate")
    parser.add_argument("--inner", type=int, default=5, help="calls per trial of fast ones")
    parser.add_argument("--byzantine", type=int, default=-1, help="Multi-Krum f (-1: n // 10)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    byzantine = args.byzantine if args.byzantine >= 0 else args.updates // 10
    if args.updates < 2 * byzantine + 3:
        parser.error(f"Multi-Krum with f={byzantine} needs --updates >= {2 * byzantine + 3}")
    load_before = os.getloadavg()[0]
    m, agree = measure(args.updates, args.params, args.trials, args.inner, byzantine, device)
    load_after = os.getloadavg()[0]

    matrix_bytes = args.updates * args.params * 4
    sum_bytes = matrix_bytes + (args.updates + args.params) * 4
    bandwidth = max(2 * matrix_bytes / m["copy"], matrix_bytes / m["read"])
    sum_fraction = sum_bytes / m["sum"] / bandwidth
    for name, seconds in m.items():
        print(f"{name:>15}: {seconds * 1e3:9.2f} ms")
    print(f"{device}: bandwidth {bandwidth / 1e9:.1f} GB/s, weighted sum at {sum_fraction:.2f}")
    result: dict[str, Any] = {
        "bench": "gpu_aggregate",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "updates": args.updates,
        "params": args.params,
        "trials": args.trials,
        "byzantine": byzantine,
        "bandwidth_gbps": round(bandwidth / 1e9, 2),
        "copy_gbps": round(2 * matrix_bytes / m["copy"] / 1e9, 2),
        "read_gbps": round(matrix_bytes / m["read"] / 1e9, 2),
        "sum_gbps": round(sum_bytes / m["sum"] / 1e9, 2),
        "sum_bandwidth_fraction": round(sum_fraction, 3),
        **{f"{name}_ms": round(seconds * 1e3, 3) for name, seconds in m.items()},
        "median_speedup": None,
        "krum_speedup": None,
        "loadavg_1m": [round(load_before, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
    }
    if device.type == "cpu":
        result["note"] = "no GPU: CPU timings only, so no GPU/CPU speedups"
    else:
        result["median_speedup"] = round(m["median_cpu"] / m["median"], 2)
        result["krum_speedup"] = round(m["multi_krum_cpu"] / m["multi_krum"], 2)
        result["gpu_matches_cpu"] = agree
    emit(result)


if __name__ == "__main__":
    main()
