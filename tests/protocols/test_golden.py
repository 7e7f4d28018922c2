"""Golden bytes, both ways: each sample encodes to its checked-in file and decodes back from it."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest

from protocols import messages, wire
from protocols.messages import MESSAGE_TYPES, ModelUpdate
from protocols.tensors import decode_sparse, decode_tensor
from tests.protocols.golden_samples import GOLDEN_DIR, golden_path, plain, samples

KINDS = sorted(cls.KIND for cls in MESSAGE_TYPES)


def _golden(kind: str) -> bytes:
    return golden_path(kind).read_bytes()


def test_every_kind_has_a_sample_and_a_file() -> None:
    assert sorted(samples()) == KINDS
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.msgpack")) == KINDS


def test_samples_are_deterministic() -> None:
    assert plain(samples()) == plain(samples())


@pytest.mark.parametrize("kind", KINDS)
def test_encode_matches_golden_bytes(kind: str) -> None:
    assert messages.encode(samples()[kind]) == _golden(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_golden_bytes_gives_the_sample(kind: str) -> None:
    sample = samples()[kind]
    decoded = messages.decode(_golden(kind))
    assert type(decoded) is type(sample)
    assert plain(decoded) == plain(sample)
    assert plain(messages.decode_as(type(sample), _golden(kind))) == plain(sample)


@pytest.mark.parametrize("kind", KINDS)
def test_golden_payload_is_one_map_led_by_version_and_kind(kind: str) -> None:
    fields = msgpack.unpackb(_golden(kind))
    assert isinstance(fields, dict)
    assert list(fields)[:2] == ["v", "kind"]
    assert fields["v"] == 1
    assert fields["kind"] == kind


@pytest.mark.parametrize("kind", KINDS)
def test_walker_reads_golden_bytes_like_msgpack(kind: str) -> None:
    data = _golden(kind)
    assert plain(wire.walk(data)) == msgpack.unpackb(data)


@pytest.mark.parametrize("kind", KINDS)
def test_golden_decodes_through_the_zero_copy_path(kind: str) -> None:
    fields: dict[str, Any] = msgpack.unpackb(_golden(kind))
    fields["zz_future_padding"] = bytes(wire.ZERO_COPY_THRESHOLD)
    data = msgpack.packb(fields)
    assert len(data) >= wire.ZERO_COPY_THRESHOLD
    assert plain(messages.decode(data)) == plain(samples()[kind])


def test_golden_update_tensors_decode_to_their_values() -> None:
    update = messages.decode_as(ModelUpdate, _golden("update"))
    dense, half, brain, quant, sparse = update.tensors
    expected = np.arange(12, dtype=np.float32).reshape(3, 4) / 8 - 0.5
    np.testing.assert_array_equal(decode_tensor(dense), expected)
    np.testing.assert_array_equal(decode_tensor(half), [0.25, -1.5, 3.0])
    np.testing.assert_allclose(decode_tensor(brain), [1.0, -2.0, 0.5, 1e-3], rtol=2**-8)
    grid = np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3)
    np.testing.assert_allclose(decode_tensor(quant), grid, atol=quant.scale / 2 + 1e-7)
    assert sparse.is_sparse
    idx, vals = decode_sparse(sparse)
    assert idx.tolist() == [0, 1, 130, (1 << 21) + 131, 4096 * 1024 - 1]
    np.testing.assert_allclose(vals, [0.5, -0.25, 1.0, -1.0, 0.125], atol=sparse.scale / 2)


def _without_pieces(manifest: messages.ModelManifest) -> messages.ModelManifest:
    files = tuple(dataclasses.replace(f, piece_size=0, pieces=b"") for f in manifest.files)
    return dataclasses.replace(manifest, files=files)


def test_manifest_from_before_head_layers_still_decodes() -> None:
    # A minor version added ``head_layers`` (with a default): older bytes must still decode.
    old = (GOLDEN_DIR / "compat" / "manifest-before-head-layers.msgpack").read_bytes()
    decoded = messages.decode(old)
    manifest = samples()["manifest"]
    assert isinstance(manifest, messages.ModelManifest)
    assert manifest.head_layers
    before = dataclasses.replace(
        _without_pieces(manifest), head_layers=(), signer_key=b"", serving_file="", variants={}
    )
    assert plain(decoded) == plain(before)


def test_manifest_from_before_signer_key_still_decodes() -> None:
    # A minor version added ``signer_key``, ``serving_file`` and ``variants`` (defaults).
    old = (GOLDEN_DIR / "compat" / "manifest-before-signer-key.msgpack").read_bytes()
    decoded = messages.decode(old)
    manifest = samples()["manifest"]
    assert isinstance(manifest, messages.ModelManifest)
    before = dataclasses.replace(
        _without_pieces(manifest), signer_key=b"", serving_file="", variants={}
    )
    assert plain(decoded) == plain(before)
    assert isinstance(decoded, messages.ModelManifest)
    assert decoded.serving == "model.onnx"


def test_manifest_from_before_piece_digests_still_decodes() -> None:
    # A minor version added ``piece_size`` and ``pieces`` to each file (defaults: none).
    old = (GOLDEN_DIR / "compat" / "manifest-before-pieces.msgpack").read_bytes()
    manifest = samples()["manifest"]
    assert isinstance(manifest, messages.ModelManifest)
    assert manifest.files[1].pieces
    assert plain(messages.decode(old)) == plain(_without_pieces(manifest))
    assert messages.encode(_without_pieces(manifest)) == old  # no digests: written as before


def test_status_from_before_fleet_still_decodes() -> None:
    # A minor version added ``fleet`` (default ""): older bytes must still decode.
    old = (GOLDEN_DIR / "compat" / "status-before-fleet.msgpack").read_bytes()
    decoded = messages.decode(old)
    status = samples()["status"]
    assert isinstance(status, messages.Status)
    assert status.fleet == "lab-2"
    assert plain(decoded) == plain(dataclasses.replace(status, fleet=""))


@pytest.mark.parametrize("kind", ["infer_req", "infer_resp", "update"])
def test_tensors_with_every_field_written_still_decode(kind: str) -> None:
    # Tensors were first written with all seven fields; now the optional ones at their
    # default are left out. Both forms decode to the same message.
    old = (GOLDEN_DIR / "compat" / f"{kind}-before-short-tensors.msgpack").read_bytes()
    assert len(old) > len(_golden(kind))
    fields = msgpack.unpackb(old)
    tensors = [t for key in ("tensors", "inputs", "outputs") for t in fields.get(key, [])]
    assert tensors
    assert all(len(t) == 7 for t in tensors)  # the long form, really
    assert plain(messages.decode(old)) == plain(samples()[kind])
