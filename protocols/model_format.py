"""What a model bundle holds, in terms both sides share without torch.

A bundle is ``backbone.onnx`` (frozen feature extractor; absent when the cut is at the
input), ``head.tensors`` (the trainable head's parameters), ``model.onnx`` (backbone and
head fused, for inference) and a signed `ModelManifest`. The head is a plain stack of
layers (`LayerSpec`), so an agent can rebuild it for training from the manifest alone;
its parameters are named ``"<layer index>.weight"`` / ``"<layer index>.bias"``, exactly as
``torch.nn.Sequential`` names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocols import schema, wire
from protocols.errors import DecodeError
from protocols.tensors import WireTensor, decode_tensor, encode_dense

BACKBONE_FILE = "backbone.onnx"
HEAD_FILE = "head.tensors"
MODEL_FILE = "model.onnx"
LAYER_KINDS = ("linear", "relu")
_TENSORS_KIND = "tensors"
_TENSORS_VERSION = 1


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer of a trainable head: ``linear`` (inputs -> outputs) or ``relu``."""

    kind: str
    inputs: int = 0
    outputs: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"layer kind {self.kind!r} is not one of {LAYER_KINDS}")
        if self.kind == "linear" and (self.inputs <= 0 or self.outputs <= 0):
            raise ValueError("a linear layer needs positive inputs and outputs")


def head_shapes(layers: tuple[LayerSpec, ...]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a head, in ``torch.nn.Sequential`` order and naming."""
    shapes: dict[str, tuple[int, ...]] = {}
    width: int | None = None
    for index, layer in enumerate(layers):
        if layer.kind == "linear":
            if width is not None and layer.inputs != width:
                raise ValueError(f"layer {index} takes {layer.inputs} inputs after {width} outputs")
            shapes[f"{index}.weight"] = (layer.outputs, layer.inputs)
            shapes[f"{index}.bias"] = (layer.outputs,)
            width = layer.outputs
    return shapes


def head_parameter_count(layers: tuple[LayerSpec, ...]) -> int:
    """How many trainable numbers the head has."""
    return sum(int(np.prod(shape)) for shape in head_shapes(layers).values())


def pack_tensors(arrays: Mapping[str, npt.NDArray[np.floating]]) -> bytes:
    """Serialize named float32 arrays (a ``head.tensors`` file), in the given order."""
    tensors = [schema.to_map(encode_dense(name, array)) for name, array in arrays.items()]
    return wire.pack_map({"v": _TENSORS_VERSION, "kind": _TENSORS_KIND, "tensors": tensors})


def unpack_tensors(
    data: bytes | memoryview, max_bytes: int = 1 << 30
) -> dict[str, npt.NDArray[np.floating]]:
    """Named arrays from `pack_tensors` output; DecodeError for anything else."""
    fields = wire.unpack_map(data, max_bytes)
    if fields.get("kind") != _TENSORS_KIND:
        raise DecodeError(f"not a tensors file (kind {fields.get('kind')!r})", reason="wrong_kind")
    version = fields.get("v")
    if type(version) is not int or version != _TENSORS_VERSION:  # (True == 1 == 1.0)
        raise DecodeError(
            f"tensors file version {fields.get('v')!r}; this side reads {_TENSORS_VERSION}",
            reason="version",
        )
    items = fields.get("tensors")
    if not isinstance(items, list):
        raise DecodeError("tensors file has no tensor list", reason="bad_field")
    out: dict[str, npt.NDArray[np.floating]] = {}
    for item in items:
        if not isinstance(item, dict):
            raise DecodeError("tensor entry is not a map", reason="bad_field")
        tensor = schema.from_map(WireTensor, item, "tensors")
        out[tensor.name] = decode_tensor(tensor)
    return out


def check_head(
    arrays: Mapping[str, npt.NDArray[np.floating]], layers: tuple[LayerSpec, ...]
) -> None:
    """DecodeError unless `arrays` holds exactly the head's parameters with the right shapes."""
    expected = head_shapes(layers)
    got = {name: tuple(a.shape) for name, a in arrays.items()}
    if got != expected:
        raise DecodeError(
            f"head tensors {got} do not match the layers {expected}", reason="bad_tensor"
        )
