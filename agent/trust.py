"""Which model-signing keys this device trusts, and the check every manifest passes before
it is stored or used (training, serving, deployments).

Keys come from ``model_keys`` (the coordinator's public key, `fedge-coordinator
public-key`). With none configured the device trusts on first use: the signer key of the
first validly signed manifest is pinned in ``<data_dir>/trust/model-keys`` (logged once,
at warning level) and only that key is trusted from then on, across restarts. Unsigned
manifests are refused unless ``allow_unsigned_models``. Every refusal is counted by its
reason (`protocols.signing.SIGNATURE_REASONS`) and raised as a `SignatureError` whose
message says what to do.

A `Deployment` (the signed envelope on ``dev/{id}/deploy``) passes `verify_deployment`
first: it must be signed by a trusted key. Before any key is pinned, its own signer is
checked, and must be the signer of the manifest it carries; the manifest's own check then
pins that key (first use). With ``allow_unsigned_models``, an unsigned deployment passes as
an unsigned manifest does. Deployment refusals are not counted here (the daemon counts
every refused message, ``message_rejected_<reason>``).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path

from agent.atomic_file import write_bytes_atomically
from agent.errors import AgentError
from protocols.messages import Deployment, ModelManifest
from protocols.signing import (
    SIGNATURE_REASONS,
    SignatureError,
    key_text,
    parse_key,
    verify_deployment,
    verify_manifest,
)

log = logging.getLogger(__name__)
PIN_FILE = Path("trust") / "model-keys"

_ADVICE = {
    "unsigned": "the coordinator must sign its manifests (fedge >= 0.2); to accept unsigned "
    "models anyway set allow_unsigned_models = true (not recommended)",
    "untrusted_key": "if this is your coordinator, add its key (`fedge-coordinator "
    "public-key`) to model_keys or --model-key; if its key was replaced on purpose, also "
    "delete {pin}",
    "bad_signature": "the manifest was changed after it was signed (tampered with, or "
    "corrupted): check who can publish on the broker (its ACL)",
}


class TrustError(AgentError):
    """The pinned key file cannot be read or written."""


class ManifestTrust:
    """The trusted keys (configured, or pinned on first use) and the rejection counts."""

    def __init__(
        self, keys: tuple[bytes, ...], data_dir: Path, allow_unsigned: bool = False
    ) -> None:
        self.pin_path = data_dir / PIN_FILE
        self.allow_unsigned = allow_unsigned
        self.configured = bool(keys)
        self._keys = set(keys) if keys else self._read_pins()
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter({reason: 0 for reason in sorted(SIGNATURE_REASONS)})
        self.unsigned_accepted = 0

    def _read_pins(self) -> set[bytes]:
        try:
            text = self.pin_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return set()
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustError(f"cannot read the pinned model keys {self.pin_path}: {exc}") from exc
        try:
            keys = {parse_key(line) for line in text.split() if line}
        except ValueError as exc:
            raise TrustError(f"{self.pin_path} holds a bad key ({exc}): delete it") from exc
        if not keys:  # (were it taken as no pin, the next signer, anyone's, would be trusted)
            raise TrustError(
                f"{self.pin_path} holds no key: write the coordinator's public key into it "
                "(`fedge-coordinator public-key`), or delete it to trust the next signer"
            )
        return keys

    @property
    def keys(self) -> frozenset[bytes]:
        """The keys trusted now (empty until the first key is pinned, without config)."""
        return frozenset(self._keys)

    def verify(self, manifest: ModelManifest) -> None:
        """Return if `manifest` may be stored and used; else count and raise SignatureError."""
        with self._lock:
            try:
                self._verify(manifest)
            except SignatureError as exc:
                self.counts[exc.reason] += 1
                advice = _ADVICE.get(exc.reason, "").format(pin=self.pin_path)
                raise SignatureError(f"{exc}; {advice}", reason=exc.reason) from exc

    def _verify(self, manifest: ModelManifest) -> None:
        unsigned = not manifest.signature or not manifest.signer_key
        if unsigned and self.allow_unsigned and not self._keys:  # (once a key is trusted,
            # configured or pinned, an unsigned manifest could replace what it signed)
            if not self.unsigned_accepted:
                log.warning("accepting unsigned model manifests (allow_unsigned_models = true)")
            self.unsigned_accepted += 1
            return
        if not self._keys and not unsigned:
            verify_manifest(manifest, {manifest.signer_key})  # a valid signature first
            self._pin(manifest.signer_key)
            return
        verify_manifest(manifest, self._keys)

    def verify_deployment(self, deployment: Deployment) -> None:
        """Return if `deployment` is signed by a trusted key (or may be unsigned, by config);
        else raise SignatureError (not counted here; its manifest is checked by `verify`)."""
        with self._lock:
            keys = set(self._keys)
        unsigned = not deployment.signature or not deployment.signer_key
        try:
            if (
                self.allow_unsigned
                and not (deployment.signature or deployment.signer_key)
                and not keys
                and not deployment.manifest.signature
            ):
                return  # (an unsigned fleet: nothing trusted, nothing signed)
            if not keys and not unsigned:  # first use: the manifest's check pins the key
                verify_deployment(deployment, {deployment.signer_key})
                if deployment.manifest.signer_key != deployment.signer_key:
                    raise SignatureError("the deployment and its manifest are signed by "
                                         "different keys", reason="untrusted_key")  # fmt: skip
                return
            verify_deployment(deployment, keys)
        except SignatureError as exc:
            advice = _ADVICE.get(exc.reason, "").format(pin=self.pin_path)
            raise SignatureError(f"{exc}; {advice}", reason=exc.reason) from exc

    def _pin(self, key: bytes) -> None:
        # (durable: a power cut must not leave an empty pin, see _read_pins)
        write_bytes_atomically(self.pin_path, (key_text(key) + "\n").encode("ascii"))
        self._keys = {key}
        log.warning(
            "trusting model-signing key %s on first use, pinned in %s: only models it signs "
            "are accepted from now on (compare it with `fedge-coordinator public-key`, or set "
            "model_keys to pin it explicitly)",
            key_text(key),
            self.pin_path,
        )

    def telemetry_extra(self) -> dict[str, float]:
        """Rejections by reason, as ``manifest_rejected_<reason>`` (telemetry ``extra``)."""
        with self._lock:
            return {f"manifest_rejected_{r}": float(n) for r, n in sorted(self.counts.items())}

    def metrics_lines(self) -> list[str]:
        """Prometheus lines: ``fedge_agent_manifests_rejected_total{reason}``."""
        name = "fedge_agent_manifests_rejected_total"
        with self._lock:
            lines = [f"# HELP {name} Model manifests refused, by reason (unsigned, bad_signature,"
                     " untrusted_key, ...).",
                     f"# TYPE {name} counter"]  # fmt: skip
            lines += [f'{name}{{reason="{r}"}} {n}' for r, n in sorted(self.counts.items())]
        return lines
