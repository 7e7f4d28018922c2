"""Starts a local MQTT broker for the demo when none is configured.

Mosquitto when it is installed (with Fedge's broker settings: no silent drops of queued
QoS 1 messages), else the embedded ``amqtt`` broker, which speaks MQTT 3.1.1 only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

BrokerKind = Literal["mosquitto", "amqtt"]
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).is_file()), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> bool:
    """True once something accepts TCP connections on host:port; False after `timeout`
    or as soon as `process` (the server expected to listen) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_config(port: int, host: str = "127.0.0.1") -> str:
    """A mosquitto.conf for a local, anonymous broker that never drops queued QoS 1 silently."""
    return "\n".join(
        [
            f"listener {port} {host}",
            "allow_anonymous true",
            "persistence false",
            # Never drop queued QoS 1 silently at the default 1000; 0 (unlimited) is mishandled
            # by some Mosquitto releases, so a very high count plus a byte cap instead.
            "max_queued_messages 1000000",
            "max_queued_bytes 536870912",
            "max_inflight_messages 100",
            "log_type error",
            "log_type warning",
            "",
        ]
    )


def amqtt_config(port: int, host: str = "127.0.0.1") -> str:
    """An amqtt YAML config for a local, anonymous broker."""
    return (
        "listeners:\n"
        "  default:\n"
        "    type: tcp\n"
        f"    bind: {host}:{port}\n"
        "plugins:\n"
        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        "    allow_anonymous: true\n"
    )


class LocalBroker:
    """A broker process on loopback; `start` returns once it accepts connections."""

    def __init__(
        self, workdir: Path, kind: BrokerKind | None = None, port: int | None = None
    ) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        mosquitto = find_mosquitto()
        self.kind: BrokerKind = kind or ("mosquitto" if mosquitto else "amqtt")
        self._mosquitto = mosquitto
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def protocol(self) -> Literal["5", "3.1.1"]:
        """The MQTT version clients should speak to this broker."""
        return "5" if self.kind == "mosquitto" else "3.1.1"

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker; RuntimeError with its output if it does not come up."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{self.kind}.log"
        if self.kind == "mosquitto":
            if self._mosquitto is None:
                raise RuntimeError(
                    "mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)"
                )
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(mosquitto_config(self.port, self.host))
            cmd = [self._mosquitto, "-c", str(conf)]
        else:
            conf = self.workdir / "amqtt.yaml"
            conf.write_text(amqtt_config(self.port, self.host))
            cmd = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
        with open(log_path, "wb") as log_file:
            # its own session: a Ctrl-C in the terminal must not kill it before the agents
            # and the coordinator have said goodbye through it (the demo stops it last)
            self._process = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        if not wait_for_port(self.host, self.port, timeout, self._process):
            self.stop()
            raise RuntimeError(f"{self.kind} did not start on port {self.port}; see {log_path}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker process."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
