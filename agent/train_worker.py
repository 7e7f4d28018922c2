"""Training of a model's head with torch, and the loop of the training child process.

The only agent module that uses torch, and it imports torch inside its functions, so
importing it is cheap; the child started by `agent.trainer.TrainerProcess` (entry point
`child_main`) imports torch once, at start, and stays warm. Requests and results travel
between the processes as `agent.train_messages` encodes them.

`train_head` is a pure function of a request dict (also called in-process by benchmarks).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.train_messages import DEFAULTS, TrainingError, decode_message, encode_message
from protocols.errors import ProtocolError
from protocols.model_format import LayerSpec, head_shapes

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    import torch

_EVAL_BATCH = 4096


# --- torch side ----------------------------------------------------------------------------


def build_head(layers: Sequence[LayerSpec]) -> torch.nn.Sequential:
    """The head as ``torch.nn.Sequential``; its state dict matches `head_shapes(layers)`."""
    import torch

    modules: list[torch.nn.Module] = []
    for layer in layers:
        if layer.kind == "linear":
            modules.append(torch.nn.Linear(layer.inputs, layer.outputs))
        else:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


def _param(request: Mapping[str, Any], key: str) -> Any:
    return request.get(key, DEFAULTS[key])


def _check_request(
    request: Mapping[str, Any],
) -> tuple[tuple[LayerSpec, ...], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    layers = tuple(request.get("layers") or ())
    try:
        shapes = head_shapes(layers)
    except ValueError as exc:
        raise TrainingError(f"bad head layers: {exc}") from exc
    linear = [layer for layer in layers if layer.kind == "linear"]
    if not linear:
        raise TrainingError("the head has no linear layer")
    x = np.asarray(request["features"], dtype=np.float32)
    y = np.asarray(request["labels"])
    if x.ndim != 2 or x.shape[1] != linear[0].inputs:
        raise TrainingError(f"features {x.shape} do not fit a head taking {linear[0].inputs}")
    if y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise TrainingError(f"{y.shape} labels for {x.shape[0]} samples")
    if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
        raise TrainingError("labels must be integers")
    if int(y.min()) < 0 or int(y.max()) >= linear[-1].outputs:
        raise TrainingError(f"labels must lie in 0..{linear[-1].outputs - 1}")
    head = request.get("head")
    if head is not None:
        got = {name: tuple(np.shape(a)) for name, a in head.items()}
        if got != shapes:
            raise TrainingError(f"head tensors {got} do not match the layers {shapes}")
    for key in ("lr", "epochs", "batch_size"):
        if not float(_param(request, key)) > 0:
            raise TrainingError(f"{key} must be positive")
    for key in ("prox_mu", "weight_decay"):
        if not float(_param(request, key)) >= 0:
            raise TrainingError(f"{key} must not be negative")
    if not 0 <= float(_param(request, "momentum")) < 1:
        raise TrainingError("momentum must be in [0, 1)")
    return layers, x, y.astype(np.int64)


def _evaluate(model: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` on (x, y)."""
    import torch

    correct = 0
    loss = 0.0
    with torch.no_grad():
        for start in range(0, x.shape[0], _EVAL_BATCH):
            logits = model(x[start : start + _EVAL_BATCH])
            target = y[start : start + _EVAL_BATCH]
            loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    n = max(1, int(x.shape[0]))
    return correct / n, loss / n


def _sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    velocity: list[torch.Tensor],
    lr: float,
    momentum: float,
    decay: float,
) -> None:
    """One step of ``torch.optim.SGD`` (momentum, weight decay, no dampening or Nesterov).

    Written out because the first ``torch.optim`` optimizer imports torch._dynamo: seconds
    and hundreds of modules on a small device, for nothing a head needs.
    """
    import torch

    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            step = g.add(p, alpha=decay) if decay else g
            if momentum:
                if len(velocity) <= i:
                    velocity.append(step.clone())
                else:
                    velocity[i].mul_(momentum).add_(step)
                step = velocity[i]
            p.add_(step, alpha=-lr)


