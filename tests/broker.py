"""A real Mosquitto for tests: a plain and an mTLS listener on free loopback ports, with ACLs.

The test writes the config, starts the broker, and stops it by PID. Nothing here talks to
a broker that happens to be running on the machine.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloud_coordinator.broker import find_mosquitto, free_port, wait_for_port
from protocols.config import BrokerConfig
from tests.pki import CertFiles, TestCA

COORDINATOR_USER = "fedge-coordinator-main"


def acl_text() -> str:
    """ACLs: anonymous clients (plain listener) may do anything; certificate users get their
    own device subtree, the coordinator identity gets everything."""
    return "\n".join(
        [
            "# anonymous clients (plain test listener only)",
            "topic readwrite #",
            "",
            "# every certificate identity: its own device subtree, models and jobs read-only",
            "pattern readwrite fedge/v1/dev/%u/#",
            "pattern read fedge/v1/model/#",
            "pattern read fedge/v1/job/#",
            "",
            f"user {COORDINATOR_USER}",
            "topic readwrite #",
            "",
        ]
    )


def mosquitto_running(log_file: Path, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """True once mosquitto logs that it runs (every listener bound: a port answering may be
    another process's, taken before mosquitto could bind it); False if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if log_file.exists() and " running" in log_file.read_text(errors="replace"):
            return process.poll() is None
        time.sleep(0.02)
    return False


@dataclass
class Mosquitto:
    """A running Mosquitto started by a test."""

    directory: Path
    ca: TestCA
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    server: CertFiles | None = None
    started: bool = False  # (once clients know its ports, a restart must keep them)

    @property
    def log_file(self) -> Path:
        """Where the broker logs."""
        return self.directory / "mosquitto.log"

    def config_text(self) -> str:
        """The mosquitto.conf this broker runs with."""
        assert self.server is not None
        return "\n".join(
            [
                "per_listener_settings false",
                # mosquitto started as root drops to user `mosquitto`, who cannot read tmp_path
                f"user {getpass.getuser()}",
                "allow_anonymous true",
                f"acl_file {self.directory / 'acl'}",
                "persistence false",
                "max_queued_messages 1000000",
                "max_queued_bytes 536870912",
                f"log_dest file {self.log_file}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_type information",
                "connection_messages true",
                f"listener {self.port} {self.host}",
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.ca.ca_file}",
                f"certfile {self.server.cert}",
                f"keyfile {self.server.key}",
                "require_certificate true",
                "use_identity_as_username true",
                "",
            ]
        )

    def start(self) -> None:
        """Write the config and start the broker; return once both listeners accept."""
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto is not installed; `make test` installs it (apt-get)")
        self.server = self.server or self.ca.issue("broker", server=True)
        (self.directory / "acl").write_text(acl_text())
        conf = self.directory / "mosquitto.conf"
        conf.write_text(self.config_text())
        err_file = self.directory / "stderr.log"
        for attempt in range(3):
            with open(err_file, "wb") as err_out:
                self.process = subprocess.Popen(
                    [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=err_out
                )
            if (
                wait_for_port(self.host, self.port, 10, self.process)
                and wait_for_port(self.host, self.tls_port, 10, self.process)
                and mosquitto_running(self.log_file, self.process, 10)
            ):
                self.started = True
                return
            self.stop()
            error = err_file.read_text(errors="replace")
            if self.log_file.exists():
                error += self.log_file.read_text(errors="replace")
            # A port found free can be taken before the broker binds it (by another test
            # on a parallel worker, or as a client's ephemeral port): a first start moves.
            if self.started or "Address already in use" not in error or attempt == 2:
                raise RuntimeError(f"mosquitto did not start: {error}")
            self.port, self.tls_port = free_port(), free_port()
            conf.write_text(self.config_text())

    def stop(self) -> None:
        """Stop the broker by PID (SIGTERM, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self, downtime: float = 0.0) -> None:
        """Stop and start again on the same ports."""
        self.stop()
        time.sleep(downtime)
        self.start()

    def broker_config(self, **overrides: object) -> BrokerConfig:
        """Settings for a plain-listener client."""
        values: dict[str, object] = {"host": self.host, "port": self.port}
        values.update(overrides)
        return BrokerConfig(**values)  # type: ignore[arg-type]

    def tls_config(self, identity: str, **overrides: object) -> BrokerConfig:
        """Settings for an mTLS client whose certificate CN is `identity`."""
        files = self.ca.issue(identity)
        values: dict[str, object] = {
            "host": self.host,
            "port": self.tls_port,
            "tls_ca": str(self.ca.ca_file),
            "tls_cert": str(files.cert),
            "tls_key": str(files.key),
        }
        values.update(overrides)
        return BrokerConfig(**values)  # type: ignore[arg-type]

    def env(self, protocol: str = "5") -> dict[str, str]:
        """FEDGE_MQTT_* variables pointing a daemon at the plain listener."""
        return {
            "FEDGE_MQTT_HOST": self.host,
            "FEDGE_MQTT_PORT": str(self.port),
            "FEDGE_MQTT_PROTOCOL": protocol,
        }
