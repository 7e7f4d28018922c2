"""Fixtures of the inference tests: real digits_mlp bundles exported the way the coordinator
does (two versions, the second derived without re-export), sklearn digits, a model store."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits

from agent.config import AgentConfig
from agent.inference_service import InferenceService
from agent.model_store import ModelStore
from cloud_coordinator.bundles import Bundle, file_entries, initial_bundle, next_bundle
from cloud_coordinator.templates import get_template
from protocols.model_format import MODEL_FILE

MODEL = "digits-mlp"


@dataclasses.dataclass(frozen=True)
class Bundles:
    """Versions v1 and v2 of digits-mlp (v2: a perturbed head), and raw digits pixels."""

    v1: Bundle
    v2: Bundle
    pixels: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]

    def version(self, base: Bundle, version: str, seed: int) -> Bundle:
        """Another version of `base` with a head perturbed by `seed` (no re-export)."""
        rng = np.random.default_rng(seed)
        head = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32)
                for k, v in base.head_state().items()}  # fmt: skip
        return next_bundle(base, head, version, created=1.0)


def broken(bundle: Bundle, version: str, model_bytes: bytes) -> Bundle:
    """`bundle` under another version with `model.onnx` replaced (manifest hashes match)."""
    files = {**bundle.files, MODEL_FILE: model_bytes}
    manifest = dataclasses.replace(bundle.manifest, version=version, files=file_entries(files))
    return Bundle(files, manifest)


@pytest.fixture(scope="session")
def bundles() -> Bundles:
    """Exported once per session (torch export takes a few seconds)."""
    return make_bundles()


def make_bundles() -> Bundles:
    """Versions v1 and v2 of digits-mlp, exported the way the coordinator does."""
    v1, _ = initial_bundle(get_template("digits_mlp"), MODEL, "v1", seed=0, created=1.0)
    rng = np.random.default_rng(1)
    head = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
            for k, v in v1.head_state().items()}  # fmt: skip
    v2 = next_bundle(v1, head, "v2", created=2.0)
    x, y = load_digits(return_X_y=True)
    return Bundles(v1, v2, x.astype(np.float32), y.astype(np.int64))


def put(store: ModelStore, bundle: Bundle, activate: bool = True) -> None:
    """Write a bundle's blobs and manifest into the store (and make it current)."""
    for name, data in bundle.files.items():
        entry = next(f for f in bundle.manifest.files if f.name == name)
        store.put_blob(entry.sha256, data)
    store.put_manifest(bundle.manifest)
    if activate:
        store.activate(bundle.manifest)


def agent_config(tmp_path: Path, **overrides: object) -> AgentConfig:
    """An agent config with its state under `tmp_path`."""
    values: dict[str, object] = {
        "device_id": "dev-1",
        "data_dir": str(tmp_path / "state"),
        "inference_listen": "127.0.0.1:0",
    }
    values.update(overrides)
    return AgentConfig(**values)  # type: ignore[arg-type]


def new_service(tmp_path: Path, bundle: Bundle) -> InferenceService:
    """An inference service (not started) whose store holds `bundle`, made current."""
    config = agent_config(tmp_path)
    store = ModelStore(Path(config.data_dir) / "models")
    put(store, bundle)
    return InferenceService(config, store, tmp_path / "data")


@pytest.fixture
def service(tmp_path: Path, bundles: Bundles) -> Iterator[InferenceService]:
    """A started inference service serving v1 over HTTP on a free loopback port."""
    config = agent_config(tmp_path)
    store = ModelStore(Path(config.data_dir) / "models")
    put(store, bundles.v1)
    svc = InferenceService(config, store, Path(config.data_dir) / "data")
    svc.start()
    assert svc.wait_idle(30)
    yield svc
    svc.stop()
