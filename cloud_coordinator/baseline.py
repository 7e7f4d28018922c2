"""Server-side training: fit a template's frozen backbone, and the centralized baseline.

`fit_backbone` prepares the backbone on the server's pretraining split, never on holdout or
device data (`server_backbone` takes that split for a seed): a ``standardize`` backbone
takes the split's mean and scale; a ``conv`` backbone is trained jointly with a throw-away
head, then frozen. `train_centralized` trains the head on pooled data with the backbone
frozen: what federated training is measured against ("centralized training on the pooled
data"). `run_baseline` does both on a template's standard split and reports the holdout
accuracy. Training runs on one torch thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from cloud_coordinator import datasets
from cloud_coordinator.templates import Standardize, Template

HeadState = dict[str, npt.NDArray[np.float32]]
_PRETRAIN_EPOCHS = 60


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run torch ops on `count` threads, then restore the previous setting.

    These models are tiny: on a busy two-core host, two spinning threads made training
    ten times slower than one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _fit(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> None:
    """Minibatch Adam on cross-entropy over the trainable parameters of `model`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = _generator(seed)
    model.train()
    with _threads(1):
        _epochs(model, optimizer, inputs, labels, epochs, batch_size, generator)
    model.eval()


def _epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs[rows]), labels[rows])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()


def features(backbone: torch.nn.Module | None, x: npt.NDArray[np.floating]) -> torch.Tensor:
    """What the head sees: `backbone` applied to `x` (or `x` itself when there is none)."""
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if backbone is None:
        return inputs
    with torch.no_grad():
        out: torch.Tensor = backbone.eval()(inputs)
    return out


def fit_backbone(
    template: Template,
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.integer],
    seed: int,
    *,
    epochs: int = _PRETRAIN_EPOCHS,
    lr: float = 3e-3,
) -> torch.nn.Module | None:
    """The template's backbone fitted on server samples `x`, `y`, frozen; None if it has none."""
    backbone = template.build_backbone(seed)
    if isinstance(backbone, Standardize):
        backbone.fit(x)
    elif backbone is not None:
        backbone.requires_grad_(True)
        model = torch.nn.Sequential(backbone, template.build_head(seed + 7))
        inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
        _fit(model, inputs, labels, epochs=epochs, lr=lr, batch_size=32, seed=seed)
        backbone.requires_grad_(False)
        backbone.eval()
    return backbone


def server_backbone(template: Template, seed: int) -> torch.nn.Module | None:
    """The backbone fitted on ``server_data(template, seed).pretrain``; same seed, same one."""
    if template.backbone == "none":
        return None
    pretrain = datasets.server_data(template, seed).pretrain
    return fit_backbone(template, pretrain.x, pretrain.y, seed)


def train_centralized(
    template: Template,
    x_train: npt.NDArray[np.floating],
    y_train: npt.NDArray[np.integer],
    epochs: int = 20,
    seed: int = 0,
    lr: float = 2e-3,
    *,
    backbone: torch.nn.Module | None = None,
    batch_size: int = 32,
) -> HeadState:
    """Train a fresh head (``build_head(seed)``) on pooled samples through `backbone`."""
    head = template.build_head(seed)
    inputs = features(backbone, x_train)
    labels = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    _fit(head, inputs, labels, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return {k: v.detach().numpy().astype(np.float32) for k, v in head.state_dict().items()}


def head_accuracy(
    template: Template,
    backbone: torch.nn.Module | None,
    head_state: HeadState,
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.integer],
) -> float:
    """Share of samples `x` that the backbone and head (in torch) classify as `y`."""
    head = template.build_head()
    head.load_state_dict({k: torch.from_numpy(v) for k, v in head_state.items()})
    with torch.no_grad():
        predicted = head.eval()(features(backbone, x)).argmax(dim=1).numpy()
    return float((predicted == np.asarray(y)).mean())


@dataclass(frozen=True, eq=False)
class BaselineResult:
    """The centralized baseline of one template and seed."""

    template: str
    seed: int
    backbone: torch.nn.Module | None
    head_state: HeadState
    train_samples: int
    holdout_accuracy: float
    seconds: float


def run_baseline(template: Template, seed: int = 0, epochs: int = 20) -> BaselineResult:
    """Fit the backbone on the server split, train on the whole device pool, test on holdout."""
    started = time.perf_counter()
    server = datasets.server_data(template, seed)
    pool = datasets.device_pool(template, seed)
    backbone = server_backbone(template, seed)
    head_state = train_centralized(template, pool.x, pool.y, epochs, seed, backbone=backbone)
    accuracy = head_accuracy(template, backbone, head_state, server.holdout.x, server.holdout.y)
    seconds = time.perf_counter() - started
    return BaselineResult(template.name, seed, backbone, head_state, len(pool), accuracy, seconds)
