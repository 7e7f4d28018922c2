"""Renders the fleet for a terminal: the `devices` table and the demo's live lines."""

from __future__ import annotations

import math
import time

from cloud_coordinator.registry import DeviceRecord


def shown(text: str) -> str:
    """`text` safe to print: control characters (escapes, newlines) as ``\\x..``.

    Device ids are checked identifiers, but versions and reasons are device-supplied
    strings; printed raw, one could move the cursor, retitle the terminal or forge rows.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def ago(seconds: float) -> str:
    """A short human duration: ``3s``, ``4m``, ``2h``, ``5d`` (``-`` if not a number)."""
    if not math.isfinite(seconds):
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _mib(n: object) -> str:
    return f"{n / 2**20:.0f} MiB" if isinstance(n, int | float) and math.isfinite(n) else "-"


def device_table(devices: list[DeviceRecord], now: float | None = None) -> str:
    """The fleet as an aligned text table, one device a row."""
    now = time.time() if now is None else now
    header = ("DEVICE", "STATE", "SINCE", "LAST SEEN", "VERSION", "CPU", "RSS", "UPTIME")
    rows = [header]
    for d in devices:
        t = d.telemetry or {}
        cpu = t.get("cpu_percent")
        uptime = t.get("uptime_s")
        rows.append(
            (
                d.device_id,
                "online" if d.online else "offline",
                ago(now - d.status_changed) if d.status_changed else "-",
                f"{ago(now - d.last_seen)} ago",
                shown(d.agent_version) or "-",
                f"{cpu:.0f}%" if isinstance(cpu, int | float) and math.isfinite(cpu) else "-",
                _mib(t.get("mem_rss_bytes")),
                ago(uptime) if isinstance(uptime, int | float) else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    online = sum(d.online for d in devices)
    lines.append(f"{online} of {len(devices)} devices online")
    return "\n".join(lines)
