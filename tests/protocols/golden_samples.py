"""One deterministic sample message per kind, and the checked-in golden bytes they encode to.

Regenerate the files (only together with a version change of the kind whose bytes change):
``python -m tests.protocols.golden_samples --write``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from protocols import messages
from protocols.messages import (
    Ack,
    BlobChunk,
    BlobRequest,
    Command,
    Deployment,
    FileEntry,
    InferenceRequest,
    InferenceResponse,
    Message,
    ModelManifest,
    ModelUpdate,
    Status,
    Telemetry,
    TensorSpec,
    TrainTask,
)
from protocols.model_format import LayerSpec
from protocols.tensors import encode_dense, encode_sparse

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"

_SHA_A = "0123456789abcdef" * 4
_SHA_B = "fedcba9876543210" * 4


def _tensors() -> tuple[Any, ...]:
    weights = np.arange(12, dtype=np.float32).reshape(3, 4) / 8 - 0.5
    return (
        encode_dense("head.weight", weights),
        encode_dense("head.bias", np.array([0.25, -1.5, 3.0], dtype=np.float32), "f16"),
        encode_dense("head.scale", np.array([1.0, -2.0, 0.5, 1e-3], dtype=np.float32), "bf16"),
        encode_dense("head.q", np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3), "i8"),
        encode_sparse(
            "embed.weight",
            (4096, 1024),
            [0, 1, 130, (1 << 21) + 131, 4096 * 1024 - 1],
            [0.5, -0.25, 1.0, -1.0, 0.125],
            "i8",
        ),
    )


def samples() -> dict[str, Message]:
    """One sample of every message kind, keyed by kind; equal on every call."""
    tensors = _tensors()
    found: list[Message] = [
        Status("cam-01", messages.ONLINE, 1_700_000_000.5, "0.1.0", "", "lab-2"),
        Telemetry(
            "cam-01",
            1_700_000_001.25,
            42,
            3600.0,
            12.5,
            61_000_000,
            1_500_000_000,
            0.75,
            3,
            "0.1.0",
            {"detector": "v7", "keyword": "v2"},
            {"temp_c": 51.5, "latency_ms": 8.0},
        ),
        Command("cmd-7", "set_config", 1_700_000_002.0, {"a": "x", "b": 2, "c": 0.5, "d": True}),
        Ack("cmd-7", False, 1_700_000_003.0, "busy", True),
        ModelManifest(
            "detector",
            "v7",
            1_700_000_004.0,
            (
                FileEntry("backbone.onnx", _SHA_A, 1_234_567),
                FileEntry("head.bin", _SHA_B, 0, 65_536, bytes(range(32))),  # one piece
            ),
            (TensorSpec("image", "f32", (-1, 3, 224, 224)),),
            (TensorSpec("logits", "f32", (-1, 10)), TensorSpec("embedding", "f16", (-1, 64))),
            "v6",
            ("cat", "dog", "ünïcödé"),
            {"mean": 0.5, "std": 0.25, "size": 224, "rgb": True, "layout": "NCHW"},
            bytes(range(64)),
            (LayerSpec("linear", 64, 32), LayerSpec("relu"), LayerSpec("linear", 32, 10)),
            bytes(range(100, 132)),
            "model.int8.onnx",
            {"chosen": "int8", "fp32_accuracy": 0.975, "int8_accuracy": 0.9722},
        ),
        TrainTask(
            "task-3",
            "job-1",
            3,
            "detector",
            "v7",
            1_700_000_600.0,
            "i8",
            {"lr": 0.01, "epochs": 2, "optimizer": "sgd", "nesterov": False},
        ),
        ModelUpdate("cam-01", "job-1", 3, "v7", 2, 640, tensors, {"loss": 0.42, "acc": 0.9}),
        # 5000 bytes: large enough to be spliced into the payload as a big binary.
        BlobChunk(_SHA_A, 1, 3, 12_000, 5000, bytes(i % 251 for i in range(5000))),
        BlobRequest("cam-01", _SHA_B, (0, 2, 7), "req-8"),
        InferenceRequest("req-9", "detector", tensors[:2], "fedge/v1/dev/cam-01/infer/resp", 5.5),
        InferenceResponse("req-9", "v7", (tensors[0],), ""),
    ]
    manifest = next(m for m in found if isinstance(m, ModelManifest))
    found.append(
        Deployment("cam-01", 12, 1_700_000_005.5, manifest, bytes(range(100, 132)), bytes(64))
    )
    return {type(m).KIND: m for m in found}


def golden_path(kind: str) -> Path:
    """Where the golden bytes of `kind` are checked in."""
    return GOLDEN_DIR / f"{kind}.msgpack"


def same(a: Any, b: Any) -> bool:
    """Whether two decoded values are equal as `plain` values, NaN equal to NaN (decoders
    must agree on a NaN a mutated payload holds, which == never says)."""
    left, right = plain(a), plain(b)
    return bool(left == right) or repr(left) == repr(right)


def plain(value: Any) -> Any:
    """`value` with dataclasses as (type, fields) and every binary as bytes, for comparisons."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value).__name__,
            {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)},
        )
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if type(value) in (tuple, list):  # not ExtType, a namedtuple
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def write() -> None:
    """Rewrite every golden file from `samples`."""
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for kind, message in samples().items():
        golden_path(kind).write_bytes(messages.encode(message))


def main() -> None:
    """Regenerate the golden files (``--write``) or list what they would hold."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite tests/golden/*.msgpack")
    args = parser.parse_args()
    if args.write:
        write()
    for kind, message in samples().items():
        print(f"{kind:>11}: {len(messages.encode(message)):6} bytes -> {golden_path(kind)}")


if __name__ == "__main__":
    main()
