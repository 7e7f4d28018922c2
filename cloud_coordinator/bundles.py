"""Model bundles: export the first version, derive later ones without re-exporting, evaluate.

A bundle holds ``backbone.onnx`` (absent when the cut is at the input), ``head.tensors``
and ``model.onnx`` (backbone and head fused; input ``input``, output ``logits``, dynamic
batch), described by a `ModelManifest` that lists every file's sha256 and size.

`initial_bundle` exports with ``torch.onnx.export(dynamo=True)`` (the maintained exporter;
the TorchScript one is deprecated and warns). The exporter's warnings and log lines are
swallowed, so call it from one thread at a time. `next_bundle` only rewrites the head's
initializers inside ``model.onnx`` with the ``onnx`` package, storing each weight the way
the graph consumes it (as-is for ``Gemm`` with ``transB=1``, transposed for ``MatMul``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from cloud_coordinator.templates import FusedModel, Template

if TYPE_CHECKING:  # (`onnx` is imported where used: it costs a coordinator start 0.8 s)
    import onnx
from protocols.chunks import PIECE_SIZE, piece_digests
from protocols.messages import FileEntry, ModelManifest, TensorSpec
from protocols.model_format import (
    BACKBONE_FILE,
    HEAD_FILE,
    MODEL_FILE,
    head_shapes,
    pack_tensors,
    unpack_tensors,
)

OPSET = 18  # onnxruntime >= 1.14 runs it
INPUT_NAME = "input"
FEATURES_NAME = "features"
LOGITS_NAME = "logits"
HEAD_PREFIX = "head."
_EXAMPLE_BATCH = 2  # a batch of 1 would be specialised away by torch.export

HeadState = dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class Bundle:
    """One model version: file bytes by name, and the manifest that lists them."""

    files: dict[str, bytes]
    manifest: ModelManifest

    def head_state(self) -> HeadState:
        """The head's parameters, decoded from ``head.tensors``."""
        return {
            k: np.asarray(v, np.float32) for k, v in unpack_tensors(self.files[HEAD_FILE]).items()
        }


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def file_entries(files: Mapping[str, bytes]) -> tuple[FileEntry, ...]:
    """Manifest entries (name, sha256, size, piece digests) of `files`, sorted by name."""
    return tuple(
        FileEntry(
            name,
            sha256_hex(files[name]),
            len(files[name]),
            PIECE_SIZE,
            piece_digests(files[name], PIECE_SIZE),
        )
        for name in sorted(files)
    )


def build_manifest(
    template: Template,
    model_name: str,
    version: str,
    files: Mapping[str, bytes],
    created: float,
    parent_version: str | None = None,
) -> ModelManifest:
    """The manifest of a bundle of `template` holding `files`."""
    return ModelManifest(
        name=model_name,
        version=version,
        created=created,
        files=file_entries(files),
        inputs=(TensorSpec(INPUT_NAME, "float32", (-1, *template.input_shape)),),
        outputs=(TensorSpec(LOGITS_NAME, "float32", (-1, template.num_classes)),),
        parent_version=parent_version,
        labels=template.labels,
        preprocessing=dict(template.preprocessing),
        head_layers=template.head_layers,
    )


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporter's warnings and log lines from reaching the caller."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def export_onnx(module: torch.nn.Module, input_shape: tuple[int, ...], output_name: str) -> bytes:
    """``module`` as ONNX bytes: input ``input`` with a dynamic batch, one named output."""
    example = torch.zeros((_EXAMPLE_BATCH, *input_shape), dtype=torch.float32)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=OPSET,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    data: bytes = program.model_proto.SerializeToString()
    return data


def _transposed(graph: onnx.GraphProto, name: str) -> bool:
    """Whether the graph stores parameter `name` transposed with respect to torch."""
    users = [(node, list(node.input).index(name)) for node in graph.node if name in node.input]
    if len(users) != 1:
        raise ValueError(f"head parameter {name!r} has {len(users)} consumers in model.onnx")
    node, slot = users[0]
    if name.endswith(".bias"):
        if (node.op_type, slot) in (("Gemm", 2), ("Add", 0), ("Add", 1)):
            return False
    elif node.op_type == "Gemm" and slot == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return trans_b == 0
    elif node.op_type == "MatMul" and slot == 1:
        return True
    elif node.op_type == "Transpose":
        return False
    raise ValueError(f"head parameter {name!r} feeds {node.op_type} input {slot}; cannot place it")


