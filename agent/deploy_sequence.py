"""The highest deployment this device accepted, so an older one cannot be replayed to it.

The coordinator numbers every `Deployment` it signs from one counter that only grows. A
deployment numbered below the highest this device accepted is refused as ``replayed``
(someone able to publish on the deploy topic re-sent an old, validly signed one: serving it
would downgrade the device); one with the same number but other content is refused too.
The same deployment again (same number, same bytes: the retained message after a reconnect
or a restart) passes, and the deployer treats it as today's "again".

The number and the sha256 of the deployment's signed bytes are kept in
``<data_dir>/deploy/sequence`` as ``<seq> <sha256>``, rewritten atomically on every
accepted deployment, so a restart remembers them.

**A damaged file resets to 0** (any validly signed deployment for this device is accepted
next, and its number kept from then on), logged at error level and counted
(``deploy_sequence_reset``). Refusing every deployment instead would leave the device on its
version until someone deletes the file by hand, and would protect nothing: writes are
atomic, so damage comes from a failing disk or a person; and whoever can write this
directory can also replace the pinned key (``trust/model-keys``). Every deployment must
still carry the pinned key's signature, so a reset opens one window only: between the
reset and the next genuine deployment, an old genuine one could be replayed once. (A
missing file, on first start or after an upgrade, is 0 too, without the error.)
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from pathlib import Path

from agent.atomic_file import write_bytes_atomically
from protocols.errors import RefusedMessageError
from protocols.messages import Deployment
from protocols.signing import signed_bytes

log = logging.getLogger(__name__)
SEQUENCE_FILE = Path("deploy") / "sequence"


_HEX64 = re.compile(r"[0-9a-f]{64}")


def digest(deployment: Deployment) -> str:
    """The sha256 (hex) of what `deployment`'s signature covers: its identity."""
    return hashlib.sha256(signed_bytes(deployment)).hexdigest()


class DeploySequence:
    """The highest accepted deployment number and digest, kept in a file (thread-safe)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / SEQUENCE_FILE
        self.resets = 0
        self._lock = threading.Lock()
        self.seq, self._digest = self._read()

    def _read(self) -> tuple[int, str]:
        try:
            text = self.path.read_text(encoding="ascii")
        except FileNotFoundError:
            return 0, ""
        except (OSError, UnicodeDecodeError) as exc:
            return self._damaged(f"unreadable ({exc})")
        parts = text.split()
        if (
            len(parts) != 2
            or not (parts[0].isascii() and parts[0].isdigit() and len(parts[0]) <= 19)
            or not 1 <= int(parts[0]) < 1 << 63  # (what a Deployment's number can be)
            or _HEX64.fullmatch(parts[1]) is None
        ):
            return self._damaged(f"not '<seq> <sha256>': {text[:80]!r}")
        return int(parts[0]), parts[1]

    def _damaged(self, why: str) -> tuple[int, str]:
        self.resets += 1
        log.error("the deployment sequence file %s is damaged (%s): accepting the next validly"
                  " signed deployment whatever its number", self.path, why)  # fmt: skip
        return 0, ""

    def check(self, deployment: Deployment) -> None:
        """Return if `deployment` is newer than, or the same as, the highest accepted; else
        raise RefusedMessageError (reason ``replayed``)."""
        with self._lock:
            seq, known = self.seq, self._digest
        if deployment.seq > seq:
            return
        if deployment.seq == seq and digest(deployment) == known:
            return  # the same one again (retained): not a replay
        raise RefusedMessageError(
            f"deployment {deployment.seq} of {deployment.manifest.name}"
            f" {deployment.manifest.version} is "
            + ("older than" if deployment.seq < seq else "not the same as")
            + f" deployment {seq}, the highest this device accepted: a replay",
            reason="replayed",
        )

    def accept(self, deployment: Deployment) -> None:
        """Remember `deployment` as the highest accepted (kept in memory if the file cannot
        be written, with an error logged)."""
        with self._lock:
            if deployment.seq < self.seq:
                return
            self.seq, self._digest = deployment.seq, digest(deployment)
            try:
                write_bytes_atomically(self.path, f"{self.seq} {self._digest}\n".encode("ascii"))
            except OSError as exc:
                log.error("cannot keep the deployment sequence in %s: %s (a restart forgets"
                          " it)", self.path, exc)  # fmt: skip
