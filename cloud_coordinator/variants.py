"""The int8 variant of a version, and which file devices serve.

Every version gets ``model.int8.onnx``: ``model.onnx`` with its weights quantised to int8
by onnxruntime's dynamic quantisation (activations are quantised per batch at run time).
Both are scored on the server's holdout; devices are told to serve the int8 file
(``serving_file``) when it scores within `MAX_DROP_POINTS` of fp32, and fp32 otherwise.
The manifest's ``variants`` records both accuracies, the choice and why, so the choice is
signed with the rest of the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cloud_coordinator.bundles import Bundle, evaluate, file_entries
from protocols.model_format import MODEL_FILE

INT8_FILE = "model.int8.onnx"
MAX_DROP_POINTS = 1.0


def quantise_int8(model_onnx: bytes) -> bytes:
    """`model_onnx` with int8 weights (onnxruntime dynamic quantisation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises pre-processing on the root logger, every call
    try:
        with tempfile.TemporaryDirectory(prefix="fedge-quant-") as tmp:
            source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            source.write_bytes(model_onnx)
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
            return target.read_bytes()
    finally:
        root.setLevel(level)


def choose_serving(
    bundle: Bundle,
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.integer],
    fp32_accuracy: float,
    *,
    enabled: bool = True,
) -> Bundle:
    """`bundle` with an int8 variant added and the serving file chosen (fp32 only, and no
    variant, when not `enabled`); the manifest is left unsigned."""
    files = {k: v for k, v in bundle.files.items() if k != INT8_FILE}
    if not enabled:
        manifest = dataclasses.replace(
            bundle.manifest, files=file_entries(files), serving_file="", variants={},
            signature=b"",
        )  # fmt: skip
        return Bundle(files, manifest)
    files[INT8_FILE] = quantise_int8(files[MODEL_FILE])
    int8_accuracy, _ = evaluate(files[INT8_FILE], x, y)
    drop = 100.0 * (fp32_accuracy - int8_accuracy)
    chosen = "int8" if drop <= MAX_DROP_POINTS else "fp32"
    reason = (
        f"int8 holdout accuracy {int8_accuracy:.4f} is {drop:.2f} points from fp32"
        f" {fp32_accuracy:.4f} ({'within' if chosen == 'int8' else 'more than'}"
        f" {MAX_DROP_POINTS:g})"
    )
    manifest = dataclasses.replace(
        bundle.manifest,
        files=file_entries(files),
        serving_file=INT8_FILE if chosen == "int8" else MODEL_FILE,
        variants={
            "chosen": chosen,
            "reason": reason,
            "fp32_accuracy": fp32_accuracy,
            "int8_accuracy": int8_accuracy,
            "fp32_bytes": len(files[MODEL_FILE]),
            "int8_bytes": len(files[INT8_FILE]),
        },
        signature=b"",
    )
    return Bundle(files, manifest)
