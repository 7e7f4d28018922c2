"""Round time: 10 agent processes and a real Mosquitto on this machine.

A round is: tasks out, one local epoch on every device, updates in, streaming aggregate,
new version evaluated, registered and published. ``median_round_s`` is the median of the
coordinator's own per-round wall time over a job (round 1 included: it pays the training
workers' cold start). The baseline measured in the same run is the compute floor: one
epoch of the same head on one device's data, in-process (``train_floor_s``), so
``ratio_to_training`` says how much of a round is Fedge's own overhead.

Run: ``python -m bench.round [--agents 10] [--rounds 12]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._timing import emit
from cloud_coordinator.demo import DemoOptions, run_job
from cloud_coordinator.errors import StoreError
from cloud_coordinator.local_fleet import LocalFleet
from cloud_coordinator.registry import read_devices


def _train_floor(data_dir: Path, template_name: str) -> float:
    """Median seconds of one in-process epoch on one device's data (the compute floor)."""
    from agent.local_data import load_local_data
    from agent.train_worker import train_head
    from cloud_coordinator.templates import get_template

    template = get_template(template_name)
    data = load_local_data(data_dir)
    x = data.x_train.reshape(len(data.x_train), -1)
    request: dict[str, Any] = {
        "features": x, "labels": data.y_train, "layers": template.head_layers,
        "epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "seed": 0, "threads": 1,
    }  # fmt: skip
    train_head(request)  # warm: imports, allocator
    times = []
    for _ in range(5):
        start = time.perf_counter()
        train_head(request)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--template", default="digits_mlp")
    args = parser.parse_args()
    options = DemoOptions(agents=args.agents, rounds=args.rounds, template=args.template,
                          epochs=1, embedded="mosquitto")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fedge-bench-round-") as tmp:
        fleet = LocalFleet(Path(tmp), args.agents, args.template, embedded="mosquitto")
        try:
            print(fleet.start_broker(), flush=True)
            fleet.start_coordinator()
            data_dirs = fleet.prepare_data()
            fleet.start_agents(data_dirs)
            deadline = time.monotonic() + 90
            while sum(d.online for d in _devices(fleet)) < args.agents:
                if time.monotonic() > deadline:
                    raise SystemExit(f"agents did not come online; see {fleet.logs}")
                time.sleep(0.2)
            print(f"{args.agents} agents online; running {args.rounds} rounds", flush=True)
            job = run_job(fleet, options, "bench", None)
        finally:
            fleet.stop()
        if job["state"] != "done":
            raise SystemExit(f"job ended {job['state']}: {job['message']}")
        sizes = [len(np.load(d / "train.npz")["y"]) for d in data_dirs]
        floor = _train_floor(data_dirs[int(np.argsort(sizes)[len(sizes) // 2])], args.template)
    walls = [r["metrics"]["wall_s"] for r in job["rounds"] if r["state"] == "done"]
    for r in job["rounds"]:
        m = r["metrics"]
        print(f"round {r['round']:>3}: {m['wall_s']:.3f}s  acc {m['accuracy']:.3f}"
              f"  {m['participants']} updates")  # fmt: skip
    median = statistics.median(walls)
    emit(
        {
            "bench": "round",
            "agents": args.agents,
            "rounds": len(walls),
            "median_round_s": round(median, 3),
            "p90_round_s": round(float(np.percentile(walls, 90)), 3),
            "first_round_s": round(walls[0], 3),
            "train_floor_s": round(floor, 4),
            "ratio_to_training": round(median / floor, 1),
            "final_accuracy": round(job["rounds"][-1]["metrics"]["accuracy"], 4),
            "target_s": 1.5,
        }
    )


def _devices(fleet: LocalFleet) -> list[Any]:
    try:
        return list(read_devices(fleet.db))
    except StoreError:  # the registry does not exist until the coordinator has started
        return []


if __name__ == "__main__":
    main()