def _write_head(model: onnx.ModelProto, head_state: Mapping[str, npt.NDArray[np.floating]]) -> None:
    """Overwrite the head's initializers of `model` in place with `head_state`."""
    from onnx import numpy_helper

    by_name = {init.name: init for init in model.graph.initializer}
    for key, value in head_state.items():
        name = HEAD_PREFIX + key
        if name not in by_name:
            raise ValueError(f"model.onnx has no initializer {name!r}")
        array = np.asarray(value, dtype=np.float32)
        if _transposed(model.graph, name):
            array = array.T
        if tuple(by_name[name].dims) != array.shape:
            raise ValueError(
                f"{name}: model.onnx holds {tuple(by_name[name].dims)}, got {array.shape}"
            )
        by_name[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def read_head(model_onnx: bytes, keys: tuple[str, ...]) -> HeadState:
    """The head parameters `keys` as stored in `model_onnx`, in torch layout."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_onnx)
    by_name = {init.name: init for init in model.graph.initializer}
    out: HeadState = {}
    for key in keys:
        array = np.asarray(numpy_helper.to_array(by_name[HEAD_PREFIX + key]), np.float32)
        out[key] = array.T if _transposed(model.graph, HEAD_PREFIX + key) else array
    return out


def _as_float32(head_state: Mapping[str, npt.NDArray[np.floating]]) -> HeadState:
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in head_state.items()}


def initial_bundle(
    template: Template,
    model_name: str,
    version: str,
    seed: int,
    *,
    backbone: torch.nn.Module | None = None,
    head_state: Mapping[str, npt.NDArray[np.floating]] | None = None,
    created: float | None = None,
) -> tuple[Bundle, HeadState]:
    """Export the first version of `template` and return it with its head's parameters.

    `backbone` is the fitted, frozen backbone, required when the template has one (see
    ``cloud_coordinator.baseline.server_backbone``); `head_state` is where the head starts
    (default: ``template.build_head(seed)``).
    """
    if (backbone is None) != (template.backbone == "none"):
        raise ValueError(
            f"template {template.name} has backbone {template.backbone!r}; pass a fitted one "
            "(cloud_coordinator.baseline.server_backbone)"
            if backbone is None
            else f"template {template.name} is cut at the input; it takes no backbone"
        )
    head = template.build_head(seed)
    if head_state is not None:
        head.load_state_dict(
            {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in head_state.items()}
        )
    state = _as_float32({k: v.detach().numpy() for k, v in head.state_dict().items()})
    if {k: v.shape for k, v in state.items()} != head_shapes(template.head_layers):
        raise ValueError("the head's parameters do not match the template's layers")
    files: dict[str, bytes] = {}
    if backbone is not None:
        files[BACKBONE_FILE] = export_onnx(backbone, template.input_shape, FEATURES_NAME)
    files[MODEL_FILE] = export_onnx(FusedModel(backbone, head), template.input_shape, LOGITS_NAME)
    stored = read_head(files[MODEL_FILE], tuple(state))
    if any(not np.array_equal(stored[k], v) for k, v in state.items()):
        raise RuntimeError("the exporter did not keep the head's parameters as they are")
    files[HEAD_FILE] = pack_tensors(state)
    when = time.time() if created is None else created
    manifest = build_manifest(template, model_name, version, files, when)
    return Bundle(files, manifest), state


def next_bundle(
    previous: Bundle,
    head_state: Mapping[str, npt.NDArray[np.floating]],
    version: str,
    parent_version: str | None = None,
    *,
    created: float | None = None,
) -> Bundle:
    """A new version of `previous` with the head set to `head_state`; no re-export.

    ``backbone.onnx`` is reused as is; `parent_version` defaults to the previous version.
    """
    state = _as_float32(head_state)
    expected = {k: v.shape for k, v in previous.head_state().items()}
    if {k: v.shape for k, v in state.items()} != expected:
        raise ValueError(f"head state {list(state)} does not match the previous head {expected}")
    import onnx

    model = onnx.load_from_string(previous.files[MODEL_FILE])
    _write_head(model, state)
    files = dict(previous.files)
    files[MODEL_FILE] = model.SerializeToString()
    files[HEAD_FILE] = pack_tensors({k: state[k] for k in expected})
    manifest = dataclasses.replace(
        previous.manifest,
        version=version,
        created=time.time() if created is None else created,
        files=file_entries(files),
        parent_version=previous.manifest.version if parent_version is None else parent_version,
        signature=b"",
    )
    return Bundle(files, manifest)


def session(model_onnx: bytes) -> ort.InferenceSession:
    """A single-threaded CPU onnxruntime session for `model_onnx`."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model_onnx, options, providers=["CPUExecutionProvider"])


#: What onnxruntime raises when a session refuses an input (wrong shape, dtype or rank).
ORT_RUN_ERRORS: tuple[type[Exception], ...] = (
    ort.capi.onnxruntime_pybind11_state.Fail,
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,
    ort.capi.onnxruntime_pybind11_state.RuntimeException,
    RuntimeError,
    ValueError,
    TypeError,
)


def run_logits(runner: ort.InferenceSession, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """One batch's logits from an open session; ValueError if onnxruntime refuses `x`."""
    try:
        return np.asarray(runner.run([LOGITS_NAME], {INPUT_NAME: x})[0], np.float32)
    except ORT_RUN_ERRORS as exc:
        raise ValueError(f"the model refused input {x.shape} {x.dtype}: {exc}") from None


def logits(
    model_onnx: bytes, x: npt.NDArray[np.floating], batch_size: int = 1024
) -> npt.NDArray[np.float32]:
    """The model's logits for inputs `x`, computed in batches with onnxruntime."""
    runner = session(model_onnx)
    data = np.ascontiguousarray(x, dtype=np.float32)
    parts = [
        np.asarray(runner.run([LOGITS_NAME], {INPUT_NAME: data[i : i + batch_size]})[0], np.float32)
        for i in range(0, len(data), batch_size)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def evaluate(
    model_onnx: bytes, x: npt.NDArray[np.floating], y: npt.NDArray[np.integer]
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of `model_onnx` on labelled samples `x`, `y`."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError("evaluate needs as many labels as inputs, and at least one")
    scores = logits(model_onnx, x).astype(np.float64)
    labels = np.asarray(y, dtype=np.int64)
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    accuracy = float((scores.argmax(axis=1) == labels).mean())
    return accuracy, loss
