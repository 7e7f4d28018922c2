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
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from cloud_coordinator.broker import BrokerKind, LocalBroker, free_port
from cloud_coordinator.config import DB_NAME
from cloud_coordinator.demo_view import FleetWatcher, RoundProgress, human_bytes, say
from cloud_coordinator.fleet_view import device_table

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
    alpha: float = 0.5
    seed: int = 0
    broker: str | None = None
    embedded: BrokerKind | None = None
    duration: float | None = None
    workdir: Path = Path("fedge-demo")


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        # Own session: a terminal's Ctrl-C reaches only the demo, which stops children in order.
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _api(port: int, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _summary(job: dict[str, Any], baseline: float) -> dict[str, Any]:
    done = [r for r in job["rounds"] if r["state"] == "done"]
    final = done[-1]["metrics"]["accuracy"] if done else None
    return {
        "final_accuracy": round(final, 4) if final is not None else None,
        "baseline_accuracy": round(baseline, 4),
        "accuracy_gap_points": round(100 * (baseline - final), 2) if final is not None else None,
        "rounds": len(done),
        "seconds_per_round": round(statistics.median(r["metrics"]["wall_s"] for r in done), 3)
        if done
        else None,
        "uplink_bytes": sum(r["metrics"]["uplink_bytes"] for r in done),
        "dense_bytes": sum(r["metrics"]["dense_bytes"] for r in done),
        "template": job["spec"]["template"],
        "compression": job["spec"]["compression"],
        "agents": len({d for r in done for d in r["selected"]}),
    }


def _baseline_accuracy(options: DemoOptions) -> float:
    from cloud_coordinator.baseline import run_baseline
    from cloud_coordinator.templates import get_template

    return float(run_baseline(get_template(options.template), options.seed).holdout_accuracy)


def _run_job(options: DemoOptions, port: int, start: float) -> dict[str, Any]:
    spec = {
        "job_id": "demo",
        "template": options.template,
        "strategy": options.strategy,
        "rounds": options.rounds,
        "devices_per_round": options.agents,
        "compression": options.compression,
        "data_seed": options.seed,
        "seed": options.seed,
    }
    say(start, f"starting job: {options.template}, {options.rounds} rounds, "
               f"{options.compression} updates, {options.strategy}")  # fmt: skip
    try:
        job = _api(port, "/v1/jobs", spec)
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"the coordinator refused the job: {exc.read().decode()}") from exc
    initial = job["current_version"]
    say(start, f"initial model {initial} published; devices train, the coordinator aggregates")
    progress = RoundProgress(options.rounds)
    while job["state"] == "running":
        time.sleep(POLL_S)
        job = _api(port, "/v1/jobs/demo")
        progress.update(job)
    progress.finish()
    if job["state"] != "done":
        say(start, f"job ended {job['state']}: {job['message']}")
    result: dict[str, Any] = job
    return result


