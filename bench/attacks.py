"""The attack and fault harness: what malicious or faulty devices send instead of an honest
update. Shared by `bench.byzantine` and the tests, which play such devices in-process or
over a real broker (`tests/integration/test_attacks.py`).

Malicious (well-formed, finite, meant to pull the model away):

- ``sign_flip``: ``-scale * delta`` (with ``scale`` > 1, the scaled sign flip);
- ``scaled``: ``scale * delta`` (a boosted update);
- ``noise``: Gaussian noise with the honest update's own per-tensor standard deviation
  times ``scale``, in place of the update.

Faulty (malformed; the coordinator must refuse them before they touch the aggregate):

- ``nan`` / ``inf``: one value of the first tensor set to NaN / +Inf;
- ``wrong_shape``: the first tensor flattened (same bytes, another shape);
- ``missing_tensor``: the last tensor left out;
- ``stale_base``: trained on a base version the job no longer collects.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from protocols.messages import ModelUpdate
from protocols.tensors import encode_dense

F32 = npt.NDArray[np.float32]
Delta = dict[str, F32]

ATTACKS = ("sign_flip", "scaled", "noise")
FAULTS = ("nan", "inf", "wrong_shape", "missing_tensor", "stale_base")


def attack(delta: Mapping[str, F32], kind: str, scale: float, rng: np.random.Generator) -> Delta:
    """What a malicious device sends in place of its honest `delta`; ValueError if unknown."""
    if kind == "sign_flip":
        return {name: (-scale * d).astype(np.float32) for name, d in delta.items()}
    if kind == "scaled":
        return {name: (scale * d).astype(np.float32) for name, d in delta.items()}
    if kind == "noise":
        return {
            name: (rng.standard_normal(d.shape) * (scale * float(d.std()) + 1e-6)).astype(
                np.float32
            )
            for name, d in delta.items()
        }
    raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(ATTACKS)}")


def dense_update(
    device_id: str, job_id: str, round_no: int, base_version: str, seq: int,
    num_samples: int, delta: Mapping[str, F32],
) -> ModelUpdate:  # fmt: skip
    """A dense float32 `ModelUpdate` carrying `delta`."""
    tensors = tuple(encode_dense(name, np.ascontiguousarray(d)) for name, d in delta.items())
    return ModelUpdate(device_id, job_id, round_no, base_version, seq, num_samples, tensors)


def faulty(update: ModelUpdate, kind: str, delta: Mapping[str, F32]) -> ModelUpdate:
    """`update` (which carries `delta` densely) broken in the way `kind` names."""
    names = list(delta)
    broken = {name: np.array(d, dtype=np.float32, copy=True) for name, d in delta.items()}
    if kind in ("nan", "inf"):
        broken[names[0]].reshape(-1)[0] = np.nan if kind == "nan" else np.inf
    elif kind == "wrong_shape":
        broken[names[0]] = broken[names[0]].reshape(-1)
    elif kind == "missing_tensor":
        del broken[names[-1]]
    elif kind == "stale_base":
        return dense_update(update.device_id, update.job_id, update.round, "stale.r0",
                            update.seq, update.num_samples, delta)  # fmt: skip
    else:
        raise ValueError(f"unknown fault {kind!r}; choose one of {', '.join(FAULTS)}")
    return dense_update(update.device_id, update.job_id, update.round, update.base_version,
                        update.seq, update.num_samples, broken)  # fmt: skip
