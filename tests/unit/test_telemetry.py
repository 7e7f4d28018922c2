"""agent.telemetry.HealthProbe: real readings on Linux, and the CPU arithmetic on canned /proc."""

from __future__ import annotations

import sys
import time

import pytest

from agent import telemetry
from agent.telemetry import HealthProbe

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux_only
def test_real_sample_is_in_sane_ranges() -> None:
    probe = HealthProbe()
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:  # burn a little CPU so the interval is not empty
        sum(range(1000))
    health = probe.sample()
    assert 0.0 <= health.cpu_percent <= 100.0
    assert 1 * 2**20 < health.mem_rss_bytes < 64 * 2**30
    assert health.mem_available_bytes > 0
    assert health.load1 >= 0.0


@linux_only
def test_rss_matches_proc_self_status() -> None:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert abs(HealthProbe().sample().mem_rss_bytes - kib * 1024) < 64 * 2**20


def test_uptime_grows() -> None:
    probe = HealthProbe()
    first = probe.uptime_s()
    time.sleep(0.02)
    second = probe.uptime_s()
    assert 0.0 <= first < second
    assert second - first >= 0.015


PROC = {
    "/proc/meminfo": "MemTotal:  2000 kB\nMemFree:  100 kB\nMemAvailable:  1500 kB\n",
    "/proc/self/status": "Name:\tpython\nVmRSS:\t  2048 kB\n",
}


def _fake_proc(monkeypatch: pytest.MonkeyPatch, stats: list[str]) -> None:
    def read(path: str) -> str:
        if path == "/proc/stat":
            return stats.pop(0)
        return PROC.get(path, "")

    monkeypatch.setattr(telemetry, "_read", read)


def test_cpu_percent_is_busy_share_of_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_proc(
        monkeypatch,
        [
            "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n",  # total 1000, idle+iowait 800
            "cpu  300 0 200 1300 200 0 0 0 0 0\ncpu0 1 2 3 4\n",  # +1000 total, +700 idle
            "cpu  300 0 200 1300 200 0 0 0 0 0\n",  # nothing elapsed
        ],
    )
    probe = HealthProbe()
    first = probe.sample()
    assert first.cpu_percent == 30.0
    assert first.mem_rss_bytes == 2048 * 1024
    assert first.mem_available_bytes == 1500 * 1024
    assert probe.sample().cpu_percent == 0.0


def test_unreadable_proc_gives_zeros_not_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_read", lambda path: "")
    health = HealthProbe().sample()
    assert health.cpu_percent == 0.0
    assert health.mem_available_bytes == 0
    assert health.mem_rss_bytes > 0  # falls back to getrusage
