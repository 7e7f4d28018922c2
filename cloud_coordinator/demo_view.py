"""What the demo prints: fleet changes as they happen, a progress bar per round, a summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from cloud_coordinator.errors import StoreError
from cloud_coordinator.fleet_view import shown
from cloud_coordinator.registry import DeviceRecord, read_devices

POLL_S = 0.2


def say(start: float, text: str) -> None:
    """Print a line stamped with seconds since `start`."""
    print(f"[{time.monotonic() - start:6.1f}s] {text}", flush=True)


def human_bytes(n: float) -> str:
    """``12.3 kB``, ``4.5 MB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def snapshot(db: Path) -> dict[str, DeviceRecord]:
    """The registry's devices by id (empty until the coordinator has written it)."""
    try:
        return {d.device_id: d for d in read_devices(db)}
    except StoreError:
        return {}


class FleetWatcher:
    """Prints each device's state change as the registry records it (compact for big fleets)."""

    def __init__(self, db: Path, start: float, expected: int) -> None:
        self.db = db
        self.start = start
        self.expected = expected
        self.seen: dict[str, bool] = {}

    def poll(self) -> dict[str, DeviceRecord]:
        """Read the registry and print what changed."""
        devices = snapshot(self.db)
        for dev_id, record in sorted(devices.items()):
            if self.seen.get(dev_id) != record.online:
                self.seen[dev_id] = record.online
                online = sum(self.seen.values())
                state = "online " if record.online else "offline"
                reason = f" ({shown(record.status_reason)})" if record.status_reason else ""
                say(self.start, f"{dev_id:<10} {state}{reason:<22} {online}/{self.expected} online")
        return devices

    def all_online(self) -> bool:
        """True once every expected device is online."""
        return sum(self.seen.values()) >= self.expected

    def wait_all_offline(self, timeout: float) -> None:
        """Poll until no device is online, or `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(d.online for d in self.poll().values()):
                return
            time.sleep(POLL_S)


class RoundProgress:
    """A progress bar that redraws in a terminal and prints a line per round elsewhere."""

    def __init__(self, rounds: int, width: int = 24) -> None:
        self.rounds = rounds
        self.width = width
        self.shown = 0
        self.tty = sys.stdout.isatty()

    def update(self, job: dict[str, Any]) -> None:
        """Show every round finished since the last call."""
        done = [r for r in job["rounds"] if r["state"] == "done"]
        for r in done[self.shown :]:
            m = r["metrics"]
            filled = round(self.width * r["round"] / self.rounds)
            bar = "#" * filled + "." * (self.width - filled)
            line = (
                f"round {r['round']:>3}/{self.rounds} [{bar}] acc {m['accuracy']:.3f}"
                f"  loss {m['loss']:.3f}  up {human_bytes(m['uplink_bytes']):>8}"
                f" (dense {human_bytes(m['dense_bytes'])})  {m['participants']} devices"
                f"  {m['wall_s']:.2f}s"
            )
            end = "\r" if self.tty and r["round"] < self.rounds else "\n"
            print(line, end=end, flush=True)
            if self.tty and end == "\r" and r is not done[-1]:
                print()
        self.shown = len(done)

    def finish(self) -> None:
        """End the bar's line."""
        if self.tty and self.shown and self.shown < self.rounds:
            print()
