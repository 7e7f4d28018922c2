"""Tensor codec throughput: encode + decode of float32 tensors vs. a plain copy of the bytes.

``ratio_Nmb`` = (time of one plain copy of the tensor's bytes) / (time to encode the tensor
into a wire payload and decode it back to an array), both measured here, interleaved, as
medians. 1.0 means the codec costs exactly one memory copy. ``message_ratio_Nmb`` is the
same for a whole `ModelUpdate` message carrying the tensor (schema checks included).

Run: ``python -m bench.codec [--trials N]``.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from bench._timing import emit, interleaved_medians
from protocols import schema, wire
from protocols.messages import ModelUpdate, decode_as, encode
from protocols.tensors import WireTensor, decode_tensor, encode_dense

SIZES_MB = (4, 40)


def _tensor_roundtrip(array: np.ndarray[Any, Any], cap: int) -> np.ndarray[Any, Any]:
    payload = wire.pack_map(schema.to_map(encode_dense("w", array)))
    return decode_tensor(schema.from_map(WireTensor, wire.unpack_map(payload, cap)))


def _message_roundtrip(array: np.ndarray[Any, Any], cap: int) -> np.ndarray[Any, Any]:
    update = ModelUpdate("dev-1", "job-1", 3, "v7", 0, 100, (encode_dense("w", array),))
    decoded = decode_as(ModelUpdate, encode(update), cap)
    return decode_tensor(decoded.tensors[0])


def measure(size_mb: int, trials: int) -> dict[str, float]:
    """Median seconds of copy, tensor round trip and message round trip for one size."""
    rng = np.random.default_rng(0)
    array = rng.standard_normal(size_mb * 1024 * 1024 // 4, dtype=np.float32)
    view = array.data.cast("B")
    cap = array.nbytes + 4096
    if not np.array_equal(_tensor_roundtrip(array, cap), array):
        raise SystemExit("codec round trip changed the data")
    medians = interleaved_medians(
        {
            "copy": lambda: bytes(view),
            "tensor": lambda: _tensor_roundtrip(array, cap),
            "message": lambda: _message_roundtrip(array, cap),
        },
        trials=trials,
        settle=True,
    )
    return medians


def main() -> None:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="timed trials per size (4 MB)")
    args = parser.parse_args()
    result: dict[str, Any] = {"bench": "codec"}
    for size in SIZES_MB:
        trials = max(10, args.trials * 4 // size)
        m = measure(size, trials)
        gbps = size * 1024 * 1024 / 1e9
        print(
            f"{size:>3} MB: copy {m['copy'] * 1e6:8.1f} us,"
            f" tensor enc+dec {m['tensor'] * 1e6:8.1f} us,"
            f" message enc+dec {m['message'] * 1e6:8.1f} us"
            f" ({gbps / m['tensor']:.1f} GB/s)"
        )
        result[f"copy_us_{size}mb"] = round(m["copy"] * 1e6, 1)
        result[f"codec_us_{size}mb"] = round(m["tensor"] * 1e6, 1)
        result[f"ratio_{size}mb"] = round(m["copy"] / m["tensor"], 3)
        result[f"message_ratio_{size}mb"] = round(m["copy"] / m["message"], 3)
    emit(result)


if __name__ == "__main__":
    main()
