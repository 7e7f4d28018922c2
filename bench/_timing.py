"""Shared timing helpers: interleaved trials and medians, so a noisy machine hurts both sides."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], trials: int, inner: int = 1
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in alternating trials."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm up: first-touch page faults, caches, lazy imports
    for _ in range(trials):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's final JSON line."""
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()
