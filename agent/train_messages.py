"""The messages between the agent daemon and its training child: requests and results.

One msgpack map each (`protocols.wire`), arrays as `WireTensor` maps (`protocols.tensors`);
never pickle. No torch here: the daemon encodes requests and decodes results with it, and
`agent.train_worker` (the child) the other way round.

Request keys: ``features`` (N x F float32), ``labels`` (N ints), ``layers`` (LayerSpecs);
optional ``head`` (name -> array; absent: a fresh head seeded by ``seed``), ``val_features``
and ``val_labels``, and the hyper-parameters of `DEFAULTS`. Result keys: ``head`` (name ->
float32 array) and ``metrics`` (see `agent.train_worker.train_head`).

    AgentError (agent.errors)
    └── TrainingError   a bad request, or training failed (agent.trainer adds subclasses)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import AgentError
from protocols import schema, wire
from protocols.errors import ProtocolError
from protocols.model_format import LayerSpec
from protocols.tensors import WireTensor, decode_tensor, encode_dense

#: Hyper-parameters and their defaults: plain SGD with momentum, tuned for FedAvg on
#: sklearn digits with the 64-512-256-10 MLP (see the tests and the report).
DEFAULTS: dict[str, float | int | None] = {
    "lr": 0.05,
    "epochs": 2,
    "batch_size": 16,
    "max_seconds": None,  # wall-time bound, checked between batches; None = none
    "prox_mu": 0.0,  # FedProx proximal weight; 0 = plain FedAvg
    "momentum": 0.9,
    "weight_decay": 0.0,
    "seed": 0,
    "threads": None,  # torch.set_num_threads; None = leave as is
}
MESSAGE_VERSION = 1
MAX_MESSAGE_BYTES = (1 << 31) - 1
_LABEL_LIMIT = 1 << 24  # labels travel as f32, exact below this


class TrainingError(AgentError):
    """A training request is invalid, or training failed."""


_ARRAY_KEYS = ("features", "labels", "val_features", "val_labels")
_HEAD_PREFIX = "head/"


def _tensor_maps(arrays: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [schema.to_map(encode_dense(name, array)) for name, array in arrays.items()]


def _labels_as_f32(name: str, labels: Any) -> npt.NDArray[np.float32]:
    y = np.asarray(labels)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= _LABEL_LIMIT):
        raise TrainingError(f"{name} must lie in 0..{_LABEL_LIMIT - 1}")
    return y.astype(np.float32)


def encode_message(op: str, message: Mapping[str, Any]) -> bytes:
    """One request or result dict as msgpack bytes (arrays as WireTensor maps, no pickle)."""
    arrays: dict[str, Any] = {}
    for key in _ARRAY_KEYS:
        if message.get(key) is not None:
            value = message[key]
            arrays[key] = _labels_as_f32(key, value) if key.endswith("labels") else value
    for name, array in (message.get("head") or {}).items():
        arrays[_HEAD_PREFIX + name] = array
    params = {k: message[k] for k in DEFAULTS if k in message}
    fields: dict[str, Any] = {"v": MESSAGE_VERSION, "op": op, "tensors": _tensor_maps(arrays)}
    if message.get("layers") is not None:
        fields["layers"] = [schema.to_map(layer) for layer in message["layers"]]
    fields["params"] = params
    if message.get("metrics") is not None:
        fields["metrics"] = dict(message["metrics"])
    if message.get("error") is not None:
        fields["error"] = str(message["error"])
    try:
        return wire.pack_map(fields)
    except ProtocolError as exc:
        raise TrainingError(f"cannot encode the {op} message: {exc}") from exc


def _as_map(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise TrainingError(f"expected a map, got {type(item).__name__}")
    return item


def decode_message(data: bytes | memoryview) -> tuple[str, dict[str, Any]]:
    """The op and the dict of a message made by `encode_message`; TrainingError if malformed."""
    try:
        fields = wire.unpack_map(data, MAX_MESSAGE_BYTES)
        if fields.get("v") != MESSAGE_VERSION or not isinstance(fields.get("op"), str):
            raise TrainingError(f"not a training message of version {MESSAGE_VERSION}")
        out: dict[str, Any] = dict(fields.get("params") or {})
        head: dict[str, npt.NDArray[np.floating]] = {}
        for item in fields.get("tensors") or ():
            tensor = schema.from_map(WireTensor, _as_map(item), "tensors")
            array = decode_tensor(tensor)
            if tensor.name.startswith(_HEAD_PREFIX):
                head[tensor.name.removeprefix(_HEAD_PREFIX)] = array
            elif tensor.name in _ARRAY_KEYS:
                labels = tensor.name.endswith("labels")
                out[tensor.name] = array.astype(np.int64) if labels else array
        if head:
            out["head"] = head
        if "layers" in fields:
            layers = fields["layers"]
            out["layers"] = tuple(schema.from_map(LayerSpec, _as_map(m), "layers") for m in layers)
        for key in ("metrics", "error"):
            if key in fields:
                out[key] = fields[key]
    except (ProtocolError, TypeError, AttributeError) as exc:
        raise TrainingError(f"malformed training message: {exc}") from exc
    return fields["op"], out


__all__ = [
    "DEFAULTS",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_VERSION",
    "TrainingError",
    "decode_message",
    "encode_message",
]
