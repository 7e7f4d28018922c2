"""Which version an async task trains from: the newest complete descendant of its base."""

from __future__ import annotations

from agent.lineage import lineage, newest_descendant, wants_latest
from protocols.messages import FileEntry, ModelManifest, TrainTask

SHA = "ab" * 32


def _m(version: str, parent: str | None) -> ModelManifest:
    files = (FileEntry("model.onnx", SHA, 1),)
    return ModelManifest("m", version, 1.0, files, (), (), parent_version=parent)


# r0 <- r1 <- r2 <- r3, and an unrelated line x0 <- x1
VERSIONS = {m.version: m for m in (_m("r0", None), _m("r1", "r0"), _m("r2", "r1"),
                                   _m("r3", "r2"), _m("x0", None), _m("x1", "x0"))}  # fmt: skip


def _choose(heads: list[str | None], base: str, complete: set[str]) -> str | None:
    chosen = newest_descendant(
        [VERSIONS[h] if h else None for h in heads],
        base,
        VERSIONS.get,
        lambda m: m.version in complete,
    )
    return chosen.version if chosen else None


def test_the_newest_complete_descendant_is_chosen() -> None:
    assert _choose(["r3"], "r1", {"r0", "r1", "r2", "r3"}) == "r3"


def test_an_incomplete_head_falls_back_to_the_newest_complete_ancestor() -> None:
    assert _choose(["r3"], "r1", {"r1", "r2"}) == "r2"
    assert _choose(["r3"], "r1", {"r1"}) == "r1"


def test_nothing_complete_or_not_descending_gives_none() -> None:
    assert _choose(["r3"], "r1", set()) is None
    assert _choose(["x1"], "r1", {"x0", "x1"}) is None
    assert _choose(["r1"], "r2", {"r1", "r2"}) is None  # the head is older than the base
    assert _choose([None], "r1", {"r1"}) is None


def test_the_first_descending_head_wins_and_others_are_tried() -> None:
    assert _choose(["x1", "r2"], "r0", {"r0", "r2", "x1"}) == "r2"
    assert _choose([None, "r3"], "r3", {"r3"}) == "r3"  # the base itself


def test_a_gap_in_the_lineage_or_a_cycle_gives_none() -> None:
    gap = {k: v for k, v in VERSIONS.items() if k != "r2"}
    assert lineage(VERSIONS["r3"], "r0", gap.get) is None
    loop = {"a": _m("a", "b"), "b": _m("b", "a")}
    assert lineage(loop["a"], "zz", loop.get) is None
    assert [m.version for m in lineage(VERSIONS["r3"], "r1", VERSIONS.get) or []] == [
        "r3", "r2", "r1",
    ]  # fmt: skip


def test_only_base_latest_tasks_may_move_on() -> None:
    task = TrainTask("t", "j", 1, "m", "r0", 0.0, hyperparams={"base": "latest"})
    assert wants_latest(task)
    assert not wants_latest(TrainTask("t", "j", 1, "m", "r0", 0.0))
