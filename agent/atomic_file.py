"""Files the agent replaces whole: written beside, fsynced, renamed over (all or nothing).

Every state file the agent rewrites (model blobs and pointers, the pinned key, command
ids, residuals, feedback and candidate rows) goes through `write_atomically`, so a crash or
a power cut leaves the old file or the new one, never a part of either, and a write cut
short (a full disk) leaves no temporary file behind. Temporary files are named
``.<name>.<pid>.tmp``; `agent.model_store` removes those an earlier process left.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with what `write` writes to a binary file; OSError leaves it as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # (a full disk: the part written goes too)
        raise
    fsync_directory(path.parent)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (`write_atomically`)."""
    write_atomically(path, lambda f: f.write(data))


def fsync_directory(path: Path) -> None:
    """Make a rename in directory `path` survive a power cut (where the platform allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # (some file systems cannot fsync a directory)
    finally:
        os.close(fd)
