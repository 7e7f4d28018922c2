"""Every wire message of protocol v1, as a frozen dataclass, and its codec.

A payload is one msgpack map whose first keys are ``v`` (the major version of that kind)
and ``kind``; the message's own fields follow. Decoders ignore unknown keys, so a minor
version may add fields (always with defaults); a different major version is rejected by
`VersionError`, naming both versions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeVar

from protocols import schema, wire
from protocols.errors import DecodeError, VersionError
from protocols.field_checks import counts as _counts
from protocols.field_checks import finite as _finite
from protocols.field_checks import ids as _ids
from protocols.field_checks import sha256 as _sha256
from protocols.model_format import LayerSpec
from protocols.schema import Binary, Scalar, fast_constructor, omit_defaults
from protocols.tensors import WireTensor

ONLINE = "online"
OFFLINE = "offline"


#: Bytes of one piece digest in a `FileEntry` (a sha256).
PIECE_DIGEST_BYTES = 32


@fast_constructor
@dataclass(frozen=True, slots=True)
class Status:
    """Retained presence of a device: ``online`` on connect, ``offline`` on exit or as Will."""

    KIND: ClassVar[str] = "status"
    VERSION: ClassVar[int] = 1
    device_id: str
    state: str
    ts: float
    agent_version: str = ""
    reason: str = ""
    fleet: str = ""  # the device's group, for rollouts; empty from agents that send none

    def __post_init__(self) -> None:
        _ids(device_id=self.device_id)
        _finite("ts", (self.ts,))
        if self.fleet:
            _ids(fleet=self.fleet)
        if self.state not in (ONLINE, OFFLINE):
            raise ValueError(f"state must be {ONLINE!r} or {OFFLINE!r}, not {self.state!r}")


@fast_constructor
@dataclass(frozen=True, slots=True)
class Telemetry:
    """Periodic device health, sent at QoS 0."""

    KIND: ClassVar[str] = "telemetry"
    VERSION: ClassVar[int] = 1
    device_id: str
    ts: float
    seq: int
    uptime_s: float
    cpu_percent: float
    mem_rss_bytes: int
    mem_available_bytes: int
    load1: float = 0.0
    queue_depth: int = 0
    agent_version: str = ""
    model_versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _ids(device_id=self.device_id)
        numbers = (self.ts, self.uptime_s, self.cpu_percent, self.load1, *self.extra.values())
        _finite("ts, uptime_s, cpu_percent, load1 and extra", numbers)


@fast_constructor
@dataclass(frozen=True, slots=True)
class Command:
    """An instruction from the coordinator to one device."""

    KIND: ClassVar[str] = "cmd"
    VERSION: ClassVar[int] = 1
    cmd_id: str
    action: str
    ts: float
    args: dict[str, Scalar] = field(default_factory=dict)
    ttl_s: float = 0.0

    def __post_init__(self) -> None:
        _ids(cmd_id=self.cmd_id)  # (a device keeps the ids it ran: no spaces, no newlines)
        _finite("ts and ttl_s", (self.ts, self.ttl_s))  # (a NaN ttl would never expire)


@fast_constructor
@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledges a command, task or update by its reference; ``ok`` false says why."""

    KIND: ClassVar[str] = "ack"
    VERSION: ClassVar[int] = 1
    ref: str
    ok: bool
    ts: float
    reason: str = ""
    duplicate: bool = False

    def __post_init__(self) -> None:
        _finite("ts", (self.ts,))