def train_head(request: Mapping[str, Any]) -> dict[str, Any]:
    """Train the head on the request's features; return ``{"head": ..., "metrics": ...}``.

    Metrics: ``train_loss`` (mean over the last epoch's batches), ``samples`` (training
    set size, the FedAvg weight), ``samples_seen``, ``steps``, ``epochs_done`` (complete
    epochs), ``stopped_by_time``, ``train_seconds``, and with a validation split
    ``val_samples``, ``val_acc_before``/``val_loss_before`` (the base head) and
    ``val_acc_after``/``val_loss_after``. Stops between batches once ``max_seconds`` have
    passed since the call (at least one batch runs). TrainingError for a bad request.
    """
    import torch

    started = time.monotonic()
    layers, features, labels = _check_request(request)
    threads = _param(request, "threads")
    if threads is not None:
        torch.set_num_threads(int(threads))
    seed = int(_param(request, "seed"))
    torch.manual_seed(seed)
    model = build_head(layers)
    head = request.get("head")
    if head is not None:
        state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in head.items()}
        model.load_state_dict(state)
    x = torch.from_numpy(np.array(features, dtype=np.float32))
    y = torch.from_numpy(labels)
    metrics: dict[str, Any] = {}
    val = None
    if request.get("val_features") is not None and request.get("val_labels") is not None:
        val = (
            torch.from_numpy(np.array(request["val_features"], dtype=np.float32)),
            torch.from_numpy(np.asarray(request["val_labels"]).astype(np.int64)),
        )
        metrics["val_samples"] = int(val[1].shape[0])
        metrics["val_acc_before"], metrics["val_loss_before"] = _evaluate(model, *val)

    lr = float(_param(request, "lr"))
    prox = lr * float(_param(request, "prox_mu"))
    base = [p.detach().clone() for p in model.parameters()] if prox > 0 else []
    params = list(model.parameters())
    momentum = float(_param(request, "momentum"))
    decay = float(_param(request, "weight_decay"))
    velocity: list[torch.Tensor] = []
    max_seconds = _param(request, "max_seconds")
    deadline = math.inf if max_seconds is None else started + float(max_seconds)
    batch = int(_param(request, "batch_size"))
    generator = torch.Generator().manual_seed(seed)
    n = int(x.shape[0])
    steps = seen = epochs_done = 0
    epoch_loss = 0.0
    epoch_seen = 0
    stopped = False
    model.train()
    for _ in range(int(_param(request, "epochs"))):
        order = torch.randperm(n, generator=generator)
        epoch_loss, epoch_seen = 0.0, 0
        for start in range(0, n, batch):
            if steps and time.monotonic() >= deadline:
                stopped = True
                break
            index = order[start : start + batch]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            grads = torch.autograd.grad(loss, params)
            _sgd_step(params, grads, velocity, lr, momentum, decay)
            if prox > 0:  # FedProx as an exact proximal step: stable for any mu
                with torch.no_grad():
                    for p, p0 in zip(params, base, strict=True):
                        p.add_(p0, alpha=prox).div_(1.0 + prox)
            steps += 1
            seen += int(index.shape[0])
            epoch_seen += int(index.shape[0])
            epoch_loss += loss.detach().item() * int(index.shape[0])
        if stopped:
            break
        epochs_done += 1
    if not math.isfinite(epoch_loss) or not all(bool(p.isfinite().all()) for p in params):
        raise TrainingError(f"training diverged (loss {epoch_loss / max(1, epoch_seen)})")
    model.eval()
    metrics.update(
        train_loss=epoch_loss / max(1, epoch_seen),
        samples=n,
        samples_seen=seen,
        steps=steps,
        epochs_done=epochs_done,
        stopped_by_time=stopped,
        train_seconds=time.monotonic() - started,
    )
    if val is not None:
        metrics["val_acc_after"], metrics["val_loss_after"] = _evaluate(model, *val)
    new_head = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    return {"head": new_head, "metrics": metrics}


# --- messages between the daemon and the child ------------------------------------------

# --- the child's loop ----------------------------------------------------------------------

#: What a request may raise that the worker reports back instead of dying.
_REQUEST_ERRORS = (TrainingError, ProtocolError, ValueError, TypeError, KeyError, RuntimeError)


def _serve(payload: bytes) -> bytes | None:
    """The reply to one request, or None when asked to exit."""
    try:
        op, request = decode_message(payload)
        if op == "exit":
            return None
        if op != "train":
            raise TrainingError(f"unknown op {op!r}")
        return encode_message("result", train_head(request))
    except _REQUEST_ERRORS as exc:
        return encode_message("error", {"error": f"{type(exc).__name__}: {exc}"})


def worker_main(
    conn: Connection,
    threads: int = 1,
    idle_timeout_s: float = 120.0,
    parent_check_s: float = 1.0,
) -> None:
    """Serve training requests on `conn` until the pipe closes, ``exit``, idleness or orphaning."""
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    parent = os.getppid()
    last = time.monotonic()
    try:
        try:
            conn.send_bytes(encode_message("ready", {}))
        except OSError:
            return  # the parent died before its child was ready (a kill -9): nothing to say
        while True:
            idle = time.monotonic() - last
            if idle >= idle_timeout_s or os.getppid() != parent:
                return
            try:
                if not conn.poll(min(parent_check_s, idle_timeout_s - idle)):
                    continue
                payload = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the parent closed its end or died
            reply = _serve(payload)
            if reply is None:
                return
            try:
                conn.send_bytes(reply)
            except OSError:
                return
            last = time.monotonic()
    finally:
        conn.close()


def yield_to_the_daemon(nice: int) -> None:
    """Lower this process's priority by `nice` and mark it CPU-bound (``SCHED_BATCH``)."""
    if nice:
        os.nice(nice)
    if hasattr(os, "sched_setscheduler"):  # Linux
        with contextlib.suppress(OSError):  # a sandbox may refuse; priority is a hint
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def child_main(argv: Sequence[str]) -> None:
    """The child's entry: ``FD THREADS IDLE_TIMEOUT_S PARENT_CHECK_S NICE`` -> `worker_main`."""
    from multiprocessing.connection import Connection

    fd, threads, idle, check, nice = argv
    yield_to_the_daemon(int(nice))
    worker_main(Connection(int(fd)), int(threads), float(idle), float(check))
