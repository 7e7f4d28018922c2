"""The coordinator's signing key, and every version it publishes signed by it."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_coordinator.errors import StoreError
from cloud_coordinator.job_spec import JobSpec
from cloud_coordinator.job_store import JobStore
from cloud_coordinator.jobs import JobRunner
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.selection import Candidate
from cloud_coordinator.signing_key import (
    KEY_FILE,
    PUBLIC_FILE,
    load_existing,
    load_or_create_key,
    read_public_key,
)
from protocols.messages import ModelManifest, ModelUpdate, decode_as, encode
from protocols.signing import SignatureError, key_text, public_key, verify_manifest
from protocols.tensors import encode_dense
from tests.unit.fl.test_job_runner import FakePublisher, deltas


def test_the_key_is_made_once_private_and_reloaded(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="start the coordinator once"):
        load_existing(tmp_path)
    key = load_or_create_key(tmp_path)
    assert load_or_create_key(tmp_path) == key
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / KEY_FILE).parent.stat().st_mode) == 0o700
    assert (tmp_path / PUBLIC_FILE).read_text().strip() == key_text(public_key(key))
    assert read_public_key(tmp_path) == public_key(key)
    (tmp_path / KEY_FILE).write_text("not a key\n")
    with pytest.raises(StoreError, match="move it away"):
        load_or_create_key(tmp_path)


def test_a_key_others_can_read_is_made_private_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = load_or_create_key(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    (tmp_path / KEY_FILE).parent.chmod(0o755)
    assert load_or_create_key(tmp_path) == key
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / KEY_FILE).parent.stat().st_mode) == 0o700
    assert "mode 644 (others could read it)" in caplog.text


def test_a_lost_key_whose_public_half_devices_pinned_is_not_replaced(tmp_path: Path) -> None:
    load_or_create_key(tmp_path)
    (tmp_path / KEY_FILE).unlink()
    with pytest.raises(StoreError, match="Restore the key from a backup"):
        load_or_create_key(tmp_path)
    assert not (tmp_path / KEY_FILE).exists()
    (tmp_path / PUBLIC_FILE).unlink()  # rotating it, on purpose
    key = load_or_create_key(tmp_path)
    assert read_public_key(tmp_path) == public_key(key)


def test_cli_prints_the_public_key(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "cloud_coordinator", "public-key", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == key_text(public_key(key))
    missing = subprocess.run(
        [sys.executable, "-m", "cloud_coordinator", "public-key", "--data-dir",
         str(tmp_path / "none")], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1
    assert "start the coordinator once" in missing.stderr


def test_every_published_version_is_signed(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    trusted = {public_key(key)}
    store, models = JobStore(tmp_path / "jobs.db"), ModelRegistry(tmp_path / "models")
    publisher = FakePublisher()
    devices = ["dev-a", "dev-b"]
    runner = JobRunner(store, models, publisher, lambda: [Candidate(d, True) for d in devices],
                       device="cpu", signing_key=key)  # fmt: skip
    try:
        spec = JobSpec(job_id="signed", model_name="signed-m", rounds=1, devices_per_round=2)
        runner.create(spec)
        runner.tick()
        for n, device in enumerate(devices):
            tensors = tuple(encode_dense(k, v) for k, v in deltas(n).items())
            update = ModelUpdate(device, "signed", 1, "signed.r0", 1, 10, tensors)
            runner.on_update(device, encode(update), 1 << 24)
        runner.tick()
        manifests = [decode_as(ModelManifest, p.payload) for p in publisher.sent
                     if p.topic.endswith("/manifest")]  # fmt: skip
        assert [m.version for m in manifests] == ["signed.r0", "signed.r1"]
        for manifest in manifests:
            verify_manifest(manifest, trusted)
            assert models.manifest("signed-m", manifest.version) == manifest  # stored signed
        with pytest.raises(SignatureError):
            verify_manifest(manifests[0], {public_key(load_or_create_key(tmp_path / "other"))})
        assert json.dumps(runner.job_json("signed"))  # still JSON-ready
    finally:
        store.close()
        models.close()