@omit_defaults  # a file without piece digests is written as before they existed
@fast_constructor
@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a model bundle, addressed by content.

    ``pieces`` holds the sha256 digests (32 bytes each, in order) of the file's consecutive
    ``piece_size``-byte slices, so a device can check each chunk as it arrives; a file
    without them (``piece_size`` 0) is checked whole only.
    """

    name: str
    sha256: str
    size: int
    piece_size: int = 0
    pieces: bytes = b""

    def __post_init__(self) -> None:
        _sha256(self.sha256)
        if self.size < 0:
            raise ValueError("size must be >= 0")
        if self.piece_size or self.pieces:
            if self.piece_size <= 0:
                raise ValueError("piece_size must be positive when piece digests are given")
            count = max(1, -(-self.size // self.piece_size))
            if len(self.pieces) != PIECE_DIGEST_BYTES * count:
                raise ValueError(
                    f"{count} pieces of {self.piece_size} bytes need"
                    f" {PIECE_DIGEST_BYTES * count} bytes of digests, got {len(self.pieces)}"
                )


@fast_constructor
@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, element type and shape (-1 for a free dimension) of a model input or output."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@fast_constructor
@dataclass(frozen=True, slots=True)
class ModelManifest:
    """A model version: its files, schema and labels; signed by the coordinator."""

    KIND: ClassVar[str] = "manifest"
    VERSION: ClassVar[int] = 1
    name: str
    version: str
    created: float
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parent_version: str | None = None
    labels: tuple[str, ...] = ()
    preprocessing: dict[str, Scalar] = field(default_factory=dict)
    signature: bytes = b""
    head_layers: tuple[LayerSpec, ...] = ()
    signer_key: bytes = b""
    serving_file: str = ""
    variants: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _ids(model_name=self.name, version=self.version)
        _finite("created", (self.created,))

    @property
    def serving(self) -> str:
        """The file devices run for inference (``model.onnx`` unless a variant was chosen)."""
        return self.serving_file or "model.onnx"


@fast_constructor
@dataclass(frozen=True, slots=True)
class Deployment:
    """Tells one device to serve `manifest` now: sequence ``seq`` (strictly increasing per
    coordinator), signed by the coordinator over `protocols.signing.signed_bytes`."""

    KIND: ClassVar[str] = "deployment"
    VERSION: ClassVar[int] = 1
    device_id: str
    seq: int
    issued: float
    manifest: ModelManifest
    signer_key: bytes = b""
    signature: bytes = b""

    def __post_init__(self) -> None:
        _ids(device_id=self.device_id)
        _finite("issued", (self.issued,))
        if not 1 <= self.seq < 1 << 63:
            raise ValueError("seq must be 1 to 2**63-1")


@fast_constructor
@dataclass(frozen=True, slots=True)
class TrainTask:
    """Asks a device to train one round of a job from a base version."""

    KIND: ClassVar[str] = "task"
    VERSION: ClassVar[int] = 1
    task_id: str
    job_id: str
    round: int
    model_name: str
    base_version: str
    deadline: float
    compression: str = "f32"
    hyperparams: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _ids(job_id=self.job_id, model_name=self.model_name)
        _finite("deadline", (self.deadline,))


@fast_constructor
@dataclass(frozen=True, slots=True)
class ModelUpdate:
    """A device's trained delta from ``base_version``; deduplicated on its `key`."""

    KIND: ClassVar[str] = "update"
    VERSION: ClassVar[int] = 1
    device_id: str
    job_id: str
    round: int
    base_version: str
    seq: int
    num_samples: int
    tensors: tuple[WireTensor, ...]
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _ids(device_id=self.device_id, job_id=self.job_id)
        _counts(round=self.round, seq=self.seq, num_samples=self.num_samples)
        _finite("metrics", self.metrics.values())

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        """The deduplication key (device, job, round, base version, seq)."""
        return (self.device_id, self.job_id, self.round, self.base_version, self.seq)

    @property
    def ack_ref(self) -> str:
        """The reference the coordinator acknowledges this update by (its `Ack.ref`)."""
        return f"{self.job_id}/{self.round}/{self.base_version}/{self.seq}"


@fast_constructor
@dataclass(frozen=True, slots=True)
class BlobChunk:
    """Part ``index`` of ``count`` of the blob whose sha256 is ``blob_sha256``."""

    KIND: ClassVar[str] = "chunk"
    VERSION: ClassVar[int] = 1
    blob_sha256: str
    index: int
    count: int
    size: int
    chunk_size: int
    data: Binary


@fast_constructor
@dataclass(frozen=True, slots=True)
class BlobRequest:
    """Asks for chunks of a blob by hash: all of them, or only `indices` (to resume)."""

    KIND: ClassVar[str] = "blob_req"
    VERSION: ClassVar[int] = 1
    device_id: str
    blob_sha256: str
    indices: tuple[int, ...] = ()
    request_id: str = ""

    def __post_init__(self) -> None:
        _ids(device_id=self.device_id)
        _sha256(self.blob_sha256)
        if any(not 0 <= i < 1 << 31 for i in self.indices):
            raise ValueError("indices must be 0 to 2**31-1")


@fast_constructor
@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """Asks the cloud model for a prediction; the answer goes to ``reply_to``."""

    KIND: ClassVar[str] = "infer_req"
    VERSION: ClassVar[int] = 1
    request_id: str
    model_name: str
    inputs: tuple[WireTensor, ...]
    reply_to: str
    deadline: float

    def __post_init__(self) -> None:
        _finite("deadline", (self.deadline,))  # (a NaN deadline would never pass)


