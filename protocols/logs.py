"""Logging setup shared by the daemons: readable on a terminal, well kept by journald.

Under systemd (``JOURNAL_STREAM`` names our stderr) each line starts with ``<N>``, the
syslog priority that journald turns into the entry's level, and carries no timestamp
(journald adds its own). Elsewhere lines are ``time level logger: message``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Literal

LogFormat = Literal["auto", "text", "journal"]
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """Prefix each record with its syslog priority, as sd-daemon(3) describes."""

    def format(self, record: logging.LogRecord) -> str:
        """Format `record` as ``<priority>logger: message``."""
        priority = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def stderr_is_journal() -> bool:
    """True when stderr is connected to the systemd journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def fatal(message: str) -> None:
    """Print why a command stops to stderr, at journald's error priority under systemd."""
    prefix = "<3>" if stderr_is_journal() else ""
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


def setup_logging(level: str = "info", fmt: LogFormat = "auto", name: str = "fedge") -> None:
    """Send log records to stderr at `level`, formatted for a terminal or for journald."""
    handler = logging.StreamHandler(sys.stderr)
    use_journal = fmt == "journal" or (fmt == "auto" and stderr_is_journal())
    if use_journal:
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {name} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` and ``--log-format`` (each daemon's config keys) to `parser`."""
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="the least severe records logged (default info)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "text", "journal"],
        help="text: time, level, logger; journal: each line prefixed with its syslog priority"
        " for journald; auto: journal when stderr is the journal (default auto)",
    )
