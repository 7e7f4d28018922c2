"""A whole Fedge deployment on this machine: broker, coordinator and N agents as processes.

Used by the demo and the round benchmark. `LocalFleet` writes each device's data share,
starts every process in its own session (so a terminal's Ctrl-C reaches only the caller,
which then stops the children in order: agents first, so they are seen going offline),
and talks to the coordinator over its HTTP API like any user would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cloud_coordinator.broker import BrokerKind, LocalBroker, free_port
from cloud_coordinator.config import DB_NAME
from protocols.config import split_host_port


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """SIGTERM every process, wait, SIGKILL the ones that linger."""
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


#: Written into a demo's work directory: the next demo may empty it (nothing else is).
MARKER = ".fedge-demo"
#: The empty config file the demo's processes read.
NO_CONFIG = "no-config.toml"


def check_workdir(workdir: Path) -> None:
    """ValueError unless `workdir` is new, empty, or an earlier demo's (it is emptied; one
    from before the marker file is known by its coordinator log)."""
    ours = (workdir / MARKER).is_file() or (workdir / "logs" / "coordinator.log").is_file()
    if workdir.is_file() or (workdir.is_dir() and any(workdir.iterdir()) and not ours):
        raise ValueError(
            f"--workdir {workdir} holds other files, and the demo empties its directory;"
            " give it a new or empty directory"
        )


class LocalFleet:
    """Broker + coordinator + agents under one work directory."""

    def __init__(
        self,
        workdir: Path,
        agents: int,
        template: str = "digits_mlp",
        alpha: float = 0.5,
        seed: int = 0,
        broker_addr: str | None = None,
        embedded: BrokerKind | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.n = agents
        self.template = template
        self.alpha = alpha
        self.seed = seed
        self.broker_addr = broker_addr
        self.embedded = embedded
        self.logs = self.workdir / "logs"
        self.coord_dir = self.workdir / "coordinator"
        self.http_port = free_port()
        self.broker: LocalBroker | None = None
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        # The fleet's processes read no config file and no FEDGE_* setting of this shell
        # (an installed /etc/fedge/agent.toml names TLS files the demo has none of).
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
        self.env.update(FEDGE_CONFIG=str(self.workdir / NO_CONFIG), FEDGE_LOG_FORMAT="text",
                        PYTHONUNBUFFERED="1")  # fmt: skip

    @property
    def db(self) -> Path:
        """The coordinator's registry database."""
        return self.coord_dir / DB_NAME

    def start_broker(self) -> str:
        """Use the configured broker or start one; return a description."""
        check_workdir(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.logs.mkdir(parents=True)
        (self.workdir / MARKER).write_text(
            "state of a `fedge-coordinator demo`: emptied by the next\n"
        )
        (self.workdir / NO_CONFIG).write_text("# the demo's processes use their defaults\n")
        addr = self.broker_addr or os.environ.get("FEDGE_MQTT_HOST")
        if addr:
            host, given = split_host_port(addr, "--broker")  # ConfigError: a bad address
            port = str(given or os.environ.get("FEDGE_MQTT_PORT", "1883"))
            # a broker of one's own: its other settings (protocol, TLS, login) come along
            self.env.update({k: v for k, v in os.environ.items() if k.startswith("FEDGE_MQTT_")})
            self.env.update(FEDGE_MQTT_HOST=host, FEDGE_MQTT_PORT=port)
            return f"using the configured broker at {host}:{port}"
        self.broker = LocalBroker(self.workdir / "broker", self.embedded)
        self.broker.start()
        self.env.update(FEDGE_MQTT_HOST=self.broker.host, FEDGE_MQTT_PORT=str(self.broker.port))
        self.env["FEDGE_MQTT_PROTOCOL"] = self.broker.protocol
        b = self.broker
        return f"broker: {b.kind} on {b.host}:{b.port} (MQTT {b.protocol})"

    def start_coordinator(self) -> None:
        """Start the coordinator process."""
        cmd = [sys.executable, "-m", "cloud_coordinator", "serve", "--data-dir",
               str(self.coord_dir), "--http", f"127.0.0.1:{self.http_port}"]  # fmt: skip
        self.coordinator = _spawn(cmd, self.logs / "coordinator.log", self.env)

    def prepare_data(self) -> list[Path]:
        """Write each device's share of the template's data set (Dirichlet label skew)."""
        from cloud_coordinator.datasets import prepare_fleet
        from cloud_coordinator.templates import get_template

        template = get_template(self.template)
        return prepare_fleet(
            template, self.n, "dirichlet", self.alpha, self.seed, self.workdir / "data"
        )

    def start_agents(self, data_dirs: list[Path]) -> None:
        """Start one agent per data directory (the device id is the directory's name)."""
        for data in data_dirs:
            cmd = [sys.executable, "-m", "agent", "--device-id", data.name,
                   "--data-dir", str(self.workdir / "agents" / data.name),
                   "--dataset-dir", str(data), "--telemetry-interval", "2",
                   "--keepalive", "10"]  # fmt: skip
            self.agents.append(_spawn(cmd, self.logs / f"{data.name}.log", self.env))

    def api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the coordinator's HTTP API (GET, or POST with a JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=data,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def coordinator_alive(self) -> bool:
        """True while the coordinator process runs."""
        return self.coordinator is not None and self.coordinator.poll() is None

    def stop_agents(self) -> list[int]:
        """Stop the agents; return their exit codes."""
        stop_processes(self.agents)
        return [p.returncode for p in self.agents]

    def stop(self) -> None:
        """Stop everything that is still running: agents, coordinator, broker."""
        stop_processes(self.agents)
        if self.coordinator is not None:
            stop_processes([self.coordinator])
        if self.broker is not None:
            self.broker.stop()
