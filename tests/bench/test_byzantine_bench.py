"""bench.byzantine keeps working (a tiny run end to end), and the attack harness does what
it says: malicious deltas stay finite, faulty updates are refused by the aggregate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import byzantine
from bench.attacks import ATTACKS, FAULTS, attack, dense_update, faulty
from cloud_coordinator.aggregation import AggregationError, StreamingFedAvg
from protocols.messages import ModelUpdate, decode_as, encode

SHAPES = {"w": (3, 4), "b": (3,)}


def test_a_tiny_run_prints_rounds_and_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    byzantine.main(["--devices", "4", "--malicious", "1", "--rounds", "2",
                    "--rules", "median,multi_krum"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert sum(" round " in line for line in lines) == 4 * 2  # clean, fedavg, two rules
    assert (result["devices"], result["malicious"], result["rounds"]) == (4, 1, 2)
    for key in ("clean_accuracy", "fedavg_accuracy", "median_accuracy", "multi_krum_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["robust_rule"] in ("median", "multi_krum")
    drops = (result["median_drop_points"], result["multi_krum_drop_points"])
    assert result["robust_drop_points"] == min(drops)
    assert result["robust_worst_drop_points"] == max(drops)


def _delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


@pytest.mark.parametrize("kind", ATTACKS)
def test_attacks_are_finite_and_well_formed(kind: str) -> None:
    honest = _delta(0)
    sent = attack(honest, kind, 10.0, np.random.default_rng(1))
    assert {n: a.shape for n, a in sent.items()} == {n: a.shape for n, a in honest.items()}
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in sent.values())
    if kind == "sign_flip":
        np.testing.assert_allclose(sent["w"], -10 * honest["w"])
    aggregate = StreamingFedAvg(SHAPES, torch.device("cpu"))
    aggregate.add(dense_update("d", "j", 1, "v", 1, 5, sent).tensors, 5.0)  # accepted
    with pytest.raises(ValueError, match="sign_flip"):
        attack(honest, "nope", 1.0, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("nan", "non_finite"), ("inf", "non_finite"), ("wrong_shape", "bad_shape"),
     ("missing_tensor", "bad_tensor")],
)  # fmt: skip
def test_faults_are_refused_before_they_touch_the_aggregate(kind: str, reason: str) -> None:
    good = dense_update("d", "j", 1, "v", 1, 5, _delta(0))
    bad = decode_as(ModelUpdate, encode(faulty(good, kind, _delta(0))), 1 << 20)
    aggregate = StreamingFedAvg(SHAPES, torch.device("cpu"))
    aggregate.add(good.tensors, 1.0)
    before = aggregate.result()
    with pytest.raises(AggregationError) as info:
        aggregate.add(bad.tensors, 1.0)
    assert info.value.reason == reason
    after = aggregate.result()
    assert all(np.array_equal(before[n], after[n]) for n in SHAPES)


def test_stale_base_changes_only_the_base_version() -> None:
    good = dense_update("d", "j", 1, "v", 1, 5, _delta(0))
    stale = faulty(good, "stale_base", _delta(0))
    assert stale.base_version != good.base_version
    assert (stale.round, stale.seq, stale.tensors) == (good.round, good.seq, good.tensors)
    assert set(FAULTS) >= {"stale_base", "nan"}
