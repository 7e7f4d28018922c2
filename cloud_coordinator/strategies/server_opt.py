"""Server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) stepping the global head.

The round's aggregate Δ (the weighted mean of the updates) is read as a pseudo-gradient
``g = -Δ``, so a plain SGD step with lr 1 gives FedAvg's ``head + Δ``. Each optimiser does
what torch's own does to a parameter whose ``.grad`` is ``g``: FedAvgM is
``torch.optim.SGD(lr, momentum)`` (no dampening, no Nesterov), FedAdam is
``torch.optim.Adam(lr, (beta1, beta2), eps)`` with its bias correction, FedAdagrad is
``torch.optim.Adagrad(lr, eps, initial_accumulator_value)`` without lr decay, and FedYogi
is that Adam with Yogi's second moment ``v -= (1 - beta2) * g^2 * sign(v - g^2)``.

The moments live flat on the aggregation device; `state` / `load_state` carry them (and
the step count) as named numpy arrays, ``"<slot>/<tensor name>"`` and ``"step"``, so the
coordinator can persist them across restarts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import torch

from cloud_coordinator.aggregation import AggregationError, FloatArray, all_finite
from cloud_coordinator.strategies import kernels
from cloud_coordinator.strategies.catalog import FedAdagrad, FedAdam, FedAvgM, FedYogi

STEP_KEY = "step"


class ServerOptimiser(ABC):
    """A stateful server step: new head from the head and the round's aggregate Δ."""

    slots: ClassVar[tuple[str, ...]]  # names of the per-tensor state (moments)
    nonnegative: ClassVar[frozenset[str]] = frozenset()  # slots that must stay >= 0
    initial: float = 0.0  # what every slot starts at

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], device: torch.device) -> None:
        self._shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self._device = torch.device(device)
        self._state = {
            slot: {
                name: torch.full((math.prod(shape),), self.initial, device=self._device)
                for name, shape in self._shapes.items()
            }
            for slot in self.slots
        }
        self._step = 0

    @property
    def steps(self) -> int:
        """Steps taken so far (restored by `load_state`)."""
        return self._step

    def _flat(self, arrays: Mapping[str, npt.ArrayLike], what: str) -> dict[str, torch.Tensor]:
        """Each named array flat float32 on the device, checked against the model."""
        if set(arrays) != set(self._shapes):
            raise AggregationError(
                f"{what} tensors {sorted(arrays)} do not match the model's {sorted(self._shapes)}",
                reason="bad_tensor",
            )
        out = {}
        for name, shape in self._shapes.items():
            array = np.array(arrays[name], dtype=np.float32)  # our own, writable copy
            if array.shape != shape:
                raise AggregationError(
                    f"{what} tensor {name!r}: shape {array.shape} where the model has {shape}",
                    reason="bad_shape",
                )
            out[name] = torch.from_numpy(array.reshape(-1)).to(self._device)
        if not all_finite(list(out.values())):
            raise AggregationError(f"{what} holds NaN or Inf", reason="non_finite")
        return out

    def step(
        self, head: Mapping[str, npt.ArrayLike], delta: Mapping[str, npt.ArrayLike]
    ) -> dict[str, FloatArray]:
        """The new float32 head after one step on g = -delta; state advances on the device."""
        params, grads = self._flat(head, "head"), self._flat(delta, "delta")
        self._step += 1
        for name, param in params.items():
            self._apply(name, param, grads[name].neg_())
        return {name: p.view(self._shapes[name]).cpu().numpy() for name, p in params.items()}

    @abstractmethod
    def _apply(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Step one flat parameter in place with its gradient, using `self._step`."""

    def state(self) -> dict[str, FloatArray | npt.NDArray[np.int64]]:
        """Every moment as ``"<slot>/<name>"`` (model shape, float32) and ``"step"`` (0-d)."""
        out: dict[str, FloatArray | npt.NDArray[np.int64]] = {
            STEP_KEY: np.array(self._step, dtype=np.int64)
        }
        for slot, tensors in self._state.items():
            for name, t in tensors.items():
                out[f"{slot}/{name}"] = t.to("cpu", copy=True).numpy().reshape(self._shapes[name])
        return out

    def load_state(self, state: Mapping[str, npt.ArrayLike]) -> None:
        """Take the state `state()` gave (this model's); AggregationError and no change if not."""
        expected = {STEP_KEY} | {f"{s}/{n}" for s in self.slots for n in self._shapes}
        if set(state) != expected:
            missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
            raise AggregationError(
                f"optimiser state does not fit the model: missing {missing}, unknown {unknown}",
                reason="bad_state",
            )
        step = np.asarray(state[STEP_KEY])
        if step.size != 1 or step.dtype.kind not in "iu" or int(step.reshape(-1)[0]) < 0:
            raise AggregationError(
                f"optimiser state 'step' must be one integer >= 0, got {step!r}",
                reason="bad_state",
            )
        loaded: dict[str, dict[str, torch.Tensor]] = {}
        for slot in self.slots:
            loaded[slot] = {}
            for name, shape in self._shapes.items():
                key = f"{slot}/{name}"
                array = np.asarray(state[key])
                if array.shape != shape or array.dtype.kind != "f":
                    raise AggregationError(
                        f"optimiser state {key!r}: {array.dtype} {array.shape}, want float {shape}",
                        reason="bad_state",
                    )
                flat = array.astype(np.float32).reshape(-1)  # a writable copy
                if not np.isfinite(flat).all() or (slot in self.nonnegative and (flat < 0).any()):
                    raise AggregationError(
                        f"optimiser state {key!r} holds NaN, Inf or a negative moment",
                        reason="bad_state",
                    )
                loaded[slot][name] = torch.from_numpy(flat).to(self._device)
        self._state = loaded
        self._step = int(step.reshape(-1)[0])


class FedAvgMOptimiser(ServerOptimiser):
    """torch.optim.SGD(lr=server_lr, momentum=momentum) on the pseudo-gradient."""

    slots = ("momentum_buffer",)

    def __init__(
        self, params: FedAvgM, shapes: Mapping[str, tuple[int, ...]], device: torch.device
    ) -> None:
        self.params = params
        super().__init__(shapes, device)

    def _apply(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        p = self.params
        buf = self._state["momentum_buffer"][name]
        kernels.sgd_momentum_step(
            param, grad, buf, lr=p.server_lr, momentum=p.momentum, device=self._device
        )


class FedAdamOptimiser(ServerOptimiser):
    """torch.optim.Adam(lr=server_lr, betas=(beta1, beta2), eps=eps) on the pseudo-gradient."""

    slots = ("exp_avg", "exp_avg_sq")
    nonnegative = frozenset({"exp_avg_sq"})

    def __init__(
        self,
        params: FedAdam | FedYogi,
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device,
    ) -> None:
        self.params = params
        super().__init__(shapes, device)

    def _apply(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        p, s = self.params, self._state
        step = kernels.yogi_step if isinstance(p, FedYogi) else kernels.adam_step
        step(
            param,
            grad,
            s["exp_avg"][name],
            s["exp_avg_sq"][name],
            step=self._step,
            lr=p.server_lr,
            beta1=p.beta1,
            beta2=p.beta2,
            eps=p.eps,
            device=self._device,
        )


class FedYogiOptimiser(FedAdamOptimiser):
    """Adam's step and bias correction with Yogi's additive second-moment update."""

    def __init__(
        self, params: FedYogi, shapes: Mapping[str, tuple[int, ...]], device: torch.device
    ) -> None:
        super().__init__(params, shapes, device)


class FedAdagradOptimiser(ServerOptimiser):
    """torch.optim.Adagrad(lr=server_lr, eps=eps, initial_accumulator_value=...)."""

    slots = ("sum",)
    nonnegative = frozenset({"sum"})

    def __init__(
        self, params: FedAdagrad, shapes: Mapping[str, tuple[int, ...]], device: torch.device
    ) -> None:
        self.params = params
        self.initial = params.initial_accumulator
        super().__init__(shapes, device)

    def _apply(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        p = self.params
        kernels.adagrad_step(
            param, grad, self._state["sum"][name], lr=p.server_lr, eps=p.eps, device=self._device
        )


__all__ = [
    "STEP_KEY",
    "FedAdagradOptimiser",
    "FedAdamOptimiser",
    "FedAvgMOptimiser",
    "FedYogiOptimiser",
    "ServerOptimiser",
]
