"""protocols.logs: journald priority prefixes, and the text/journal choice of setup_logging."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from protocols.logs import JournalFormatter, setup_logging, stderr_is_journal


def record(level: int, msg: str, name: str = "fedge.test") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.CRITICAL, "<2>"),
        (logging.ERROR, "<3>"),
        (logging.WARNING, "<4>"),
        (logging.INFO, "<6>"),
        (logging.DEBUG, "<7>"),
        (25, "<6>"),  # a custom level falls back to info
    ],
)
def test_journal_prefix_follows_the_level(level: int, prefix: str) -> None:
    text = JournalFormatter("%(name)s: %(message)s").format(record(level, "hello"))
    assert text == f"{prefix}fedge.test: hello"


def test_journal_prefixes_every_line_of_a_multi_line_record() -> None:
    text = JournalFormatter("%(name)s: %(message)s").format(
        record(logging.WARNING, "first\nsecond\n\nfourth")
    )
    assert text.split("\n") == ["<4>fedge.test: first", "<4>second", "<4>", "<4>fourth"]


def test_journal_prefixes_traceback_lines() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    lines = JournalFormatter("%(message)s").format(rec).split("\n")
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: boom"


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, with its handlers and level restored after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def _only_handler(root: logging.Logger) -> logging.Handler:
    [handler] = root.handlers
    return handler


def test_setup_logging_journal_format(
    root_logging: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("debug", "journal", "fedge-agent")
    assert isinstance(_only_handler(root_logging).formatter, JournalFormatter)
    assert root_logging.level == logging.DEBUG
    logging.getLogger("agent.daemon").warning("broker down")
    logging.getLogger("agent.daemon").debug("detail")
    assert stream.getvalue() == "<4>agent.daemon: broker down\n<7>agent.daemon: detail\n"


def test_setup_logging_text_format(
    root_logging: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    setup_logging("warning", "text", "fedge-agent")
    assert not isinstance(_only_handler(root_logging).formatter, JournalFormatter)
    logging.getLogger("agent.daemon").info("not shown")
    logging.getLogger("agent.daemon").error("broker down")
    [line] = stream.getvalue().splitlines()
    assert line.endswith("ERROR   fedge-agent agent.daemon: broker down")
    assert not line.startswith("<")


@pytest.fixture
def stderr_file(tmp_path: Path) -> Iterator[TextIO]:
    """A real file to stand in for stderr, so it has a device and inode to compare.

    Tests install it themselves: pytest's capture resets ``sys.stderr`` between phases.
    """
    with open(tmp_path / "stderr.log", "w") as stream:
        yield stream


def test_auto_picks_journal_when_journal_stream_is_our_stderr(
    root_logging: logging.Logger, stderr_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", stderr_file)
    st = os.fstat(stderr_file.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert stderr_is_journal()
    setup_logging("info", "auto", "fedge-agent")
    assert isinstance(_only_handler(root_logging).formatter, JournalFormatter)


def test_explicit_text_wins_even_under_the_journal(
    root_logging: logging.Logger, stderr_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", stderr_file)
    st = os.fstat(stderr_file.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    setup_logging("info", "text", "fedge-agent")
    assert not isinstance(_only_handler(root_logging).formatter, JournalFormatter)


@pytest.mark.parametrize("stream", [None, "", "garbage", "1:2:3", "0:0"])
def test_auto_picks_text_otherwise(
    stream: str | None,
    root_logging: logging.Logger,
    stderr_file: TextIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stderr", stderr_file)
    if stream is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", stream)
    assert not stderr_is_journal()
    setup_logging("info", "auto", "fedge-agent")
    assert not isinstance(_only_handler(root_logging).formatter, JournalFormatter)


def test_stderr_without_a_file_descriptor_is_not_the_journal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    assert stderr_is_journal() is False
