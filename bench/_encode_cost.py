"""bench.compression's encode cost: a top-k encode of a 1M-parameter update vs one pass.

See `bench.compression`'s docstring for what is timed and why from flushed caches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from agent.compression import Compressor
from protocols.messages import ModelUpdate, encode

ENCODE_SHAPE = (1024, 1024)
FLUSH_BYTES = 64 << 20


def _encode_update(
    compressor: Compressor,
    update: Mapping[str, npt.NDArray[np.float32]],
    fraction: float,
    rng: np.random.Generator,
) -> bytes:
    """One device's top-k encode of `update`: compress, then the `ModelUpdate` payload."""
    tensors = compressor.compress(update, "topk", topk_fraction=fraction, rng=rng)
    return encode(ModelUpdate("dev-1", "bench", 1, "v1", 0, 100, tensors))


def interleaved_after(
    candidates: Mapping[str, Callable[[], object]],
    prepare: Callable[[Callable[[], object]], object],
    trials: int,
) -> dict[str, float]:
    """Median seconds of one call of each candidate, alternating, each timed right after
    ``prepare(candidate)`` has set up the cache state it is to start from."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(trials):
        for name, fn in candidates.items():
            prepare(fn)
            begin = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in samples.items()}


def encode_cost(fraction: float, trials: int) -> dict[str, float]:
    """Median seconds of a top-k encode and of an ``np.abs`` pass over a 1M update, each
    starting with the caches flushed (``cold``) and right after a call of its own (``warm``)."""
    rng = np.random.default_rng(0)
    update = {
        "0.weight": rng.standard_normal(ENCODE_SHAPE, dtype=np.float32),
        "0.bias": rng.standard_normal(ENCODE_SHAPE[0], dtype=np.float32),
    }
    out = {name: np.empty_like(a) for name, a in update.items()}
    compressor = Compressor(None, autosave=False)
    flush = np.zeros(FLUSH_BYTES // 8)

    def encode_once() -> bytes:
        return _encode_update(compressor, update, fraction, rng)

    def one_pass() -> None:
        for name, array in update.items():
            np.abs(array, out=out[name])

    def evict(_: object) -> None:
        np.add(flush, 1.0, out=flush)  # rewrites 64 MB: nothing of the candidates stays cached

    def own_call(fn: Callable[[], object]) -> None:
        fn()

    candidates = {"encode": encode_once, "pass": one_pass}
    cold = interleaved_after(candidates, evict, trials)
    warm = interleaved_after(candidates, own_call, trials)
    return {
        "encode_s": cold["encode"],
        "pass_s": cold["pass"],
        "encode_warm_s": warm["encode"],
        "pass_warm_s": warm["pass"],
    }
