"""Helpers that run the real daemons as processes and wait on what the registry shows."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cloud_coordinator.errors import StoreError
from cloud_coordinator.registry import DeviceRecord, read_devices, read_rejections

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout: float, interval: float = 0.02) -> T:
    """Poll `check` until it returns a truthy value; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f}s")
        time.sleep(interval)


class Daemon:
    """A daemon process whose output goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self.started_at = time.monotonic()
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def signal(self, sig: int) -> None:
        """Send `sig` to the process."""
        os.kill(self.process.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for exit and return the status."""
        return self.process.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.log.read_text(errors="replace")


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    env.update(FEDGE_LOG_FORMAT="text", FEDGE_LOG_LEVEL="debug", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Coordinator(Daemon):
    """``python -m cloud_coordinator serve`` with its own data dir and HTTP port."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self._http_port: int | None = None
        data_dir.mkdir(parents=True, exist_ok=True)
        args = ["-m", "cloud_coordinator", "serve", "--data-dir", str(data_dir)]
        # Port 0: the coordinator binds a free port itself and logs it (a port chosen here
        # could be taken, by a test on another worker, before the coordinator binds it).
        args += ["--http", "127.0.0.1:0"]
        log = data_dir / "coordinator.log"
        self._log_start = log.stat().st_size if log.exists() else 0  # (a restart appends)
        super().__init__(args, _env(env), log)

    @property
    def http_port(self) -> int:
        """The port of its HTTP API, from its log (ConnectionRefusedError before it says)."""
        if self._http_port is None:
            with open(self.log, "rb") as log:
                log.seek(self._log_start)
                ours = log.read().decode(errors="replace")  # (this process's lines only)
            found = re.search(r" API http://127\.0\.0\.1:(\d+),", ours)
            if found is None:
                raise ConnectionRefusedError("the coordinator has not opened its HTTP API yet")
            self._http_port = int(found.group(1))
        return self._http_port

    @property
    def db(self) -> Path:
        """The registry database."""
        return self.data_dir / "coordinator.db"

    def get(self, path: str) -> Any:
        """GET a JSON endpoint of the HTTP API."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
            return json.loads(r.read())

    def post(self, path: str, body: object, timeout: float = 60.0) -> tuple[int, Any]:
        """POST `body` as JSON; return the status and the decoded JSON answer (errors too)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return int(r.status), json.loads(r.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def metrics(self) -> str:
        """The Prometheus text of /metrics."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(r.read().decode())

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until the API answers and reports a broker connection."""

        def ready() -> bool:
            try:
                return bool(self.get("/healthz")["mqtt_connected"])
            except OSError:
                return False

        wait_until(ready, timeout)

    def devices(self) -> dict[str, DeviceRecord]:
        """The registry as the operator sees it (empty while it does not exist yet)."""
        try:
            return {d.device_id: d for d in read_devices(self.db)}
        except StoreError:
            return {}

    def device(self, device_id: str) -> DeviceRecord | None:
        """One device's record, or None."""
        return self.devices().get(device_id)

    def rejections(self) -> dict[tuple[str, str], int]:
        """Rejection counts by (channel, reason)."""
        return read_rejections(self.db)


class Agent(Daemon):
    """``python -m agent`` as one device."""

    def __init__(self, device_id: str, data_dir: Path, env: dict[str, str], *flags: str) -> None:
        self.device_id = device_id
        data_dir.mkdir(parents=True, exist_ok=True)
        args = ["-m", "agent", "--device-id", device_id, "--data-dir", str(data_dir), *flags]
        super().__init__(args, _env(env), data_dir / f"{device_id}.log")


@contextmanager
def running(*daemons: Daemon) -> Iterator[None]:
    """Stop `daemons` (in reverse order) when the block ends, whatever happens."""
    try:
        yield
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
