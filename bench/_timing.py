"""Shared timing helpers: interleaved trials and medians, so a noisy machine hurts both sides."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], trials: int, inner: int = 1, settle: bool = False
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in alternating trials.

    With `settle`, each timed call comes right after an untimed call of the same candidate,
    so it starts from the caches its own last run left (as in a loop of it alone), not from
    what the candidate before it left: after one that streams megabytes through the caches,
    the next would start cold and the one after it warm, whichever they are.
    """
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm up: first-touch page faults, caches, lazy imports
    for _ in range(trials):
        for name, fn in candidates.items():
            if settle:
                fn()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's final JSON line."""
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()
