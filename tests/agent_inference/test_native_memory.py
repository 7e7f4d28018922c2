"""`agent.native_memory`: freed heap goes back to the system after a model load (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent import native_memory

_GLIBC = sys.platform.startswith("linux") and native_memory.trim_available()


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(not _GLIBC, reason="needs glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_system() -> None:
    # In a fresh interpreter: many small blocks (heap, not mmap) are filled, then all but the
    # last freed. The last one pins the heap's top, so glibc's own trimming cannot return the
    # rest; release_free_heap must.
    code = """
import sys
from agent import native_memory
from tests.agent_inference.test_native_memory import _rss_kb
blocks = [bytearray(b"x" * 60_000) for _ in range(1500)]  # about 90 MB
pin = blocks[-1]
del blocks
before = _rss_kb()
released = native_memory.release_free_heap()
after = _rss_kb()
print(released, before, after)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    released, before, after = out.stdout.split()
    assert released == "True"
    assert int(before) - int(after) > 50_000, out.stdout  # most of the 90 MB, in KiB


def test_it_says_when_nothing_can_be_released() -> None:
    assert isinstance(native_memory.release_free_heap(), bool)
    if not _GLIBC:
        assert native_memory.release_free_heap() is False