@fast_constructor
@dataclass(frozen=True, slots=True)
class InferenceResponse:
    """The cloud model's answer to an `InferenceRequest`, or the error that prevented one."""

    KIND: ClassVar[str] = "infer_resp"
    VERSION: ClassVar[int] = 1
    request_id: str
    model_version: str
    outputs: tuple[WireTensor, ...] = ()
    error: str = ""


Message = (
    Status
    | Telemetry
    | Command
    | Ack
    | ModelManifest
    | Deployment
    | TrainTask
    | ModelUpdate
    | BlobChunk
    | BlobRequest
    | InferenceRequest
    | InferenceResponse
)
MESSAGE_TYPES: tuple[type[Any], ...] = (
    Status, Telemetry, Command, Ack, ModelManifest, Deployment, TrainTask,
    ModelUpdate, BlobChunk, BlobRequest, InferenceRequest, InferenceResponse,
)  # fmt: skip
_BY_KIND: dict[str, tuple[type[Any], Callable[..., Any]]] = {
    cls.KIND: (cls, schema.decoder(cls)) for cls in MESSAGE_TYPES
}
#: Caps for kinds that have no reason to be large, below the caller's: decoding builds
#: objects many times the size of what they decode from (an unknown field full of empty
#: arrays costs about 70 bytes of memory per byte), so a small kind stays small. A manifest
#: lists 32 bytes of digests per 64 KiB of each file: 1 MiB for a 2 GiB file.
KIND_MAX_BYTES: dict[type[Any], int] = {
    Status: 64 * 1024, Telemetry: 256 * 1024, Command: 64 * 1024, Ack: 64 * 1024,
    BlobRequest: 64 * 1024, TrainTask: 1024 * 1024, ModelManifest: 8 * 1024 * 1024,
    Deployment: 8 * 1024 * 1024,  # (a manifest and a few fields more)
}  # fmt: skip
_ENCODERS: dict[type[Any], Callable[[Any], dict[str, Any]]] = {}
_NO_VERSION: Any = object()
M = TypeVar("M")


def _encoder(cls: type[Any]) -> Callable[[Any], dict[str, Any]]:
    enc = _ENCODERS[cls] = schema.encoder(cls, {"v": cls.VERSION, "kind": cls.KIND}, finite=True)
    return enc


def encode(message: Message) -> bytes:
    """Serialize `message` as one versioned msgpack map; EncodeError for NaN/Inf or odd values."""
    enc = _ENCODERS.get(type(message)) or _encoder(type(message))
    return wire.pack_map(enc(message))


def decode(
    data: bytes | bytearray | memoryview, max_bytes: int = wire.DEFAULT_MAX_BYTES
) -> Message:
    """Decode any v1 message; raise DecodeError (VersionError for a foreign major version)."""
    fields = wire.unpack_map(data, max_bytes)
    kind = fields.get("kind")
    entry = _BY_KIND.get(kind) if type(kind) is str else None
    if entry is None:
        raise DecodeError(f"unknown message kind {kind!r}", reason="unknown_kind")
    cls, decoder = entry
    version = fields.get("v", _NO_VERSION)
    if type(version) is not int or version != cls.VERSION:
        _reject_version(cls, version)
    message: Message = decoder(fields)
    return message


def _reject_version(cls: type[Any], version: object) -> NoReturn:
    if version is _NO_VERSION:
        raise DecodeError("missing field 'v'", reason="missing_field")
    if type(version) is not int:
        raise DecodeError(
            f"field 'v' should be int, got {type(version).__name__}", reason="bad_field"
        )
    raise VersionError(
        f"message kind {cls.KIND!r} has major version {version!r}; this side speaks {cls.VERSION}",
    )


def decode_as(
    cls: type[M], data: bytes | bytearray | memoryview, max_bytes: int = wire.DEFAULT_MAX_BYTES
) -> M:
    """Decode a message that must be of type `cls`, of at most `max_bytes` (or its kind's
    `KIND_MAX_BYTES`, if smaller); DecodeError (reason ``wrong_kind``) if it is another kind."""
    cap = KIND_MAX_BYTES.get(cls)
    if cap is not None and cap < max_bytes:
        max_bytes = cap
    message = decode(data, max_bytes)
    if not isinstance(message, cls):
        raise DecodeError(
            f"expected a {cls.KIND!r} message, got {message.KIND!r}",  # type: ignore[attr-defined]
            reason="wrong_kind",
        )
    return message
