"""Reads the device's health for telemetry: CPU, memory, load, uptime (Linux /proc, no psutil)."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Health:
    """One reading of the device's health."""

    cpu_percent: float
    mem_rss_bytes: int
    mem_available_bytes: int
    load1: float


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_times() -> tuple[int, int] | None:
    first = _read("/proc/stat").split("\n", 1)[0].split()
    if len(first) < 5 or first[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal: guest and guest_nice (the 9th and
    # 10th) are counted inside user and nice already; summed again they understate use
    values = [int(v) for v in first[1:9]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


def _meminfo_available() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class HealthProbe:
    """Samples health; CPU percent is over the interval since the previous sample."""

    def __init__(self) -> None:
        self._last = _cpu_times()
        self.started = time.monotonic()

    def uptime_s(self) -> float:
        """Seconds since this probe (the agent) started."""
        return time.monotonic() - self.started

    def sample(self) -> Health:
        """Read the device's health now."""
        now = _cpu_times()
        cpu = 0.0
        if now is not None and self._last is not None:
            total = now[0] - self._last[0]
            idle = now[1] - self._last[1]
            cpu = 100.0 * (total - idle) / total if total > 0 else 0.0
        self._last = now
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return Health(round(cpu, 1), _rss_bytes(), _meminfo_available(), round(load1, 2))
