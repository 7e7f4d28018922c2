"""Freed heap back to the system after a model load: glibc's ``malloc_trim``, via ctypes.

Loading a model (reading its bytes, building the session, warming it up) frees megabytes
of short-lived allocations. glibc keeps freed heap for reuse and returns only what lies at
the top of the heap, so a resident agent would go on holding most of it. `release_free_heap`
asks glibc to give back every whole free page (``malloc_trim(0)``: about 1 MB after the
first digits model). Elsewhere (musl, macOS) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

__all__ = ["release_free_heap", "trim_available"]


def _find_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own libc
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _find_trim()


def trim_available() -> bool:
    """True when this process's libc can return free heap (glibc)."""
    return _TRIM is not None


def release_free_heap() -> bool:
    """Return free heap pages to the system; True if any were returned (False off glibc)."""
    return bool(_TRIM(0)) if _TRIM is not None else False
