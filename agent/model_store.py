"""The agent's model cache: content-addressed blobs and manifests on disk, with a size cap.

Layout under the root: ``blobs/<sha256>`` (verified on write), ``models/<name>/<version>``
(encoded manifests), ``models/<name>/current`` and ``previous`` (version pointers, replaced
atomically), ``models/<name>/blocked`` (versions that failed to load or were rolled back,
one per line: never made current again), ``models/<name>/deployed`` (the version the
coordinator last deployed; once there, training versions no longer become current).
Eviction never touches blobs that the current, previous or deployed version uses, nor
those of each model's newest manifest put since the store opened (perhaps still being
fetched). Version names that
are the store's own file names (``current``, ``blocked``, ``..``) are refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from agent.atomic_file import write_bytes_atomically
from agent.errors import AgentError
from protocols.errors import DecodeError
from protocols.field_checks import valid_sha256
from protocols.messages import FileEntry, ModelManifest, decode_as, encode
from protocols.topics import valid_id


class ModelStoreError(AgentError):
    """A blob or manifest cannot be stored or found."""


log = logging.getLogger(__name__)
#: Names a version may not have: the store keeps these files beside the manifests.
RESERVED_VERSIONS = frozenset({"current", "previous", "deployed", "blocked", ".", ".."})


def _remove_stale_temps(directory: Path) -> None:
    """Delete what `write_atomically` of an earlier process left (it was cut off mid-write)."""
    own = f".{os.getpid()}.tmp"
    for path in directory.glob(".*.tmp"):
        if not path.name.endswith(own):
            path.unlink(missing_ok=True)


class ModelStore:
    """Blobs and manifests of the models this device holds."""

    def __init__(self, root: Path, max_bytes: int = 1024**3) -> None:
        self.root = root
        self.max_bytes = max_bytes
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "models").mkdir(parents=True, exist_ok=True)
        for directory in (root / "blobs", *(root / "models").iterdir()):
            if directory.is_dir():
                _remove_stale_temps(directory)
        self._newest: dict[str, ModelManifest] = {}  # per model, of those put since start

    # --- blobs -------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this hash lives (whether or not it is there)."""
        if not valid_sha256(sha256):
            raise ModelStoreError(f"not a sha256: {sha256!r}")
        return self.root / "blobs" / sha256

    def has_blob(self, sha256: str) -> bool:
        """True if the blob is cached."""
        return self.blob_path(sha256).is_file()

    def put_blob(self, sha256: str, data: bytes) -> None:
        """Cache `data` under its hash; ModelStoreError if the hash does not match."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ModelStoreError(f"blob does not match its sha256 {sha256[:12]}…")
        write_bytes_atomically(self.blob_path(sha256), data)
        self.evict(keep=sha256)

    def read_blob(self, sha256: str) -> bytes:
        """The blob's bytes, checked against their hash; ModelStoreError if it is not cached
        or damaged on disk (a damaged one is removed, so that it is fetched again)."""
        path = self.blob_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelStoreError(f"blob {sha256[:12]}… is not cached") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            path.unlink(missing_ok=True)
            log.error("blob %s was damaged on disk (%d bytes that do not match its sha256):"
                      " removed, to be fetched again", sha256[:12], len(data))  # fmt: skip
            raise ModelStoreError(f"blob {sha256[:12]}… was damaged on disk; removed")
        return data

    # --- manifests ---------------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        if not valid_id(name):
            raise ModelStoreError(f"invalid model name {name!r}")
        path = self.root / "models" / name
        path.mkdir(exist_ok=True)
        return path

    def put_manifest(self, manifest: ModelManifest) -> None:
        """Keep a manifest (its blobs may still be missing); ModelStoreError for a version
        named like one of the store's own files (``current``, ``blocked``, ``..``)."""
        if manifest.version in RESERVED_VERSIONS:
            raise ModelStoreError(f"version name {manifest.version!r} is reserved on devices")
        write_bytes_atomically(self._model_dir(manifest.name) / manifest.version, encode(manifest))
        newest = self._newest.get(manifest.name)
        if newest is None or manifest.created >= newest.created:
            self._newest[manifest.name] = manifest  # (what eviction spares: being fetched)

    def manifest(self, name: str, version: str) -> ModelManifest | None:
        """A stored manifest, or None."""
        if not valid_id(version) or version in RESERVED_VERSIONS:
            return None
        path = self._model_dir(name) / version
        try:
            return decode_as(ModelManifest, path.read_bytes())
        except (FileNotFoundError, DecodeError):
            return None

    def missing(self, manifest: ModelManifest) -> list[FileEntry]:
        """The manifest's files that are not cached yet."""
        return [f for f in manifest.files if not self.has_blob(f.sha256)]

    def file(self, manifest: ModelManifest, name: str) -> bytes:
        """The bytes of one file of a manifest."""
        for entry in manifest.files:
            if entry.name == name:
                return self.read_blob(entry.sha256)
        raise ModelStoreError(f"{manifest.name} {manifest.version} has no file {name!r}")

    # --- versions ----------------------------------------------------------------------
    def _pointer(self, name: str, which: str) -> str | None:
        path = self._model_dir(name) / which
        try:
            text = path.read_bytes().decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        if text and not valid_id(text):
            log.error("model pointer %s holds no version name (%r): ignored", path, text[:40])
            return None
        return text or None

    def current(self, name: str) -> ModelManifest | None:
        """The active version's manifest, or None."""
        version = self._pointer(name, "current")
        return None if version is None else self.manifest(name, version)

    def previous(self, name: str) -> ModelManifest | None:
        """The version active before the current one, or None."""
        version = self._pointer(name, "previous")
        return None if version is None else self.manifest(name, version)

    def activate(self, manifest: ModelManifest) -> None:
        """Make `manifest` current (all its blobs must be cached); the old one becomes previous."""
        if self.missing(manifest):
            raise ModelStoreError(f"{manifest.name} {manifest.version} is not fully downloaded")
        directory = self._model_dir(manifest.name)
        current = self._pointer(manifest.name, "current")
        if current == manifest.version:
            return
        if current is not None:
            write_bytes_atomically(directory / "previous", current.encode())
        write_bytes_atomically(directory / "current", manifest.version.encode())

    def point(self, name: str, current: str, previous: str | None) -> None:
        """Set both version pointers (after a rollback or a version that failed to load)."""
        directory = self._model_dir(name)
        if previous is None:
            (directory / "previous").unlink(missing_ok=True)
        else:
            write_bytes_atomically(directory / "previous", previous.encode())
        write_bytes_atomically(directory / "current", current.encode())

    def deployed(self, name: str) -> str | None:
        """The version last deployed to this device, or None (never deployed)."""
        return self._pointer(name, "deployed")

    def set_deployed(self, name: str, version: str) -> None:
        """Record that `version` of `name` was deployed (served versions follow deploys)."""
        write_bytes_atomically(self._model_dir(name) / "deployed", version.encode())

    def block(self, name: str, version: str) -> None:
        """Never make `version` of `name` current again (it failed, or was rolled back)."""
        if version not in self.blocked(name):
            with open(self._model_dir(name) / "blocked", "a", encoding="utf-8") as f:
                f.write(version + "\n")

    def blocked(self, name: str) -> set[str]:
        """Versions of `name` that must not become current."""
        try:
            text = (self._model_dir(name) / "blocked").read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return set()
        return {line for line in text.split() if valid_id(line)}  # (damaged lines skipped)

    def names(self) -> list[str]:
        """Names of the models that have a current version, sorted."""
        return sorted(d.name for d in (self.root / "models").iterdir() if (d / "current").is_file())

    def evict(self, keep: str = "") -> int:
        """Delete the least recently written unpinned blobs while over the cap; return count.

        Pinned: the blobs of each model's current, previous and deployed version, of the
        newest manifest put since the store opened (perhaps still being fetched), and `keep`
        (just written).
        """
        pinned: set[str] = {keep}
        for manifest in self._newest.values():
            pinned |= {f.sha256 for f in manifest.files}
        for model_dir in (self.root / "models").iterdir():
            for which in ("current", "previous", "deployed"):
                version = self._pointer(model_dir.name, which)
                pointed = None if version is None else self.manifest(model_dir.name, version)
                if pointed is not None:
                    pinned |= {f.sha256 for f in pointed.files}
        blobs = sorted((self.root / "blobs").iterdir(), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in blobs)
        removed = 0
        for path in blobs:
            if total <= self.max_bytes:
                break
            if path.name in pinned or path.name.startswith("."):
                continue
            total -= path.stat().st_size
            path.unlink()
            removed += 1
        return removed
