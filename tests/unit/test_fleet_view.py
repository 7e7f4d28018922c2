"""cloud_coordinator.fleet_view: durations and the devices table."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cloud_coordinator.fleet_view import ago, device_table
from cloud_coordinator.registry import DeviceRecord

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (59.9, "59s"),
        (60, "1m"),
        (119, "1m"),
        (3599, "59m"),
        (3600, "1h"),
        (86399, "23h"),
        (86400, "1d"),
        (5 * 86400 + 3, "5d"),
        (400 * 86400, "400d"),
        (-30, "0s"),  # clock skew never shows a negative age
    ],
)
def test_ago(seconds: float, text: str) -> None:
    assert ago(seconds) == text


def device(device_id: str, **kw: Any) -> DeviceRecord:
    values: dict[str, Any] = {
        "first_seen": NOW - 1000,
        "last_seen": NOW - 5,
        "online": False,
        "status_changed": None,
        "status_reason": "",
        "agent_version": "",
        "telemetry": None,
        "model_versions": {},
    }
    values.update(kw)
    return DeviceRecord(device_id=device_id, **values)


FLEET = [
    device(
        "cam-1",
        online=True,
        status_changed=NOW - 30,
        agent_version="1.2.3",
        telemetry={"cpu_percent": 12.6, "mem_rss_bytes": 50 * 2**20, "uptime_s": 7300},
    ),
    device("a-much-longer-device-name", last_seen=NOW - 7200, status_changed=NOW - 3 * 86400),
]


HEADER = ["DEVICE", "STATE", "SINCE", "LAST SEEN", "VERSION", "CPU", "RSS", "UPTIME"]


def columns(line: str, header: str) -> list[str]:
    """Cut `line` at the positions where the header's columns start."""
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [*starts[1:], None]
    return [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]


def test_device_table_rows() -> None:
    lines = device_table(FLEET, now=NOW).splitlines()
    header = lines[0]
    assert columns(header, header) == HEADER
    cam = ["cam-1", "online", "30s", "5s ago", "1.2.3", "13%", "50 MiB", "2h"]
    assert columns(lines[1], header) == cam
    other = ["a-much-longer-device-name", "offline", "3d", "2h ago", "-", "-", "-", "-"]
    assert columns(lines[2], header) == other
    assert lines[3] == "1 of 2 devices online"


def test_device_table_columns_are_aligned_and_unpadded_at_the_end() -> None:
    lines = device_table(FLEET, now=NOW).splitlines()
    width = len("a-much-longer-device-name")
    for line in lines[:3]:
        assert line[width : width + 2] == "  "
        assert line[width + 2] != " "
        assert line == line.rstrip()


def test_device_table_without_status_shows_dashes() -> None:
    lines = device_table([device("new", telemetry={"cpu_percent": "n/a"})], now=NOW).splitlines()
    assert columns(lines[1], lines[0])[:3] == ["new", "offline", "-"]
    assert columns(lines[1], lines[0])[5] == "-"


def test_empty_fleet() -> None:
    lines = device_table([], now=NOW).splitlines()
    assert lines[0].startswith("DEVICE")
    assert lines[1:] == ["0 of 0 devices online"]


def test_device_table_uses_the_clock_when_now_is_not_given() -> None:
    import time

    text = device_table([device("cam-1", last_seen=time.time() - 125)])
    assert "2m ago" in text