def run_demo(options: DemoOptions) -> int:
    """Run the tour; 0 when everything came up, the job finished and all stopped cleanly."""
    workdir = options.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    start = time.monotonic()
    n = options.agents
    print(f"Fedge demo: a broker, a coordinator and {n} agents, each its own process.")
    print(f"State and logs in {workdir}. Press Ctrl-C to stop.\n", flush=True)

    def interrupt(_sig: int, _frame: FrameType | None) -> None:
        raise _InterruptedError

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    env = dict(os.environ, FEDGE_LOG_FORMAT="text", PYTHONUNBUFFERED="1")
    broker: LocalBroker | None = None
    children: list[subprocess.Popen[bytes]] = []
    agents: list[subprocess.Popen[bytes]] = []
    coord_dir = workdir / "coordinator"
    watcher = FleetWatcher(coord_dir / DB_NAME, start, n)
    ok = False
    summary: dict[str, Any] | None = None
    try:
        if options.broker or os.environ.get("FEDGE_MQTT_HOST"):
            addr = options.broker or os.environ["FEDGE_MQTT_HOST"]
            host, sep, port = addr.rpartition(":")
            env["FEDGE_MQTT_HOST"], env["FEDGE_MQTT_PORT"] = (host, port) if sep else (addr, "1883")
            say(
                start,
                f"using the configured broker at {env['FEDGE_MQTT_HOST']}:{env['FEDGE_MQTT_PORT']}",
            )
        else:
            broker = LocalBroker(workdir / "broker", options.embedded)
            broker.start()
            env.update(FEDGE_MQTT_HOST=broker.host, FEDGE_MQTT_PORT=str(broker.port))
            env["FEDGE_MQTT_PROTOCOL"] = broker.protocol
            say(
                start,
                f"broker: {broker.kind} on {broker.host}:{broker.port} (MQTT {broker.protocol})",
            )
        http_port = free_port()
        children.append(
            _spawn(
                [sys.executable, "-m", "cloud_coordinator", "serve", "--data-dir", str(coord_dir),
                 "--http", f"127.0.0.1:{http_port}"],
                logs / "coordinator.log", env,
            )
        )  # fmt: skip
        say(start, f"coordinator started; HTTP API on http://127.0.0.1:{http_port}/v1/devices")
        data_dirs = _prepare_data(options, workdir, start)
        for data in data_dirs:
            agents.append(
                _spawn(
                    [sys.executable, "-m", "agent", "--device-id", data.name,
                     "--data-dir", str(workdir / "agents" / data.name), "--dataset-dir", str(data),
                     "--telemetry-interval", "2", "--keepalive", "10"],
                    logs / f"{data.name}.log", env,
                )
            )  # fmt: skip
        say(start, f"{n} agents started; waiting for them to come online ...")
        deadline = time.monotonic() + 60
        while not watcher.all_online():
            watcher.poll()
            if children[0].poll() is not None or time.monotonic() > deadline:
                say(start, f"the fleet did not come up; see {logs}")
                return 1
            time.sleep(POLL_S)
        say(start, f"all {n} agents online\n")
        print(device_table(list(watcher.poll().values())))
        print(f"\nInspect: fedge-coordinator devices --data-dir {coord_dir}")
        print(f"         curl http://127.0.0.1:{http_port}/metrics\n", flush=True)
        if options.rounds > 0:
            job = _run_job(options, http_port, start)
            say(start, "training the centralized baseline on the pooled data ...")
            summary = _summary(job, _baseline_accuracy(options))
            ok = job["state"] == "done"
        else:
            ok = True
            end = None if options.duration is None else time.monotonic() + options.duration
            while end is None or time.monotonic() < end:
                watcher.poll()
                time.sleep(POLL_S)
    except _InterruptedError:
        print()
        say(start, "stopping ...")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if agents:
            _stop(agents)
            watcher.wait_all_offline(timeout=3.0)
        _stop(children)
        if broker is not None:
            broker.stop()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    clean = all(p.returncode == 0 for p in agents)
    say(
        start,
        "all processes stopped cleanly"
        if clean
        else f"agent exit codes: {[p.returncode for p in agents]}",
    )
    if summary is not None:
        up, dense = summary["uplink_bytes"], summary["dense_bytes"]
        fed, central = summary["final_accuracy"], summary["baseline_accuracy"]
        print(f"\nfederated accuracy {fed} vs centralized {central};"
              f" uplink {human_bytes(up)} (dense fp32 would be {human_bytes(dense)})")  # fmt: skip
        print(json.dumps(summary), flush=True)
    return 0 if ok and clean else 1


def _prepare_data(options: DemoOptions, workdir: Path, start: float) -> list[Path]:
    from cloud_coordinator.datasets import prepare_fleet
    from cloud_coordinator.templates import get_template

    template = get_template(options.template)
    dirs = prepare_fleet(
        template, options.agents, "dirichlet", options.alpha, options.seed, workdir / "data"
    )
    say(
        start,
        f"{template.dataset} split across {options.agents} devices, "
        f"Dirichlet(alpha={options.alpha})",
    )
    return dirs
