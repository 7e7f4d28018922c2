"""``fedge-coordinator demo``: a broker, a coordinator and N agents, each its own process.

It starts a local broker unless one is configured, shows the fleet coming online as the
coordinator's registry sees it, and on Ctrl-C stops the agents (watching them go offline),
then the coordinator and the broker.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from cloud_coordinator.broker import BrokerKind, LocalBroker, free_port
from cloud_coordinator.config import DB_NAME
from cloud_coordinator.errors import StoreError
from cloud_coordinator.fleet_view import device_table
from cloud_coordinator.registry import DeviceRecord, read_devices

POLL_S = 0.2


class _InterruptedError(Exception):
    pass


def _say(start: float, text: str) -> None:
    print(f"[{time.monotonic() - start:6.1f}s] {text}", flush=True)


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        # Own session: a terminal's Ctrl-C reaches only the demo, which stops children in order.
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
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


def _snapshot(db: Path) -> dict[str, DeviceRecord]:
    try:
        return {d.device_id: d for d in read_devices(db)}
    except StoreError:
        return {}


class _Watcher:
    """Prints each device's state change as the registry records it."""

    def __init__(self, db: Path, start: float) -> None:
        self.db = db
        self.start = start
        self.seen: dict[str, bool] = {}

    def poll(self) -> dict[str, DeviceRecord]:
        devices = _snapshot(self.db)
        for dev_id, record in sorted(devices.items()):
            if self.seen.get(dev_id) != record.online:
                self.seen[dev_id] = record.online
                online = sum(self.seen.values())
                state = "online " if record.online else "offline"
                reason = f" ({record.status_reason})" if record.status_reason else ""
                _say(
                    self.start, f"{dev_id:<10} {state}{reason:<22} {online}/{len(self.seen)} online"
                )
        return devices

    def wait_all_offline(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(d.online for d in self.poll().values()):
                return
            time.sleep(POLL_S)


def run_demo(
    agents: int,
    broker_addr: str | None,
    duration: float | None,
    workdir: Path,
    embedded: BrokerKind | None = None,
) -> int:
    """Run the tour; return 0 when every agent came online and everything stopped cleanly."""
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    start = time.monotonic()
    print(f"Fedge demo: a broker, a coordinator and {agents} agents, each its own process.")
    print(f"State and logs in {workdir}. Press Ctrl-C to stop.\n", flush=True)

    def interrupt(_sig: int, _frame: FrameType | None) -> None:
        raise _InterruptedError

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    env = dict(os.environ, FEDGE_LOG_FORMAT="text", PYTHONUNBUFFERED="1")
    broker: LocalBroker | None = None
    children: list[subprocess.Popen[bytes]] = []
    agent_procs: list[subprocess.Popen[bytes]] = []
    ok = False
    coord_dir = workdir / "coordinator"
    watcher = _Watcher(coord_dir / DB_NAME, start)
    try:
        if broker_addr or os.environ.get("FEDGE_MQTT_HOST"):
            addr = broker_addr or os.environ["FEDGE_MQTT_HOST"]
            host, sep, port = addr.rpartition(":")
            env["FEDGE_MQTT_HOST"], env["FEDGE_MQTT_PORT"] = (host, port) if sep else (addr, "1883")
            _say(
                start,
                f"using the configured broker at {env['FEDGE_MQTT_HOST']}:{env['FEDGE_MQTT_PORT']}",
            )
        else:
            broker = LocalBroker(workdir / "broker", embedded)
            broker.start()
            env.update(FEDGE_MQTT_HOST=broker.host, FEDGE_MQTT_PORT=str(broker.port))
            env["FEDGE_MQTT_PROTOCOL"] = broker.protocol
            _say(
                start,
                f"broker: {broker.kind} on {broker.host}:{broker.port} (MQTT {broker.protocol})",
            )
        http_port = free_port()
        children.append(
            _spawn(
                [sys.executable, "-m", "cloud_coordinator", "serve", "--data-dir", str(coord_dir),
                 "--http", f"127.0.0.1:{http_port}"],
                logs / "coordinator.log",
                env,
            )
        )  # fmt: skip
        _say(start, f"coordinator started; HTTP API on http://127.0.0.1:{http_port}/v1/devices")
        for i in range(1, agents + 1):
            agent_procs.append(
                _spawn(
                    [sys.executable, "-m", "agent", "--device-id", f"agent-{i:02d}",
                     "--data-dir", str(workdir / "agents" / f"agent-{i:02d}"),
                     "--telemetry-interval", "2", "--keepalive", "10"],
                    logs / f"agent-{i:02d}.log",
                    env,
                )
            )  # fmt: skip
        _say(start, f"{agents} agents started; waiting for them to come online ...")
        deadline = None if duration is None else time.monotonic() + duration
        announced = False
        while deadline is None or time.monotonic() < deadline:
            devices = watcher.poll()
            if not announced and len(devices) == agents and all(d.online for d in devices.values()):
                announced = ok = True
                _say(start, f"all {agents} agents online\n")
                print(device_table(list(devices.values())))
                print(f"\nInspect: fedge-coordinator devices --data-dir {coord_dir}")
                print(f"         curl http://127.0.0.1:{http_port}/metrics\n", flush=True)
            if children[0].poll() is not None:
                code = children[0].returncode
                _say(start, f"the coordinator exited ({code}); see {logs}/coordinator.log")
                return 1
            time.sleep(POLL_S)
    except _InterruptedError:
        print()
        _say(start, "stopping ...")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if agent_procs:
            _stop(agent_procs)
            watcher.wait_all_offline(timeout=3.0)
        _stop(children)
        if broker is not None:
            broker.stop()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    codes = [p.returncode for p in agent_procs]
    clean = all(code == 0 for code in codes)
    _say(start, "all processes stopped cleanly" if clean else f"agent exit codes: {codes}")
    return 0 if ok and clean else 1
