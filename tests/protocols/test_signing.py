"""Manifest and deployment signatures: sign and verify, and every way either can fail."""

from __future__ import annotations

import dataclasses

import pytest

from protocols import messages
from protocols.messages import Deployment, FileEntry, ModelManifest
from protocols.signing import (
    SignatureError,
    generate_private_key,
    key_text,
    parse_key,
    public_key,
    sign_deployment,
    sign_manifest,
    signed_bytes,
    verify_deployment,
    verify_manifest,
)
from tests.protocols.golden_samples import samples


def _manifest() -> ModelManifest:
    m = samples()["manifest"]
    assert isinstance(m, ModelManifest)
    return dataclasses.replace(m, signature=b"", signer_key=b"")


def test_a_signed_manifest_verifies_after_a_trip_over_the_wire() -> None:
    key = generate_private_key()
    signed = sign_manifest(_manifest(), key)
    assert signed.signer_key == public_key(key)
    assert len(signed.signature) == 64
    received = messages.decode_as(ModelManifest, messages.encode(signed))
    verify_manifest(received, {public_key(key)})


def test_an_int_in_a_float_field_still_verifies_after_the_trip() -> None:
    # (decoded as a float: were it encoded as an int, the re-encoded bytes would differ)
    key = generate_private_key()
    signed = sign_manifest(dataclasses.replace(_manifest(), created=1_700_000_000), key)
    received = messages.decode_as(ModelManifest, messages.encode(signed))
    assert type(received.created) is float
    verify_manifest(received, {public_key(key)})


@pytest.mark.parametrize(
    "change",
    [
        {"version": "v8"},
        {"files": (FileEntry("model.onnx", "ab" * 32, 10),)},
        {"labels": ("dog", "cat")},
        {"serving_file": "model.onnx"},
        {"variants": {"chosen": "fp32"}},
        {"preprocessing": {}},
    ],
)
def test_any_change_after_signing_is_a_bad_signature(change: dict[str, object]) -> None:
    key = generate_private_key()
    tampered = dataclasses.replace(sign_manifest(_manifest(), key), **change)  # type: ignore[arg-type]
    with pytest.raises(SignatureError) as info:
        verify_manifest(tampered, {public_key(key)})
    assert info.value.reason == "bad_signature"


def test_a_flipped_signature_bit_is_a_bad_signature() -> None:
    key = generate_private_key()
    signed = sign_manifest(_manifest(), key)
    sig = bytearray(signed.signature)
    sig[0] ^= 1
    with pytest.raises(SignatureError, match="does not match"):
        verify_manifest(dataclasses.replace(signed, signature=bytes(sig)), {public_key(key)})


def test_unsigned_and_untrusted_are_refused_with_their_reasons() -> None:
    with pytest.raises(SignatureError) as info:
        verify_manifest(_manifest(), {public_key(generate_private_key())})
    assert info.value.reason == "unsigned"
    mine, theirs = generate_private_key(), generate_private_key()
    with pytest.raises(SignatureError) as info:
        verify_manifest(sign_manifest(_manifest(), theirs), {public_key(mine)})
    assert info.value.reason == "untrusted_key"
    assert key_text(public_key(theirs)) in str(info.value)
    # a forger who swaps in their own key still needs the device to trust it
    forged = dataclasses.replace(sign_manifest(_manifest(), mine), signer_key=public_key(theirs))
    with pytest.raises(SignatureError) as info:
        verify_manifest(forged, {public_key(mine), public_key(theirs)})
    assert info.value.reason == "bad_signature"


def test_keys_as_text() -> None:
    key = public_key(generate_private_key())
    assert parse_key(key_text(key)) == key
    assert parse_key(" " + key_text(key) + "\n") == key
    for bad, match in [("not base64!", "base64"), (key_text(b"short"), "32 bytes")]:
        with pytest.raises(ValueError, match=match):
            parse_key(bad)
    with pytest.raises(ValueError, match="32 bytes"):
        public_key(b"x" * 31)


def test_the_signature_covers_the_signer_key() -> None:
    signed = sign_manifest(_manifest(), generate_private_key())
    assert signed.signer_key in signed_bytes(signed)
    assert signed.signature not in signed_bytes(signed)


def _deployment(key: bytes) -> Deployment:
    return Deployment("cam-01", 3, 1_700_000_000.0, sign_manifest(_manifest(), key))


def test_a_signed_deployment_verifies_after_a_trip_over_the_wire() -> None:
    key = generate_private_key()
    signed = sign_deployment(_deployment(key), key)
    assert signed.signer_key == public_key(key)
    assert signed.signature not in signed_bytes(signed)
    received = messages.decode_as(Deployment, messages.encode(signed))
    verify_deployment(received, {public_key(key)})
    verify_manifest(received.manifest, {public_key(key)})


@pytest.mark.parametrize(
    "change", [{"seq": 4}, {"device_id": "cam-02"}, {"issued": 1_700_000_001.0}]
)
def test_a_changed_deployment_fails_verification(change: dict[str, object]) -> None:
    key = generate_private_key()
    tampered = dataclasses.replace(sign_deployment(_deployment(key), key), **change)  # type: ignore[arg-type]
    with pytest.raises(SignatureError) as info:
        verify_deployment(tampered, {public_key(key)})
    assert info.value.reason == "bad_signature"


def test_a_deployment_of_another_signed_manifest_fails_verification() -> None:
    key = generate_private_key()
    signed = sign_deployment(_deployment(key), key)
    other = sign_manifest(dataclasses.replace(_manifest(), version="v8"), key)
    with pytest.raises(SignatureError, match="does not match"):
        verify_deployment(dataclasses.replace(signed, manifest=other), {public_key(key)})


def test_unsigned_and_foreign_deployments_are_refused_by_reason() -> None:
    mine, theirs = generate_private_key(), generate_private_key()
    with pytest.raises(SignatureError) as info:
        verify_deployment(_deployment(mine), {public_key(mine)})
    assert info.value.reason == "unsigned"
    with pytest.raises(SignatureError) as info:
        verify_deployment(sign_deployment(_deployment(mine), theirs), {public_key(mine)})
    assert info.value.reason == "untrusted_key"
