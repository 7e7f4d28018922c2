"""Ed25519 signatures on model manifests and deployments: the coordinator signs, devices verify.

The signed bytes are the manifest encoded with an empty ``signature`` (``signer_key``
included), so any change to a file hash, the schema, the labels or the chosen variant
breaks the signature. A device trusts a set of public keys (pinned in its config, or the
first one it met); `verify_manifest` raises `SignatureError` with the reason it counts:

- ``unsigned``: no signature or no signer key;
- ``untrusted_key``: signed, but by a key the device does not trust;
- ``bad_signature``: the signature does not match the bytes (tampered, or corrupted).

A `Deployment` (the envelope that tells one device to serve a manifest now) is signed the
same way, over itself encoded with an empty ``signature`` (its device id, sequence number,
issue time and the whole signed manifest): `sign_deployment` / `verify_deployment`, the
same reasons.

Signing (the coordinator) uses the `cryptography` package, imported when first needed;
verifying (devices) uses `protocols.ed25519`, so a device never loads `cryptography`.
Keys are raw 32-byte Ed25519 keys; `key_text`/`parse_key` give them a printable base64
form for config files and the command line.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Collection
from typing import TypeVar

from protocols.ed25519 import signature_matches
from protocols.errors import DecodeError
from protocols.messages import Deployment, ModelManifest, encode

KEY_BYTES = 32
SIGNATURE_REASONS = frozenset({"unsigned", "untrusted_key", "bad_signature"})


class SignatureError(DecodeError):
    """A manifest is unsigned, signed by an untrusted key, or its signature does not match."""

    reason = "bad_signature"


def generate_private_key() -> bytes:
    """A new random Ed25519 private key (32 raw bytes)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    key = Ed25519PrivateKey.generate()
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(private_key: bytes) -> bytes:
    """The 32-byte public key of a raw private key; ValueError if it is not one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(_raw(private_key, "private key"))
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_text(key: bytes) -> str:
    """A raw key as base64 text (what config files and `--model-key` hold)."""
    return base64.b64encode(key).decode("ascii")


def parse_key(text: str) -> bytes:
    """A raw 32-byte key from its base64 text; ValueError saying what is wrong."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not base64: {text[:20]!r}") from None
    return _raw(raw, "key")


def _raw(key: bytes, what: str) -> bytes:
    if len(key) != KEY_BYTES:
        raise ValueError(f"an Ed25519 {what} is {KEY_BYTES} bytes, got {len(key)}")
    return bytes(key)


_Signable = TypeVar("_Signable", ModelManifest, Deployment)


def signed_bytes(message: _Signable) -> bytes:
    """The bytes a manifest's or a deployment's signature covers: it with an empty signature."""
    return encode(dataclasses.replace(message, signature=b""))


def _signed(message: _Signable, private_key: bytes) -> _Signable:
    """`message` with ``signer_key`` set to the key's public half and signed by it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    unsigned = dataclasses.replace(message, signer_key=public_key(private_key), signature=b"")
    key = Ed25519PrivateKey.from_private_bytes(private_key)
    return dataclasses.replace(unsigned, signature=key.sign(signed_bytes(unsigned)))


def _check(message: _Signable, what: str, trusted: Collection[bytes]) -> None:
    """Return if `message` (`what` names it) is signed by a `trusted` key; else SignatureError."""
    if not message.signature or not message.signer_key:
        raise SignatureError(f"{what} is not signed", reason="unsigned")
    if message.signer_key not in trusted:
        raise SignatureError(
            f"{what} is signed by key {key_text(message.signer_key)}, which this device"
            " does not trust",
            reason="untrusted_key",
        )
    if not signature_matches(message.signer_key, message.signature, signed_bytes(message)):
        raise SignatureError(
            f"{what}: the signature does not match (tampered with, or corrupted)",
            reason="bad_signature",
        )


def sign_manifest(manifest: ModelManifest, private_key: bytes) -> ModelManifest:
    """`manifest` with ``signer_key`` set to the key's public half and signed by it."""
    return _signed(manifest, private_key)


def verify_manifest(manifest: ModelManifest, trusted: Collection[bytes]) -> None:
    """Return if `manifest` is signed by one of the `trusted` keys; SignatureError if not."""
    _check(manifest, f"manifest {manifest.name} {manifest.version}", trusted)


def sign_deployment(deployment: Deployment, private_key: bytes) -> Deployment:
    """`deployment` with ``signer_key`` set to the key's public half and signed by it."""
    return _signed(deployment, private_key)


def verify_deployment(deployment: Deployment, trusted: Collection[bytes]) -> None:
    """Return if `deployment` (its envelope) is signed by a `trusted` key; else SignatureError."""
    manifest = deployment.manifest
    what = f"deployment {deployment.seq} of {manifest.name} {manifest.version}"
    _check(deployment, what, trusted)
