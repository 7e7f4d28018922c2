"""Async (FedBuff) vs. sync rounds with two deliberately slow devices.

A real fleet on this machine (`LocalFleet`: Mosquitto, the coordinator, ``--agents``
agent processes on a Dirichlet(0.5) digits split). ``--slow`` of the agents are slowed
down the way a throttled device is: a controller stops each of them (the agent and its
training child) with SIGSTOP for ``--stop-ms`` and lets it run for ``--run-ms``, over and
over, so it computes at about run / (run + stop) of full speed.

Two jobs run one after the other on the same fleet, each until it has published
``--versions`` new versions, with the same hyper-parameters (one local epoch):

- ``sync``: every round tasks all agents and closes when all have answered (the default
  quorum), so every round waits for the slow ones;
- ``async``: ``mode = async`` with ``async_buffer = --buffer``: a version is made from
  every ``buffer`` updates; the slow devices' updates fold in late with a staleness weight.

``async_over_sync_time`` = async job wall time / sync job wall time (creation to its last
version; < 1 means async is faster); ``accuracy_gap_points`` = 100 x (sync final holdout
accuracy - async final holdout accuracy). Target (issue 4): async faster, at comparable
accuracy.

Run: ``python -m bench.async_rounds [--agents 10] [--slow 2] [--versions 20]
[--buffer 8] [--stop-ms 200] [--run-ms 50]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._timing import emit
from bench.round import _devices
from cloud_coordinator.local_fleet import LocalFleet


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return []
    return found


class Throttle:
    """Keeps processes (and their children) stopped most of the time, from a thread."""

    def __init__(self, pids: Sequence[int], stop_s: float, run_s: float) -> None:
        self.pids = list(pids)
        self.stop_s, self.run_s = stop_s, run_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="throttle", daemon=True)

    def _signal(self, sig: int) -> None:
        for pid in self.pids:
            for target in (pid, *_children(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, sig)

    def _loop(self) -> None:
        while not self._done.is_set():
            self._signal(signal.SIGSTOP)
            self._done.wait(self.stop_s)
            self._signal(signal.SIGCONT)
            self._done.wait(self.run_s)
        self._signal(signal.SIGCONT)

    def __enter__(self) -> Throttle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self._signal(signal.SIGCONT)


def run_job(fleet: LocalFleet, spec: dict[str, Any]) -> dict[str, Any]:
    """Start a job through the HTTP API, wait for it to finish, return it."""
    job: dict[str, Any] = fleet.api("/v1/jobs", spec)
    while job["state"] == "running":
        time.sleep(0.2)
        if not fleet.coordinator_alive():
            raise SystemExit(f"the coordinator exited; see {fleet.logs}/coordinator.log")
        job = fleet.api(f"/v1/jobs/{spec['job_id']}")
    if job["state"] != "done":
        raise SystemExit(f"job {spec['job_id']} ended {job['state']}: {job['message']}")
    done = [r for r in job["rounds"] if r["state"] == "done"]
    wall = max(r["closed"] for r in done) - job["created"]
    accuracy = done[-1]["metrics"]["accuracy"]
    print(f"{spec['mode']:>5}: {len(done)} versions in {wall:.1f}s, final accuracy {accuracy:.4f}",
          flush=True)  # fmt: skip
    return {"wall_s": wall, "accuracy": accuracy, "versions": len(done), "job": job}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--slow", type=int, default=2)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--buffer", type=int, default=8)
    parser.add_argument("--stop-ms", type=float, default=200.0)
    parser.add_argument("--run-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    common = {"template": "digits_mlp", "rounds": args.versions, "epochs": 1,
              "devices_per_round": args.agents, "round_deadline_s": 120.0,
              "max_train_seconds": 60.0, "data_seed": 0, "seed": 0}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fedge-bench-async-") as tmp:
        fleet = LocalFleet(Path(tmp), args.agents, "digits_mlp", embedded="mosquitto")
        try:
            print(fleet.start_broker(), flush=True)
            fleet.start_coordinator()
            fleet.start_agents(fleet.prepare_data())
            deadline = time.monotonic() + 90
            while sum(d.online for d in _devices(fleet)) < args.agents:
                if time.monotonic() > deadline:
                    raise SystemExit(f"agents did not come online; see {fleet.logs}")
                time.sleep(0.2)
            slow = [p.pid for p in fleet.agents[: args.slow]]
            print(
                f"{args.agents} agents online; {args.slow} throttled to "
                f"{args.run_ms:g} ms of every {args.run_ms + args.stop_ms:g} ms",
                flush=True,
            )
            with Throttle(slow, args.stop_ms / 1e3, args.run_ms / 1e3):
                sync = run_job(fleet, {**common, "job_id": "sync", "mode": "sync"})
                asyn = run_job(fleet, {**common, "job_id": "async", "mode": "async",
                                       "async_buffer": args.buffer})  # fmt: skip
        finally:
            fleet.stop()
    metrics = [r["metrics"] for r in asyn["job"]["rounds"] if r["state"] == "done"]
    emit(
        {
            "bench": "async_rounds",
            "agents": args.agents,
            "slow_agents": args.slow,
            "slow_duty": round(args.run_ms / (args.run_ms + args.stop_ms), 3),
            "versions": args.versions,
            "async_buffer": args.buffer,
            "sync_wall_s": round(sync["wall_s"], 2),
            "async_wall_s": round(asyn["wall_s"], 2),
            "async_over_sync_time": round(asyn["wall_s"] / sync["wall_s"], 3),
            "sync_accuracy": round(sync["accuracy"], 4),
            "async_accuracy": round(asyn["accuracy"], 4),
            "accuracy_gap_points": round(100 * (sync["accuracy"] - asyn["accuracy"]), 2),
            "async_staleness_mean": round(
                sum(m["staleness_mean"] for m in metrics) / len(metrics), 3
            ),
        }
    )


if __name__ == "__main__":
    main()
