"""Message codec rules: unknown fields ignored, missing and mistyped fields named, versions
checked, size cap first, encode refusing what it cannot carry."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest

from protocols import messages, wire
from protocols.errors import DecodeError, EncodeError, VersionError
from protocols.messages import (
    Ack,
    BlobChunk,
    ModelManifest,
    ModelUpdate,
    Status,
    Telemetry,
)
from protocols.tensors import WireTensor, decode_tensor, encode_dense
from tests.protocols.golden_samples import golden_path, plain, samples

KINDS = sorted(samples())


def _fields(kind: str) -> dict[str, Any]:
    fields: dict[str, Any] = msgpack.unpackb(golden_path(kind).read_bytes())
    return fields


def _pack(fields: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(fields)
    return data


def _decode_error(data: bytes, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        messages.decode(data, max_bytes)
    return info.value


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_fields_are_ignored(kind: str) -> None:
    fields = _fields(kind)
    fields["added_in_v1_9"] = {"nested": [1, 2.5, "x", None, b"\x00"]}
    fields["zz"] = None
    for value in fields.values():  # unknown keys inside nested messages too
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict) and "name" in item:
                item["future"] = 7
    assert plain(messages.decode(_pack(fields))) == plain(samples()[kind])


def _required(cls: type) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


@pytest.mark.parametrize(
    ("kind", "name"),
    [(kind, name) for kind in KINDS for name in _required(type(samples()[kind]))],
)
def test_missing_required_field_is_named(kind: str, name: str) -> None:
    fields = _fields(kind)
    del fields[name]
    error = _decode_error(_pack(fields))
    assert error.reason == "missing_field"
    assert repr(name) in str(error)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_optional_fields_take_defaults(kind: str) -> None:
    cls = type(samples()[kind])
    fields = _fields(kind)
    required = {"v", "kind", *_required(cls)}
    decoded = messages.decode(_pack({k: v for k, v in fields.items() if k in required}))
    for f in dataclasses.fields(cls):
        if f.name not in required:
            factory: Any = f.default_factory
            default = f.default if f.default is not dataclasses.MISSING else factory()
            assert getattr(decoded, f.name) == default


@pytest.mark.parametrize(
    ("path", "named"),
    [(("files", 1, "sha256"), "files[1].sha256"), (("inputs", 0, "shape"), "inputs[0].shape")],
)
def test_missing_nested_field_is_named_with_its_path(path: tuple[Any, ...], named: str) -> None:
    fields = _fields("manifest")
    *parents, last = path
    target: Any = fields
    for step in parents:
        target = target[step]
    del target[last]
    error = _decode_error(_pack(fields))
    assert error.reason == "missing_field"
    assert repr(named) in str(error)


def test_missing_version_is_a_missing_field() -> None:
    fields = _fields("ack")
    del fields["v"]
    error = _decode_error(_pack(fields))
    assert error.reason == "missing_field"
    assert not isinstance(error, VersionError)
    assert "'v'" in str(error)


@pytest.mark.parametrize("kind", KINDS)
def test_major_version_2_is_a_version_error_naming_both(kind: str) -> None:
    fields = _fields(kind)
    fields["v"] = 2
    error = _decode_error(_pack(fields))
    assert isinstance(error, VersionError)
    assert error.reason == "version"
    assert "2" in str(error)
    assert "1" in str(error)
    assert "version 2; this side speaks 1" in str(error)


@pytest.mark.parametrize("version", [True, 1.0, "1", None, [1]])
def test_version_must_be_an_int(version: object) -> None:
    fields = _fields("ack")
    fields["v"] = version
    error = _decode_error(_pack(fields))
    assert not isinstance(error, VersionError)
    assert error.reason == "bad_field"


@pytest.mark.parametrize("kind", ["nope", "", "ACK", 5, None, b"ack", ["ack"]])
def test_unknown_kind(kind: object) -> None:
    fields = _fields("ack")
    fields["kind"] = kind
    assert _decode_error(_pack(fields)).reason == "unknown_kind"


def test_missing_kind_is_unknown() -> None:
    fields = _fields("ack")
    del fields["kind"]
    assert _decode_error(_pack(fields)).reason == "unknown_kind"


def test_size_cap_is_checked_before_unpacking() -> None:
    garbage = b"\xc1" * 1000  # not msgpack at all: only the cap may be reported
    assert _decode_error(garbage, max_bytes=999).reason == "too_large"
    assert _decode_error(garbage, max_bytes=1000).reason == "malformed"
    golden = golden_path("update").read_bytes()
    assert _decode_error(golden, max_bytes=len(golden) - 1).reason == "too_large"
    assert messages.decode(golden, max_bytes=len(golden))


def test_default_size_cap() -> None:
    data = bytearray(wire.DEFAULT_MAX_BYTES + 1)
    assert _decode_error(bytes(data)).reason == "too_large"
    with pytest.raises(DecodeError) as info:
        wire.unpack_map(memoryview(data))
    assert info.value.reason == "too_large"


@pytest.mark.parametrize(
    "data", [b"", b"\x01", b"\x90", msgpack.packb([1, 2]), b"\xa3abc", b"\x81\xa1v", b"\xc1"]
)
def test_not_a_message_map(data: bytes) -> None:
    assert _decode_error(data).reason == "malformed"


@pytest.mark.parametrize(
    ("kind", "name", "value"),
    [
        ("ack", "ts", "yesterday"),
        ("ack", "ok", 1),
        ("ack", "ref", b"bytes"),
        ("task", "round", True),
        ("task", "round", 1.5),
        ("task", "hyperparams", [1]),
        ("task", "hyperparams", {"lr": [0.1]}),
        ("telemetry", "extra", {"x": "hot"}),
        ("telemetry", "model_versions", {"a": 1}),
        ("manifest", "files", {"name": "x"}),
        ("manifest", "files", [1]),
        ("manifest", "labels", ["a", 1]),
        ("manifest", "parent_version", 7),
        ("manifest", "signature", "text"),
        ("chunk", "data", "text"),
        ("update", "tensors", [{"name": "w"}]),
    ],
)
def test_mistyped_field_is_a_decode_error(kind: str, name: str, value: object) -> None:
    fields = _fields(kind)
    fields[name] = value
    error = _decode_error(_pack(fields))
    assert error.reason in ("bad_field", "missing_field")
    assert name in str(error)


def test_nested_mistyped_field_is_named_with_its_path() -> None:
    fields = _fields("update")
    fields["tensors"][2]["shape"] = [3, "4"]
    error = _decode_error(_pack(fields))
    assert error.reason == "bad_field"
    assert "tensors[2].shape[1]" in str(error)


@pytest.mark.parametrize(
    ("kind", "name", "value"),
    [
        ("status", "state", "sleeping"),
        ("status", "device_id", "a/b"),
        ("update", "num_samples", -1),
        ("update", "job_id", "job+1"),
        ("manifest", "version", ""),
    ],
)
def test_invalid_values_are_rejected_as_bad_fields(kind: str, name: str, value: object) -> None:
    fields = _fields(kind)
    fields[name] = value
    assert _decode_error(_pack(fields)).reason == "bad_field"


def test_ints_are_accepted_for_floats() -> None:
    fields = _fields("telemetry")
    fields["ts"] = 5
    fields["extra"] = {"n": 3}
    decoded = messages.decode_as(Telemetry, _pack(fields))
    assert decoded.ts == 5.0
    assert type(decoded.ts) is float
    assert decoded.extra == {"n": 3.0}
    assert type(decoded.extra["n"]) is float


def test_decode_as_rejects_another_kind() -> None:
    with pytest.raises(DecodeError) as info:
        messages.decode_as(Ack, golden_path("status").read_bytes())
    assert info.value.reason == "wrong_kind"
    assert isinstance(messages.decode_as(Status, golden_path("status").read_bytes()), Status)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_non_finite_floats(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):  # (not even built)
        Ack("r", True, bad)
    with pytest.raises(ValueError, match="finite"):
        Telemetry("d", 1.0, 0, 1.0, 1.0, 1, 1, extra={"x": bad})
    tensor = WireTensor("w", "i8", (2,), b"\x01\x02", scale=bad)
    with pytest.raises(EncodeError):
        messages.encode(ModelUpdate("d", "j", 0, "v", 0, 1, (tensor,)))


def test_encode_refuses_foreign_types() -> None:
    with pytest.raises(EncodeError):
        messages.encode(Telemetry("d", 1.0, np.int64(3), 1.0, 1.0, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        messages.encode(Ack("r", True, 1.0, reason=object()))  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="binary field needs bytes, not str"):
        messages.encode(BlobChunk("a" * 64, 0, 1, 1, 1, "x"))  # type: ignore[arg-type]


def test_constructors_validate() -> None:
    with pytest.raises(ValueError, match="state"):
        Status("d", "asleep", 1.0)
    with pytest.raises(ValueError, match="sha256"):
        messages.FileEntry("f", "ABC", 1)
    with pytest.raises(ValueError, match=r"0 to 2\*\*63-1"):
        ModelUpdate("d", "j", -1, "v", 0, 1, ())


def test_many_large_binaries_in_one_message() -> None:
    tensors = tuple(encode_dense(f"t{i}", np.full(1500, i, dtype=np.float32)) for i in range(300))
    update = ModelUpdate("d", "j", 0, "v", 0, 1, tensors)
    decoded = messages.decode_as(ModelUpdate, messages.encode(update))
    assert [float(decode_tensor(t)[0]) for t in decoded.tensors] == list(range(300))


def test_large_message_decodes_without_copying_tensor_data() -> None:
    array = np.arange(1 << 18, dtype=np.float32)
    payload = messages.encode(ModelUpdate("d", "j", 0, "v", 0, 1, (encode_dense("w", array),)))
    assert len(payload) >= wire.ZERO_COPY_THRESHOLD
    decoded = messages.decode_as(ModelUpdate, payload)
    assert isinstance(decoded.tensors[0].data, memoryview)
    out = decode_tensor(decoded.tensors[0])
    np.testing.assert_array_equal(out, array)
    assert np.shares_memory(out, np.frombuffer(payload, dtype=np.uint8))
    assert not out.flags.writeable


def test_big_binary_equal_to_small_field_is_kept_apart() -> None:
    # The splice markers must never be confused with user data, even identical bytes.
    blob = bytes(range(256)) * 20
    chunk = BlobChunk("ab" * 32, 0, 1, len(blob), len(blob), blob)
    manifest = samples()["manifest"]
    assert isinstance(manifest, ModelManifest)
    manifest_sig = dataclasses.replace(manifest, signature=blob)
    for message in (chunk, manifest_sig):
        assert plain(messages.decode(messages.encode(message))) == plain(message)


def test_update_key() -> None:
    update = samples()["update"]
    assert isinstance(update, ModelUpdate)
    assert update.key == ("cam-01", "job-1", 3, "v7", 2)
