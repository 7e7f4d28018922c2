"""Shared set-up of the inference benchmarks: digits_mlp versions exported the way the
coordinator exports them, written into an agent model store, and an inference service."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits

from agent.config import AgentConfig
from agent.inference_service import InferenceService
from agent.model_store import ModelStore
from cloud_coordinator.bundles import Bundle, initial_bundle, next_bundle
from cloud_coordinator.templates import get_template

MODEL = "digits-mlp"


def digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """sklearn digits: raw pixels (0-16, what an application sends) and labels."""
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def versions(count: int, seed: int = 0) -> list[Bundle]:
    """`count` versions of digits-mlp: one export, the rest derived with perturbed heads."""
    first, _ = initial_bundle(get_template("digits_mlp"), MODEL, "v0", seed=seed, created=0.0)
    out = [first]
    rng = np.random.default_rng(seed)
    for i in range(1, count):
        head = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32)
                for k, v in first.head_state().items()}  # fmt: skip
        out.append(next_bundle(first, head, f"v{i}", created=float(i)))
    return out


def put(store: ModelStore, bundle: Bundle) -> None:
    """Write a version into the store and make it current."""
    for entry in bundle.manifest.files:
        store.put_blob(entry.sha256, bundle.files[entry.name])
    store.put_manifest(bundle.manifest)
    store.activate(bundle.manifest)


def service(
    root: Path, bundle: Bundle, listen: str = "127.0.0.1:0", recent_mb: int = 4
) -> InferenceService:
    """A started inference service under `root` serving `bundle`, its API on `listen`."""
    config = AgentConfig(
        device_id="bench", data_dir=str(root), inference_listen=listen,
        inference_recent_mb=recent_mb,
    )  # fmt: skip
    store = ModelStore(root / "models")
    put(store, bundle)
    svc = InferenceService(config, store, root / "data")
    svc.start()
    if not svc.wait_idle(60) or svc.runtime.serving is None:
        raise RuntimeError("the inference service did not load the model")
    return svc
