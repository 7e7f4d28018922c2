"""protocols.ed25519 against RFC 8032's test vectors and against `cryptography`'s verifier."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.ed25519 import signature_matches

_L = 2**252 + 27742317777372353535851937790883648493

# RFC 8032, section 7.1: TEST 1 (empty message), TEST 2 (one byte), TEST 3 (two bytes)
RFC_VECTORS = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]  # fmt: skip


def _keypair(seed: bytes) -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _cryptography_says(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@pytest.mark.parametrize(("public", "message", "signature"), RFC_VECTORS)
def test_rfc_8032_vectors_verify(public: str, message: str, signature: str) -> None:
    pub, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    assert signature_matches(pub, sig, msg)
    assert not signature_matches(pub, sig, msg + b"\x00")
    assert not signature_matches(pub, sig[:63] + bytes([sig[63] ^ 0x01]), msg)


@settings(max_examples=60, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=300))
def test_a_signature_by_cryptography_verifies(seed: bytes, message: bytes) -> None:
    key, public = _keypair(seed)
    assert signature_matches(public, key.sign(message), message)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=100),
    flip=st.integers(0, (64 + 32) * 8 - 1),
)
def test_a_flipped_bit_in_signature_or_key_gives_the_same_answer_as_cryptography(
    seed: bytes, message: bytes, flip: int
) -> None:
    key, public = _keypair(seed)
    blob = bytearray(key.sign(message) + public)
    blob[flip // 8] ^= 1 << (flip % 8)
    signature, altered = bytes(blob[:64]), bytes(blob[64:])
    assert signature_matches(altered, signature, message) is _cryptography_says(
        altered, signature, message
    )
    assert not signature_matches(altered, signature, message)


def test_a_non_canonical_s_is_refused() -> None:
    key, public = _keypair(bytes(range(32)))
    sig = key.sign(b"model manifest")
    s = int.from_bytes(sig[32:], "little")
    forged = sig[:32] + (s + _L).to_bytes(32, "little")  # the same point, S out of range
    assert signature_matches(public, sig, b"model manifest")
    assert not signature_matches(public, forged, b"model manifest")
    assert not _cryptography_says(public, forged, b"model manifest")


@pytest.mark.parametrize(
    ("public", "signature"),
    [
        (b"", bytes(64)),
        (bytes(31), bytes(64)),
        (bytes(32), bytes(63)),
        (b"\xff" * 32, bytes(64)),  # y ≥ p: not a point's encoding
        (bytes(32), b"\xff" * 64),  # S ≥ L
    ],
)
def test_malformed_keys_and_signatures_are_refused(public: bytes, signature: bytes) -> None:
    assert not signature_matches(public, signature, b"anything")
