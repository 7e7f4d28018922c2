"""Generated code in `schema`: encoders, decoders and constructors agree with the reference."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import schema, wire
from protocols.errors import DecodeError
from protocols.messages import MESSAGE_TYPES, ModelManifest, ModelUpdate, Telemetry
from protocols.schema import Binary, Scalar, constructor, fast_constructor
from protocols.tensors import WireTensor, encode_dense
from tests.protocols.golden_samples import golden_path, plain, samples

CLASSES = [*MESSAGE_TYPES, WireTensor]


def _decode_both(cls: type, fields: dict[str, Any]) -> tuple[Any, Any]:
    """(generated decoder's outcome, checked path's outcome): a value or the error's text."""
    outcomes = []
    for decode in (schema.from_map, schema._checked_from_map):
        try:
            outcomes.append(plain(decode(cls, fields)))
        except DecodeError as exc:
            outcomes.append((type(exc), exc.reason, str(exc)))
    return outcomes[0], outcomes[1]


@pytest.mark.parametrize("kind", sorted(samples()))
def test_generated_decoder_agrees_on_golden_maps(kind: str) -> None:
    fields = msgpack.unpackb(golden_path(kind).read_bytes())
    cls = type(samples()[kind])
    generated, checked = _decode_both(cls, fields)
    assert generated == checked == plain(samples()[kind])


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(samples())), st.data())
def test_generated_decoder_agrees_with_the_checked_path(kind: str, data: st.DataObject) -> None:
    fields = msgpack.unpackb(golden_path(kind).read_bytes())
    for name in data.draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        if data.draw(st.booleans()):
            del fields[name]
        else:
            fields[name] = data.draw(_values)
    generated, checked = _decode_both(type(samples()[kind]), fields)
    assert generated == checked


def test_decoder_accepts_what_the_checked_path_accepts() -> None:
    # Tuples for arrays and ints for floats are not what msgpack gives, but they are valid.
    fields = {"name": "w", "dtype": "f32", "shape": (2, 3), "data": b"x" * 24, "scale": 2}
    tensor = schema.from_map(WireTensor, fields)
    assert tensor == WireTensor("w", "f32", (2, 3), b"x" * 24, 2.0)
    assert type(tensor.scale) is float


@pytest.mark.parametrize("cls", CLASSES)
def test_encoders_match_the_dataclass_fields(cls: type) -> None:
    sample: Any = next((s for s in samples().values() if type(s) is cls), None)
    if sample is None:
        sample = samples()["update"].tensors[0]  # type: ignore[union-attr]
    encoded = schema.to_map(sample)
    fields = dataclasses.fields(cls)
    if cls is WireTensor:  # @omit_defaults: optional fields at their default are left out
        fields = tuple(f for f in fields if getattr(sample, f.name) is not f.default)
    assert list(encoded) == [f.name for f in fields]


def test_a_tensor_leaves_out_only_the_fields_at_their_default() -> None:
    dense = encode_dense("w", np.ones(3, dtype=np.float32))
    assert list(schema.to_map(dense)) == ["name", "dtype", "shape", "data"]
    quantised = encode_dense("q", np.array([1.0, -2.0], dtype=np.float32), "i8")
    assert list(schema.to_map(quantised)) == ["name", "dtype", "shape", "data", "scale"]
    every = WireTensor("s", "i8", (9,), b"\x01", 0.5, 3, b"\x02")
    assert list(schema.to_map(every)) == [f.name for f in dataclasses.fields(WireTensor)]
    # equal to the default but not it (decoded from a map that held it): still written
    explicit = schema.from_map(WireTensor, {**schema.to_map(dense), "scale": 1.0, "zero_point": 0})
    assert list(schema.to_map(explicit)) == ["name", "dtype", "shape", "data", "scale"]
    for tensor in (dense, quantised, every, explicit):
        fields = wire.unpack_map(wire.pack_map(schema.to_map(tensor)))
        assert schema.from_map(WireTensor, fields) == tensor


def test_constructor_builds_what_the_class_builds() -> None:
    make = constructor(Telemetry)
    made = make("d", 1.0, 2, 3.0, 4.0, 5, 6, agent_version="x")
    assert type(made) is Telemetry
    assert made == Telemetry("d", 1.0, 2, 3.0, 4.0, 5, 6, agent_version="x")
    assert made.extra == {}
    assert made.extra is not make("d", 1.0, 2, 3.0, 4.0, 5, 6).extra  # a fresh default each
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.seq = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"0 to 2\*\*63-1"):  # __post_init__ runs
        constructor(ModelUpdate)("d", "j", -1, "v", 0, 1, ())
    with pytest.raises(TypeError):
        make("d")


def test_constructor_of_other_classes_is_the_class() -> None:
    @dataclass
    class Plain:
        x: int

    assert constructor(Plain) is Plain


def test_fast_constructor_keyword_only_and_factories() -> None:
    @fast_constructor
    @dataclass(frozen=True, slots=True, kw_only=True)
    class Options:
        name: str
        tags: tuple[str, ...] = ()
        extra: dict[str, Scalar] = field(default_factory=dict)
        blob: Binary | None = None

    made = constructor(Options)(name="a", tags=("x",))
    assert made == Options(name="a", tags=("x",))
    with pytest.raises(TypeError):
        constructor(Options)("a")
    encoded = schema.to_map(made)
    assert schema.from_map(Options, encoded) == made


def test_fast_constructor_refuses_unsuitable_classes() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        x: int

    with pytest.raises(TypeError, match="slots"):
        fast_constructor(NoSlots)


def test_encoder_refuses_types_it_cannot_carry() -> None:
    @dataclass(frozen=True, slots=True)
    class Odd:
        values: list[int]

    with pytest.raises(TypeError, match="unsupported field type"):
        schema.to_map(Odd([1]))
    with pytest.raises(TypeError, match="unsupported field type"):
        schema.from_map(Odd, {"values": [1]})


def test_nested_messages_decode_through_generated_code() -> None:
    manifest = samples()["manifest"]
    assert isinstance(manifest, ModelManifest)
    fields = msgpack.unpackb(golden_path("manifest").read_bytes())
    fields["files"][0]["size"] = -1  # FileEntry.__post_init__ refuses it
    with pytest.raises(DecodeError, match="invalid FileEntry") as info:
        schema.from_map(ModelManifest, fields)
    assert info.value.reason == "bad_field"


@dataclass(frozen=True, slots=True)
@schema.omit_defaults  # under dataclass(slots=True), which makes a new class: still applies
class _Mixed:
    x: int
    y: float = 1.0
    z: tuple[int, ...] = field(default_factory=tuple)
    _: dataclasses.KW_ONLY
    w: str
    q: int | None = None


def test_omit_defaults_keeps_field_order_around_factories_and_keyword_only_fields() -> None:
    bare = _Mixed(3, w="k")
    assert schema.to_map(bare) == {"x": 3, "z": (), "w": "k"}  # factory fields always go
    assert list(schema.to_map(bare)) == ["x", "z", "w"]
    full = _Mixed(3, 2.0, (1,), w="k", q=5)
    assert list(schema.to_map(full)) == ["x", "y", "z", "w", "q"]
    for value in (bare, full):
        fields = wire.unpack_map(wire.pack_map(schema.to_map(value)))
        assert schema.from_map(_Mixed, fields) == value
