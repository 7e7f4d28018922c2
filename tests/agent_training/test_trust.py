"""Which manifests the agent accepts: signed by a pinned key (configured, or trusted on
first use and kept across restarts), never unsigned or tampered with; refusals counted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.trust import ManifestTrust, TrustError
from protocols.messages import FileEntry, ModelManifest
from protocols.signing import SignatureError, generate_private_key, public_key, sign_manifest

KEY_A, KEY_B = generate_private_key(), generate_private_key()


def _manifest(version: str = "v1") -> ModelManifest:
    files = (FileEntry("model.onnx", "ab" * 32, 10),)
    return ModelManifest("m", version, 1.0, files, (), ())


def _refused(trust: ManifestTrust, manifest: ModelManifest) -> str:
    with pytest.raises(SignatureError) as caught:
        trust.verify(manifest)
    return caught.value.reason


def test_a_configured_key_is_required(tmp_path: Path) -> None:
    trust = ManifestTrust((public_key(KEY_A),), tmp_path)
    trust.verify(sign_manifest(_manifest(), KEY_A))
    assert _refused(trust, sign_manifest(_manifest(), KEY_B)) == "untrusted_key"
    assert _refused(trust, _manifest()) == "unsigned"
    tampered = dataclasses.replace(sign_manifest(_manifest(), KEY_A), labels=("cat",))
    assert _refused(trust, tampered) == "bad_signature"
    assert trust.telemetry_extra() == {
        "manifest_rejected_bad_signature": 1.0,
        "manifest_rejected_unsigned": 1.0,
        "manifest_rejected_untrusted_key": 1.0,
    }
    assert 'fedge_agent_manifests_rejected_total{reason="unsigned"} 1' in trust.metrics_lines()
    assert not (tmp_path / "trust").exists()  # configured keys are never pinned


def test_the_refusal_says_what_to_do(tmp_path: Path) -> None:
    trust = ManifestTrust((public_key(KEY_A),), tmp_path)
    with pytest.raises(SignatureError, match="fedge-coordinator public-key"):
        trust.verify(sign_manifest(_manifest(), KEY_B))
    with pytest.raises(SignatureError, match="allow_unsigned_models"):
        trust.verify(_manifest())


def test_trust_on_first_use_pins_the_first_signer_across_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trust = ManifestTrust((), tmp_path)
    assert _refused(trust, _manifest()) == "unsigned"  # unsigned never pins
    tampered = dataclasses.replace(sign_manifest(_manifest(), KEY_B), version="v9")
    assert _refused(trust, tampered) == "bad_signature"  # nor does a bad signature
    assert trust.keys == frozenset()
    trust.verify(sign_manifest(_manifest(), KEY_A))
    trust.verify(sign_manifest(_manifest("v2"), KEY_A))
    pinned = [r for r in caplog.records if "on first use" in r.getMessage()]
    assert [r.levelname for r in pinned] == ["WARNING"]
    assert _refused(trust, sign_manifest(_manifest(), KEY_B)) == "untrusted_key"
    restarted = ManifestTrust((), tmp_path)
    assert restarted.keys == {public_key(KEY_A)}
    restarted.verify(sign_manifest(_manifest("v3"), KEY_A))
    assert _refused(restarted, sign_manifest(_manifest(), KEY_B)) == "untrusted_key"


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_a_pin_file_holding_no_key_is_refused_not_taken_as_no_pin(
    tmp_path: Path, content: bytes
) -> None:
    # (taken as no pin, the next signer, anyone's, would be pinned)
    ManifestTrust((), tmp_path).verify(sign_manifest(_manifest(), KEY_A))
    pin = tmp_path / "trust" / "model-keys"
    pin.write_bytes(content)
    with pytest.raises(TrustError, match="holds no key"):
        ManifestTrust((), tmp_path)


def test_unsigned_manifests_only_when_allowed_and_no_key_is_trusted(tmp_path: Path) -> None:
    trust = ManifestTrust((), tmp_path / "fleet", allow_unsigned=True)
    trust.verify(_manifest())
    assert trust.unsigned_accepted == 1
    trust.verify(sign_manifest(_manifest(), KEY_A))  # the first signer is pinned ...
    assert _refused(trust, _manifest()) == "unsigned"  # ... and then nothing unsigned
    # (an unsigned manifest made newer than any real one would have frozen the device)
    configured = ManifestTrust((public_key(KEY_A),), tmp_path, allow_unsigned=True)
    assert _refused(configured, _manifest()) == "unsigned"
    assert _refused(configured, sign_manifest(_manifest(), KEY_B)) == "untrusted_key"
    assert configured.unsigned_accepted == 0


def test_the_refusal_counts_are_prometheus_lines_with_help(tmp_path: Path) -> None:
    lines = ManifestTrust((), tmp_path).metrics_lines()
    name = "fedge_agent_manifests_rejected_total"
    assert lines[:2] == [lines[0], f"# TYPE {name} counter"]
    assert lines[0].startswith(f"# HELP {name} Model manifests refused")
