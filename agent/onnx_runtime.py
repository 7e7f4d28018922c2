"""The agent's one onnxruntime adapter: load a model from bytes, run it on numpy arrays.

Sessions get explicit options (intra- and inter-op thread counts, sequential execution,
no busy-wait spinning), so inference and the training child do not starve each other on a
small device. onnxruntime's exceptions are translated here; its types do not leave this
module.

    AgentError (agent.errors)
    └── InferenceError   a model cannot be loaded or run
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from agent.errors import AgentError

#: Everything onnxruntime raises on a bad model, bad input or failed provider.
ORT_ERRORS: tuple[type[BaseException], ...] = (
    _ort_state.Fail,
    _ort_state.InvalidArgument,
    _ort_state.InvalidGraph,
    _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile,
    _ort_state.NoModel,
    _ort_state.NotImplemented,
    _ort_state.RuntimeException,
    _ort_state.EPFail,
    _ort_state.EngineError,
    RuntimeError,
    ValueError,
    TypeError,
)

_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
}


class InferenceError(AgentError):
    """An ONNX model could not be loaded or run."""


def session_options(threads: int) -> ort.SessionOptions:
    """Options for a small, predictable session: `threads` intra-op, one inter-op, no spin."""
    if threads < 1:
        raise InferenceError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings go to our own logs as exceptions
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxModel:
    """One loaded ONNX model with a single input; `run` returns its first output."""

    __slots__ = ("_session", "input_dtype", "input_name", "input_shape", "output_name")

    def __init__(self, session: ort.InferenceSession) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise InferenceError(f"model has {len(inputs)} inputs; the agent runs one-input models")
        self._session = session
        self.input_name: str = inputs[0].name
        self.input_shape: tuple[int | None, ...] = tuple(
            d if isinstance(d, int) else None for d in inputs[0].shape
        )
        dtype = _DTYPES.get(inputs[0].type)
        if dtype is None:
            raise InferenceError(f"unsupported input type {inputs[0].type} of {self.input_name!r}")
        self.input_dtype: np.dtype[Any] = dtype
        self.output_name: str = session.get_outputs()[0].name

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> OnnxModel:
        """Load a serialized model and run it once on zeros (warm-up); InferenceError if bad.

        `providers` are tried in order; those this onnxruntime build lacks are skipped, and
        InferenceError is raised when none is left.
        """
        options = session_options(threads)
        available = set(ort.get_available_providers())
        usable = [p for p in providers if p in available]
        if not usable:
            raise InferenceError(
                f"none of the providers {list(providers)} is available (have {sorted(available)})"
            )
        try:
            session = ort.InferenceSession(data, sess_options=options, providers=usable)
        except ORT_ERRORS as exc:
            raise InferenceError(f"cannot load ONNX model: {exc}") from exc
        model = cls(session)
        model.run(np.zeros(model.warmup_shape(), dtype=model.input_dtype))
        return model

    def warmup_shape(self) -> tuple[int, ...]:
        """The input shape with every symbolic dimension set to 1."""
        return tuple(1 if d is None else d for d in self.input_shape)

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses, best first."""
        return list(self._session.get_providers())

    def run(self, x: npt.ArrayLike) -> npt.NDArray[Any]:
        """The first output for input batch `x` (cast to the model's input type)."""
        batch = np.ascontiguousarray(x, dtype=self.input_dtype)
        try:
            outputs = self._session.run([self.output_name], {self.input_name: batch})
        except ORT_ERRORS as exc:
            raise InferenceError(
                f"inference failed on input {batch.shape} {batch.dtype}: {exc}"
            ) from exc
        return np.asarray(outputs[0])
