"""The agent's one onnxruntime adapter: load a model from bytes, run it on numpy arrays.

Sessions get explicit options (intra- and inter-op thread counts, sequential execution,
no busy-wait spinning), so inference and the training child do not starve each other on a
small device. Execution providers are picked from short names (`choose_providers`): those
this onnxruntime build lacks are reported and skipped, and the CPU provider is always the
last resort. `OnnxModel.check` validates an input batch against the model's input schema
(dtype, rank, fixed dimensions; symbolic dimensions such as the batch take any size >= 1)
before it reaches onnxruntime, and `OnnxModel.run_checked` runs an already checked batch
straight through the session's native call. onnxruntime's exceptions are translated here;
its types do not leave this module.

onnxruntime's own log goes to stderr unformatted (ANSI colours, no priority prefix), so
only its errors are let through, and its telemetry is off: from 1.32, loading it under a
user without a writable home (the service's fedge user) warned that it could not keep a
telemetry id. Load failures are not lost: they are exceptions, which the agent logs; and
a provider that onnxruntime could not start (a GPU it cannot open) is logged here.

    AgentError (agent.errors)
    ├── InferenceError   a model cannot be loaded or run
    └── InputError       an input does not fit the model's input schema
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

# Read by onnxruntime while it loads (the warning comes from its import); "0" re-enables.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from agent.errors import InferenceError, InputError

#: onnxruntime's severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
ORT_LOG_ERRORS_ONLY = 3
ort.set_default_logger_severity(ORT_LOG_ERRORS_ONLY)
if hasattr(ort, "disable_telemetry_events"):  # (not in every build)
    ort.disable_telemetry_events()

__all__ = ["BoundRun", "InferenceError", "InputError", "OnnxModel", "choose_providers"]

log = logging.getLogger(__name__)

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


#: Short provider names accepted in configuration, and onnxruntime's names for them.
PROVIDER_NAMES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
CPU = PROVIDER_NAMES["cpu"]


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers."""
    return list(ort.get_available_providers())


def choose_providers(requested: Sequence[str]) -> tuple[list[str], list[str]]:
    """(providers to use, best first and CPU last; requested ones this build lacks)."""
    names = [PROVIDER_NAMES.get(r.strip().lower(), r.strip()) for r in requested if r.strip()]
    available = set(available_providers())
    chosen = [n for n in dict.fromkeys(names) if n in available]
    missing = [n for n in dict.fromkeys(names) if n not in available]
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen, missing


