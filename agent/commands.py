"""Which commands may run: fresh ones, once each (what the daemon checks before acting).

MQTT's QoS 1 delivers at least once: after a reconnect, or a restart before the broker
saw the acknowledgement, the same command can arrive again. A command with an id already
executed is acknowledged again as a duplicate, not run again (a second ``rollback`` would
leave the version it went back to, and block it). The ids are kept in
``<data_dir>/commands.seen``, the newest `KEEP`, so a restart remembers them too.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path

from agent.atomic_file import write_bytes_atomically
from protocols.messages import Command
from protocols.topics import valid_id

#: Command ids remembered (the file is compacted to these when it holds twice as many).
KEEP = 512
#: Seconds a command's ``ts`` may lie ahead of this device's clock (clocks drift).
MAX_CLOCK_SKEW_S = 300.0


def refusal(command: Command, now: float) -> str | None:
    """Why `command` must not run at `now` (the device's clock), or None."""
    if not math.isfinite(command.ts) or not math.isfinite(command.ttl_s) or command.ttl_s < 0:
        return "invalid ts or ttl_s"
    if command.ts > now + MAX_CLOCK_SKEW_S:
        return "from the future: check the coordinator's and this device's clocks"
    if command.ttl_s > 0 and now > command.ts + command.ttl_s:
        return "expired"
    return None


class CommandLog:
    """The ids of the commands already executed, kept in a file (thread-safe)."""

    def __init__(self, path: Path, keep: int = KEEP) -> None:
        self._path = path
        self._keep = keep
        self._lock = threading.Lock()
        try:
            ids = [i for i in path.read_bytes().decode("utf-8", "replace").split() if valid_id(i)]
        except FileNotFoundError:
            ids = []  # (damaged lines are skipped: at worst a command redelivered runs again)
        self._lines = len(ids)
        self._ids: OrderedDict[str, None] = OrderedDict.fromkeys(ids[-keep:])

    def seen(self, cmd_id: str) -> bool:
        """Whether a command with this id was executed already."""
        with self._lock:
            return cmd_id in self._ids

    def add(self, cmd_id: str) -> None:
        """Remember that `cmd_id` ran (before its acknowledgement is sent)."""
        with self._lock:
            self._ids[cmd_id] = None
            while len(self._ids) > self._keep:
                self._ids.popitem(last=False)
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if self._lines >= 2 * self._keep:  # compact: only the ids kept
                text = "".join(f"{i}\n" for i in self._ids)
                write_bytes_atomically(self._path, text.encode("utf-8"))
                self._lines = len(self._ids)
            else:
                with open(self._path, "a", encoding="utf-8") as f:
                    f.write(f"{cmd_id}\n")
                self._lines += 1


__all__ = ["KEEP", "MAX_CLOCK_SKEW_S", "CommandLog", "refusal"]
