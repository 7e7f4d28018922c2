"""Micro-batching: throughput and latency of many HTTP clients sending one sample each.

An agent inference service serves a digits model (``--template``: digits_cnn by default,
whose run costs more than the HTTP around it; digits_mlp is the opposite case) on loopback.
A client process (its own interpreter, so the clients do not share the agent's GIL) runs
``--clients`` threads, each sending single samples back to back over a connection of its
own for ``--seconds``. Phases alternate between micro-batching off and on
(``--wait-ms``, ``--rows``), ``--rounds`` times each, on the same service.

Figures: requests per second and p50/p99 latency (ms) of each setting, and
``throughput_ratio`` = on / off (above 1: batching serves more requests in the same time).

Run: ``python -m bench.micro_batching [--clients N] [--wait-ms MS] [--template NAME]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._models import MODEL, digits, put
from bench._timing import emit


def _clients(url: str, clients: int, seconds: float, samples: Any, out: Any) -> None:
    """Child process: `clients` threads sending single samples; latencies to `out`."""
    from agent.client import InferenceClient

    latencies: list[list[float]] = [[] for _ in range(clients)]
    gate = threading.Barrier(clients)

    def one(i: int) -> None:
        client = InferenceClient.connect(url)
        client.predict(samples[i])  # connect and warm up before the clock
        gate.wait()
        stop = time.perf_counter() + seconds
        k = i
        while True:
            start = time.perf_counter()
            if start >= stop:
                break
            client.predict(samples[k % len(samples)])
            latencies[i].append(time.perf_counter() - start)
            k += clients
        client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put([x for per in latencies for x in per])


def _phase(url: str, clients: int, seconds: float, samples: Any) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_clients, args=(url, clients, seconds, samples, queue))
    proc.start()
    latencies: list[float] = queue.get(timeout=seconds + 120)
    proc.join(30)
    ordered = sorted(latencies)
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


def main() -> None:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="digits_cnn", help="digits_cnn or digits_mlp")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="phases of each setting")
    parser.add_argument("--wait-ms", type=float, default=2.0, help="inference_batch_wait_ms")
    parser.add_argument("--rows", type=int, default=32, help="inference_batch_rows")
    args = parser.parse_args()

    from agent.config import AgentConfig
    from agent.inference_service import InferenceService
    from agent.micro_batching import MicroBatcher
    from agent.model_store import ModelStore
    from cloud_coordinator.baseline import server_backbone
    from cloud_coordinator.bundles import initial_bundle
    from cloud_coordinator.templates import get_template

    template = get_template(args.template)
    backbone = server_backbone(template, seed=0)  # (digits_cnn's conv layers: fitted here)
    bundle, _ = initial_bundle(template, MODEL, "v1", seed=0, backbone=backbone, created=0.0)
    pixels, _ = digits()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = AgentConfig(device_id="bench", data_dir=str(root),
                             inference_listen="127.0.0.1:0")  # fmt: skip
        store = ModelStore(root / "models")
        put(store, bundle)
        svc = InferenceService(config, store, root / "data")
        svc.start()
        try:
            idle = svc.wait_idle(60)
            served = svc.runtime.serving
            if not idle or svc.server is None or served is None:
                raise SystemExit("the inference service did not load the model")
            samples = [np.ascontiguousarray(p.reshape(served.batch_tail)) for p in pixels[:256]]
            batcher = MicroBatcher(svc.runtime, svc.metrics, args.rows, args.wait_ms / 1000)
            results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
            for r in range(args.rounds):
                for setting in ("off", "on"):
                    svc.batcher = batcher if setting == "on" else None
                    m = _phase(svc.server.url, args.clients, args.seconds, samples)
                    results[setting].append(m)
                    print(
                        f"round {r + 1} {setting:>3}: {m['rps']:7.0f} req/s,"
                        f" p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms",
                        flush=True,
                    )
            merged = svc.metrics.render()
        finally:
            svc.stop()
    med = {s: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for s, ms in results.items()}
    merged_line = next(x for x in merged.splitlines() if x.startswith("fedge_agent_microbatched_"))
    result: dict[str, Any] = {
        "bench": "micro_batching",
        "template": args.template,
        "clients": args.clients,
        "wait_ms": args.wait_ms,
        "rows": args.rows,
        "rps_off": round(med["off"]["rps"]),
        "rps_on": round(med["on"]["rps"]),
        "p50_ms_off": round(med["off"]["p50_ms"], 3),
        "p50_ms_on": round(med["on"]["p50_ms"], 3),
        "p99_ms_off": round(med["off"]["p99_ms"], 3),
        "p99_ms_on": round(med["on"]["p99_ms"], 3),
        "merged_requests": int(float(merged_line.split()[-1])),
        "throughput_ratio": round(med["on"]["rps"] / med["off"]["rps"], 3),
    }
    emit(result)


if __name__ == "__main__":
    main()
