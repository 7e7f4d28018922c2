"""Which version a task trains from: the task's base, or (async jobs, ``base = "latest"``)
the newest version this device holds that descends from it.

A version descends from the base when walking ``parent_version`` from it reaches the base.
The walk starts at the newest version the device knows of and moves towards the base; the
first version on the way whose files are all here is the one to train from. Pure: the
manifests come through `lookup`, completeness through `complete`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from protocols.messages import ModelManifest, TrainTask

LATEST = "latest"
MAX_WALK = 10_000  # a lineage longer than this is treated as broken (and cycles end)


def wants_latest(task: TrainTask) -> bool:
    """True when the task may train from a newer version than its base (async jobs)."""
    return task.hyperparams.get("base") == LATEST


def lineage(
    head: ModelManifest, base_version: str, lookup: Callable[[str], ModelManifest | None]
) -> list[ModelManifest] | None:
    """The versions from `head` back to `base_version` (both included, newest first), or
    None when `head` does not descend from it (or a manifest on the way is not here)."""
    chain = [head]
    seen = {head.version}
    while chain[-1].version != base_version:
        parent = chain[-1].parent_version
        if parent is None or parent in seen or len(chain) >= MAX_WALK:
            return None
        manifest = lookup(parent)
        if manifest is None:
            return None
        seen.add(parent)
        chain.append(manifest)
    return chain


def newest_descendant(
    heads: Iterable[ModelManifest | None],
    base_version: str,
    lookup: Callable[[str], ModelManifest | None],
    complete: Callable[[ModelManifest], bool],
) -> ModelManifest | None:
    """The newest complete version on the lineage of a head (newest known versions, best
    first) that descends from `base_version`; None if none does, or none complete yet."""
    for head in heads:
        if head is None:
            continue
        chain = lineage(head, base_version, lookup)
        if chain is None:
            continue
        for manifest in chain:
            if complete(manifest):
                return manifest
    return None
