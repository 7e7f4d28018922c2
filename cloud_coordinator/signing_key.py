"""The coordinator's model-signing key: made on first start, kept under the data directory.

``keys/model-signing.key`` holds the raw Ed25519 private key as base64 (mode 0600, in a
0700 directory); ``keys/model-signing.pub`` the public key, which devices pin
(`fedge-coordinator public-key` prints it). A key or directory others can read is made
private again, with a warning. A missing key whose public half is still there is not
replaced silently (devices that pinned it would refuse every new version): the coordinator
stops and says how to restore or rotate it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cloud_coordinator.errors import StoreError
from protocols.signing import generate_private_key, key_text, parse_key, public_key

log = logging.getLogger(__name__)

KEY_FILE = Path("keys") / "model-signing.key"
PUBLIC_FILE = Path("keys") / "model-signing.pub"


def load_or_create_key(data_dir: Path) -> bytes:
    """The private signing key under `data_dir`, made (and its public half written) if absent;
    StoreError if the file exists but is not a key, or cannot be written."""
    path = data_dir / KEY_FILE
    try:
        if path.exists():
            _keep_private(path.parent, 0o700)
            _keep_private(path, 0o600)
            return parse_key(path.read_text())
        if (data_dir / PUBLIC_FILE).exists():
            raise StoreError(
                f"the model-signing key {path} is gone but its public half "
                f"{data_dir / PUBLIC_FILE} is still there: devices that pinned it refuse "
                "models signed by any other key. Restore the key from a backup, or, to "
                "rotate it, delete the public file too and give devices the new public key"
            )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = generate_private_key()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_text(key) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        (data_dir / PUBLIC_FILE).write_text(key_text(public_key(key)) + "\n")
        log.info("made a new model-signing key %s; devices pin its public half %s",
                 path, key_text(public_key(key)))  # fmt: skip
        return key
    except ValueError as exc:
        raise StoreError(f"{path} does not hold an Ed25519 key ({exc}); move it away") from exc
    except OSError as exc:
        raise StoreError(f"cannot read or make the signing key {path}: {exc}") from exc


def _keep_private(path: Path, mode: int) -> None:
    """Take group and other permissions off `path`, with a warning, if it has any."""
    current = path.stat().st_mode & 0o777
    if current & 0o077:
        path.chmod(mode)
        log.warning("%s was mode %o (others could read it); made it %o. If anyone else has "
                    "read the signing key, rotate it", path, current, mode)  # fmt: skip


def read_public_key(data_dir: Path) -> bytes:
    """The public key of the signing key under `data_dir`; StoreError if there is none."""
    return public_key(load_existing(data_dir))


def load_existing(data_dir: Path) -> bytes:
    """The private key under `data_dir`, without making one; StoreError if absent or bad."""
    path = data_dir / KEY_FILE
    if not path.exists():
        raise StoreError(f"no signing key at {path}: start the coordinator once to make one")
    return load_or_create_key(data_dir)
