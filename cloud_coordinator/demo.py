"""``fedge-coordinator demo``: the product tour, every part its own process.

It starts a local MQTT broker unless one is configured, a coordinator, and N agents that
each hold one device's share of a data set (a Dirichlet label skew, as real fleets have).
It shows the fleet coming online, runs a federated job with a progress bar, trains the
centralized baseline on the pooled data for comparison, prints a one-line JSON summary,
and stops everything in order (agents first, so they are seen going offline). Ctrl-C
stops it early, cleanly.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from cloud_coordinator.broker import BrokerKind
from cloud_coordinator.demo_serving import canary_rollout, show_local_predictions
from cloud_coordinator.demo_view import FleetWatcher, RoundProgress, human_bytes, say
from cloud_coordinator.fleet_view import device_table
from cloud_coordinator.local_fleet import LocalFleet

POLL_S = 0.2


class _InterruptedError(Exception):
    pass


@dataclass(frozen=True)
class DemoOptions:
    """What the tour runs."""

    agents: int = 10
    rounds: int = 20
    template: str = "digits_mlp"
    compression: str = "f32"
    strategy: str = "fedavg"
    strategy_params: dict[str, float | int] = field(default_factory=dict)
    mode: str = "sync"
    alpha: float = 0.5
    seed: int = 0
    epochs: int = 2
    broker: str | None = None
    embedded: BrokerKind | None = None
    duration: float | None = None
    workdir: Path = Path("fedge-demo")


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """The figures of a finished job: final accuracy, median round time, bytes."""
    done = [r for r in job["rounds"] if r["state"] == "done"]
    final = done[-1]["metrics"]["accuracy"] if done else None
    seconds = [r["metrics"]["wall_s"] for r in done]
    return {
        "final_accuracy": round(final, 4) if final is not None else None,
        "rounds": len(done),
        "seconds_per_round": round(statistics.median(seconds), 3) if seconds else None,
        "uplink_bytes": sum(r["metrics"]["uplink_bytes"] for r in done),
        "dense_bytes": sum(r["metrics"]["dense_bytes"] for r in done),
        "template": job["spec"]["template"],
        "compression": job["spec"]["compression"],
        "agents": len({d for r in done for d in r["selected"]}),
    }


def run_job(
    fleet: LocalFleet, options: DemoOptions, job_id: str, progress: RoundProgress | None
) -> dict[str, Any]:
    """Start a job through the API and poll it to its end."""
    spec = {
        "job_id": job_id,
        "template": options.template,
        "strategy": options.strategy,
        "strategy_params": options.strategy_params,
        "mode": options.mode,
        **({"async_buffer": max(1, options.agents * 4 // 5)} if options.mode == "async" else {}),
        "rounds": options.rounds,
        "devices_per_round": options.agents,
        "compression": options.compression,
        "epochs": options.epochs,
        "data_seed": options.seed,
        "seed": options.seed,
    }
    try:
        job: dict[str, Any] = fleet.api("/v1/jobs", spec)
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"the coordinator refused the job: {exc.read().decode()}") from exc
    while job["state"] == "running":
        time.sleep(POLL_S)
        if not fleet.coordinator_alive():
            raise SystemExit(f"the coordinator exited; see {fleet.logs}/coordinator.log")
        job = fleet.api(f"/v1/jobs/{job_id}")
        if progress is not None:
            progress.update(job)
    if progress is not None:
        progress.finish()
    return job


def _baseline_accuracy(options: DemoOptions) -> float:
    from cloud_coordinator.baseline import run_baseline
    from cloud_coordinator.templates import get_template

    return float(run_baseline(get_template(options.template), options.seed).holdout_accuracy)


def _wait_online(fleet: LocalFleet, watcher: FleetWatcher, start: float) -> bool:
    deadline = time.monotonic() + 90
    while not watcher.all_online():
        watcher.poll()
        if not fleet.coordinator_alive() or time.monotonic() > deadline:
            say(start, f"the fleet did not come up; see {fleet.logs}")
            return False
        time.sleep(POLL_S)
    return True


def _tour(
    fleet: LocalFleet, options: DemoOptions, watcher: FleetWatcher, start: float
) -> tuple[bool, dict[str, Any]]:
    say(start, fleet.start_broker())
    fleet.start_coordinator()
    api = f"http://127.0.0.1:{fleet.http_port}"
    say(start, f"coordinator started; HTTP API on {api}/v1/devices")
    fleet.start_agents(fleet.prepare_data())
    say(start, f"{options.agents} agents started, each with its own share of the data "
               f"(Dirichlet alpha={options.alpha}); waiting for them ...")  # fmt: skip
    if not _wait_online(fleet, watcher, start):
        return False, {}
    say(start, f"all {options.agents} agents online\n")
    print(device_table(list(watcher.poll().values())))
    print(f"\nInspect: fedge-coordinator devices --data-dir {fleet.coord_dir}")
    print(f"         curl {api}/metrics\n", flush=True)
    if options.rounds <= 0:
        end = None if options.duration is None else time.monotonic() + options.duration
        while end is None or time.monotonic() < end:
            watcher.poll()
            time.sleep(POLL_S)
        return True, {}
    say(start, f"job: {options.template}, {options.rounds} rounds, {options.compression} "
               f"updates, {options.strategy}; devices train, the cloud aggregates")  # fmt: skip
    job = run_job(fleet, options, "demo", RoundProgress(options.rounds))
    if job["state"] != "done":
        say(start, f"job ended {job['state']}: {job['message']}")
        return False, job_summary(job)
    say(start, "training the centralized baseline on the pooled data, for comparison ...")
    summary = job_summary(job)
    baseline = _baseline_accuracy(options)
    summary["baseline_accuracy"] = round(baseline, 4)
    summary["accuracy_gap_points"] = round(100 * (baseline - summary["final_accuracy"]), 2)
    show_local_predictions(fleet, start, options.seed)
    rollout = canary_rollout(fleet, start, options.seed, job["current_version"])
    summary["rollout"] = rollout["state"]
    return rollout["state"] == "promoted", summary


def run_demo(options: DemoOptions) -> int:
    """Run the tour; 0 when everything came up, the job finished and all stopped cleanly."""
    fleet = LocalFleet(options.workdir, options.agents, options.template, options.alpha,
                       options.seed, options.broker, options.embedded)  # fmt: skip
    start = time.monotonic()
    print(f"Fedge demo: a broker, a coordinator and {options.agents} agents, each its own process.")
    print(f"State and logs in {fleet.workdir} (an earlier demo's there is replaced)."
          " Ctrl-C stops it early.\n", flush=True)  # fmt: skip

    def interrupt(_sig: int, _frame: FrameType | None) -> None:
        raise _InterruptedError

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    watcher = FleetWatcher(fleet.db, start, options.agents)
    ok, summary = False, dict[str, Any]()
    try:
        ok, summary = _tour(fleet, options, watcher, start)
    except _InterruptedError:
        print()
        say(start, "stopping ...")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        codes = fleet.stop_agents()
        watcher.wait_all_offline(timeout=3.0)
        fleet.stop()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    clean = all(code == 0 for code in codes)
    say(start, "all processes stopped cleanly" if clean else f"agent exit codes: {codes}")
    if summary:
        print(f"\nfederated accuracy {summary['final_accuracy']} vs centralized "
              f"{summary.get('baseline_accuracy')}; uplink {human_bytes(summary['uplink_bytes'])}"
              f" (dense fp32 would be {human_bytes(summary['dense_bytes'])})")  # fmt: skip
        print(json.dumps(summary), flush=True)
    return 0 if ok and clean else 1
