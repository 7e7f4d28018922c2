"""The agent's CPU time reading from /proc/stat: guest time is inside user time already."""

from __future__ import annotations

import pytest

from agent import telemetry


def test_guest_time_is_not_counted_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    stat = "cpu  100 0 100 700 100 0 0 0 50 0\ncpu0 50 0 50 350 50 0 0 0 25 0\n"
    monkeypatch.setattr(telemetry, "_read", lambda path: stat)
    assert telemetry._cpu_times() == (1000, 800)  # not 1050: guest (50) is inside user


def test_an_old_kernel_with_fewer_fields_still_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_read", lambda path: "cpu  10 0 10 80\n")
    assert telemetry._cpu_times() == (100, 80)
    monkeypatch.setattr(telemetry, "_read", lambda path: "")
    assert telemetry._cpu_times() is None
