"""The coordinator's deployment numbers: strictly growing, whatever the clock or a restore."""

from __future__ import annotations

import shutil
from pathlib import Path

from cloud_coordinator.deployments import DeploymentSigner
from protocols.messages import ModelManifest
from protocols.signing import generate_private_key, public_key, verify_deployment
from tests.protocols.golden_samples import samples

KEY = generate_private_key()


def _manifest() -> ModelManifest:
    manifest = samples()["manifest"]
    assert isinstance(manifest, ModelManifest)
    return manifest


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _numbers(signer: DeploymentSigner, count: int) -> list[int]:
    out = []
    for _ in range(count):
        deployment = signer.deployment("cam-1", _manifest())
        verify_deployment(deployment, public_key(KEY))
        out.append(deployment.seq)
    return out


def test_numbers_grow_when_the_clock_steps_back_or_reads_nonsense(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    signer = DeploymentSigner(tmp_path / "coordinator.db", KEY, clock)
    first = _numbers(signer, 2)
    clock.now = 1_000_000_000.0  # stepped back years
    second = _numbers(signer, 2)
    clock.now = 0.0  # (a clock that was never set)
    third = _numbers(signer, 1)
    numbers = first + second + third
    assert numbers == sorted(set(numbers)), numbers
    assert first[0] == 1_800_000_000_000  # (the clock in milliseconds)


def test_a_database_restored_from_a_backup_numbers_above_what_it_sent_since(
    tmp_path: Path,
) -> None:
    clock = Clock(1_800_000_000.0)
    db = tmp_path / "coordinator.db"
    signer = DeploymentSigner(db, KEY, clock)
    before = _numbers(signer, 3)
    signer.close()
    shutil.copy(db, tmp_path / "backup.db")  # (closed: the WAL is checkpointed into it)
    signer = DeploymentSigner(db, KEY, clock)
    clock.now += 0.001  # deployments a millisecond apart: the counter leads the clock
    sent_after_backup = _numbers(signer, 50)
    signer.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.db", db)
    clock.now += 60.0  # the restore, a minute later
    restored = DeploymentSigner(db, KEY, clock)
    (next_one,) = _numbers(restored, 1)
    assert next_one > max(before + sent_after_backup)