def session_options(threads: int) -> ort.SessionOptions:
    """Options for a small, predictable session: `threads` intra-op, one inter-op, no spin."""
    if threads < 1:
        raise InferenceError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # errors only: warnings go to our own logs as exceptions
    options.log_severity_level = ORT_LOG_ERRORS_ONLY
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxModel:
    """One loaded ONNX model with a single input; `run` returns its first output."""

    __slots__ = (
        "_native",
        "_options",
        "_outputs",
        "_session",
        "input_dtype",
        "input_name",
        "input_shape",
        "output_name",
    )

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
        self._outputs = [self.output_name]
        # The wrapper's `run` re-checks names and options on every call; the native session
        # (when this onnxruntime has one) does the same work without that Python.
        native = getattr(session, "_sess", None)
        self._native: Any = native if callable(getattr(native, "run", None)) else None
        # Run options made once: given None, the native run builds default ones on every
        # call (about 1 µs of a 12 µs run at batch 1). Only read by a run, so shared.
        self._options = ort.RunOptions()

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        warm_up: bool = True,
    ) -> OnnxModel:
        """Load a serialized model and (`warm_up`) run it once on zeros; InferenceError if bad.

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
        # onnxruntime falls back by itself, warning only in its own log (silenced above)
        failed = [p for p in usable if p not in model.providers]
        if failed:
            log.warning(
                "execution providers %s could not be started (no device it may open, or"
                " missing CUDA/cuDNN/TensorRT libraries); the model runs on %s",
                ", ".join(failed), ", ".join(model.providers),
            )  # fmt: skip
        if warm_up:
            model.warm_up()
        return model

    def warm_up(self, batches: Sequence[int] = (1,)) -> None:
        """Run the model on zeros once per batch size (first-run allocations happen here)."""
        for rows in batches:
            shape = self.warmup_shape()
            if self.input_shape and self.input_shape[0] is None:
                shape = (rows, *shape[1:])
            self.run_checked(np.zeros(shape, dtype=self.input_dtype))

    def warmup_shape(self) -> tuple[int, ...]:
        """The input shape with every symbolic dimension set to 1."""
        return tuple(1 if d is None else d for d in self.input_shape)

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses, best first."""
        return list(self._session.get_providers())

    def check(self, x: object) -> npt.NDArray[Any]:
        """`x` as a contiguous batch of the input's dtype; InputError naming what is wrong."""
        if isinstance(x, np.ndarray):
            batch = x
        else:
            try:
                batch = np.asarray(x)
            except (ValueError, TypeError) as exc:
                raise InputError(
                    f"input {self.input_name!r} is not a numeric array: {exc}"
                ) from exc
        if batch.dtype != self.input_dtype:
            kind = batch.dtype.kind
            if kind not in "biuf" or (kind == "f" and self.input_dtype.kind in "iu"):
                raise InputError(
                    f"input {self.input_name!r} must be {self.input_dtype}, got {batch.dtype}"
                )
            with np.errstate(over="ignore", invalid="ignore"):  # out of range: Inf, refused
                batch = batch.astype(self.input_dtype)  # with its answers (serving.py)
        shape = self.input_shape
        if batch.ndim != len(shape) or any(
            (want is not None and got != want) or got < 1
            for got, want in zip(batch.shape, shape, strict=True)
        ):
            expected = "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
            raise InputError(
                f"input {self.input_name!r} must have shape {expected}, got {batch.shape}"
            )
        if not batch.flags.c_contiguous:
            batch = np.ascontiguousarray(batch)
        return batch

    def run_checked(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The first output for a batch that `check` returned."""
        try:
            if self._native is not None:
                outputs = self._native.run(self._outputs, {self.input_name: batch}, self._options)
            else:
                outputs = self._session.run(self._outputs, {self.input_name: batch})
        except ORT_ERRORS as exc:
            raise InferenceError(
                f"inference failed on input {batch.shape} {batch.dtype}: {exc}"
            ) from exc
        return outputs[0]  # type: ignore[no-any-return]

    def bound(self, rows: int, extra: Sequence[str] = ()) -> BoundRun:
        """A reusable run for batches of `rows` rows (warms that size up); InferenceError.

        `extra` names further outputs to bind besides the first one (`BoundRun.extra`).
        """
        return BoundRun(self, rows, extra)

    def raw_run(self, batch: npt.NDArray[Any]) -> object:
        """onnxruntime's own `InferenceSession.run` on this session (the benchmarks' baseline)."""
        return self._session.run(self._outputs, {self.input_name: batch})

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


class BoundRun:
    """One batch size's run through preallocated arrays (onnxruntime's I/O binding).

    Write the batch into `input`, call, read the first output from `output` and the `extra`
    outputs (flattened) from `extra`. The arrays are reused by every call, so one BoundRun
    serves one thread at a time; it skips the per-call conversion of inputs and outputs
    that `OnnxModel.run_checked` pays.
    """

    __slots__ = ("_binding", "extra", "input", "launch", "output")

    def __init__(self, model: OnnxModel, rows: int, extra: Sequence[str] = ()) -> None:
        shape = (rows, *model.warmup_shape()[1:])
        self.input: npt.NDArray[Any] = np.zeros(shape, dtype=model.input_dtype)
        names = [model.output_name, *extra]
        session = model._session
        binding = session.io_binding()
        try:
            arrays = [
                np.array(a, order="C") for a in session.run(names, {model.input_name: self.input})
            ]
            binding.bind_cpu_input(model.input_name, self.input)
            for name, array in zip(names, arrays, strict=True):
                binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape),
                                    array.ctypes.data)  # fmt: skip
        except ORT_ERRORS as exc:
            raise InferenceError(f"cannot bind a batch of {rows}: {exc}") from exc
        self.output: npt.NDArray[Any] = arrays[0]
        self.extra: tuple[npt.NDArray[Any], ...] = tuple(a.reshape(-1) for a in arrays[1:])
        self._binding = binding  # (kept alive: the native binding refers to it)
        native = model._native
        if native is not None and hasattr(binding, "_iobinding"):
            run, bound = native.run_with_iobinding, binding._iobinding
        else:
            run, bound = session.run_with_iobinding, binding
        #: the run itself, without the Python frame and error translation of a call: raises
        #: one of `ORT_ERRORS` (for a caller on the hot path that translates them itself)
        self.launch: Callable[[], object] = functools.partial(run, bound, model._options)

    def __call__(self) -> None:
        """Run the model on `input`; the first output is in `output` afterwards."""
        try:
            self.launch()
        except ORT_ERRORS as exc:
            raise InferenceError(f"inference failed on input {self.input.shape}: {exc}") from exc
