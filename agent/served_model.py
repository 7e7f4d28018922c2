"""A loaded model version as the runtime serves it, and the check of its input schema.

`ServedModel` precomputes what every prediction needs (dtype, shape, preprocessing) and
holds each thread's bound runs; `check_schema` refuses a session whose one input does not
match its manifest. torch is never imported here.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import InferenceError
from agent.onnx_runtime import OnnxModel
from protocols.messages import ModelManifest

_multiply = np.multiply
_add = np.add
_SCHEMA_DTYPES = {"float32": "float32", "float": "float32", "float16": "float16",
                  "float64": "float64", "int64": "int64", "int32": "int32",
                  "int8": "int8", "uint8": "uint8"}  # fmt: skip


class ServedModel:
    """One loaded, warmed-up model version, with what a prediction needs precomputed."""

    __slots__ = ("answers", "batch_tail", "bindable", "input_dtype", "labels", "loaded_at",
                 "local", "manifest", "model", "name", "offset", "offset_value", "rank", "scale",
                 "scale_only", "scale_value", "version")  # fmt: skip

    def __init__(
        self, manifest: ModelManifest, model: OnnxModel, answers: tuple[str, ...] = ()
    ) -> None:
        self.manifest = manifest
        self.model = model
        self.answers = answers  # the session's `ANSWER_OUTPUTS`, when it has them
        self.name = manifest.name
        self.version = manifest.version
        self.labels = tuple(manifest.labels)
        self.rank = len(model.input_shape)
        self.input_dtype = model.input_dtype
        shape = model.input_shape
        # the input's shape after the batch dimension, when only the batch is symbolic: an
        # array of the input's dtype with exactly these trailing dimensions needs no check
        fixed = len(shape) > 1 and shape[0] is None and None not in shape[1:]
        self.batch_tail: tuple[int | None, ...] | None = shape[1:] if fixed else None
        pre = manifest.preprocessing
        self.scale = float(pre.get("scale", 1.0) or 1.0)
        self.offset = float(pre.get("offset", 0.0) or 0.0)
        # as a 0-d array of a float input's own type: the product stays in that type, exactly
        # as with numpy's weakly typed Python float, and a ufunc given arrays only (its `out`
        # positional) skips the scalar's conversion and most of its argument parsing per call
        kind = self.input_dtype.kind
        dtype = self.input_dtype
        self.scale_value: Any = np.array(self.scale, dtype) if kind == "f" else self.scale
        self.offset_value: Any = np.array(self.offset, dtype) if kind == "f" else self.offset
        #: preprocessing is one multiplication (`prepare_into`'s common case, inlined by callers)
        self.scale_only = self.scale != 1.0 and self.offset == 0.0
        # preprocessing writes into a bound input of the input's dtype: only float inputs
        # (an integer input with a scale keeps numpy's promotion, and its error, as before)
        self.bindable = kind == "f" or (self.scale == 1.0 and self.offset == 0.0)
        self.local = threading.local()  # per thread: runs (rows → run), answering (shape → run)
        self.loaded_at = time.time()

    def prepare_into(self, batch: npt.NDArray[Any], out: npt.NDArray[Any]) -> None:
        """Write ``batch * scale + offset`` (the manifest's preprocessing) into `out`."""
        if self.scale != 1.0:
            _multiply(batch, self.scale_value, out)
        else:
            np.copyto(out, batch)
        if self.offset != 0.0:
            _add(out, self.offset_value, out)

    def describe(self) -> dict[str, Any]:
        """Name, version, input schema, labels, providers (JSON-ready)."""
        m = self.manifest
        return {
            "name": m.name,
            "version": m.version,
            "parent_version": m.parent_version,
            "inputs": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in m.inputs
            ],
            "labels": list(m.labels),
            "preprocessing": dict(m.preprocessing),
            "providers": self.model.providers,
            "loaded_at": self.loaded_at,
        }


def check_schema(manifest: ModelManifest, model: OnnxModel) -> None:
    """InferenceError unless the session's one input matches the manifest's input spec."""
    if len(manifest.inputs) != 1:
        raise InferenceError(f"manifest declares {len(manifest.inputs)} inputs; one is served")
    spec = manifest.inputs[0]
    shape = tuple(None if d < 0 else d for d in spec.shape)
    dtype = _SCHEMA_DTYPES.get(spec.dtype)
    if spec.name != model.input_name or dtype != str(model.input_dtype):
        raise InferenceError(
            f"model input is {model.input_name!r} {model.input_dtype}, the manifest says "
            f"{spec.name!r} {spec.dtype}"
        )
    if len(shape) != len(model.input_shape) or any(
        a is not None and b is not None and a != b
        for a, b in zip(shape, model.input_shape, strict=True)
    ):
        raise InferenceError(f"model input shape {model.input_shape} ≠ manifest's {spec.shape}")
