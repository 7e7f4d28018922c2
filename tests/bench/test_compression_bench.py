"""bench.compression keeps working: a tiny simulation end to end, and its summary figures."""

from __future__ import annotations

import json

import pytest

from bench import compression
from bench.compression import Comparison, JobResult


def test_a_tiny_run_prints_rounds_and_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--devices", "2", "--rounds", "2", "--repeats", "2", "--trials", "2"]
    compression.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert all(not line.startswith("{") for line in lines[:-1])
    # Two seeds x two jobs x two rounds, each with its progress line.
    assert sum(" round " in line for line in lines) == 8
    assert result["bench"] == "compression"
    assert (result["devices"], result["rounds"], result["seeds"]) == (2, 2, [0, 1])
    assert result["topk_fraction"] == 0.01
    assert result["topk_strategy"] == {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.5}
    for key in ("dense_accuracy", "topk_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert len(result["accuracy_drop_points_each"]) == 2
    assert result["accuracy_drop_points_max"] >= result["accuracy_drop_points"]
    # Dense f32 of a 167k-parameter head is ~670 kB an update; top-k ~1 % of it as int8.
    assert result["dense_uplink_bytes_per_job"] > 2 * 2 * 4 * 167_178
    assert result["bytes_ratio"] > 50
    assert 0.005 < result["topk_sent_fraction"] < 0.02
    assert result["encode_cost_passes"] > 0
    assert result["encode_cost_passes_warm"] > 0


def _job(scheme: str, accuracy: float, uplink: int) -> JobResult:
    return JobResult(scheme, [0.5, accuracy], uplink, 20, 1000, 10 if scheme == "topk" else 1000)


def test_summary_averages_the_seeds() -> None:
    comparisons = [
        Comparison(0, _job("f32", 0.97, 1500), _job("topk", 0.96, 10)),
        Comparison(1, _job("f32", 0.95, 1500), _job("topk", 0.95, 20)),
    ]
    cost = {"encode_s": 2.0, "pass_s": 0.5, "encode_warm_s": 3.0, "pass_warm_s": 0.25}
    result = compression.summary(comparisons, cost)
    assert result["seeds"] == [0, 1]
    assert result["dense_accuracy"] == pytest.approx(0.96)
    assert result["topk_accuracy"] == pytest.approx(0.955)
    assert result["accuracy_drop_points_each"] == [1.0, 0.0]
    assert result["accuracy_drop_points"] == pytest.approx(0.5)
    assert result["accuracy_drop_points_max"] == pytest.approx(1.0)
    assert result["bytes_ratio"] == 100.0  # totals: 3000 / 30
    assert result["bytes_ratio_min"] == 75.0
    assert result["topk_sent_fraction"] == 0.01
    assert (result["encode_cost_passes"], result["encode_cost_passes_warm"]) == (4.0, 12.0)


def test_the_topk_strategy_is_read_as_a_job_names_it() -> None:
    from cloud_coordinator.strategies.catalog import FedAvg, FedAvgM, StrategyError

    assert compression.strategy_from_text("fedavg") == FedAvg()
    assert compression.strategy_from_text(compression.TOPK_STRATEGY) == FedAvgM(momentum=0.5)
    assert compression.strategy_from_text("fedavgm:momentum=0.7,server_lr=2") == FedAvgM(
        server_lr=2.0, momentum=0.7
    )
    with pytest.raises(StrategyError, match="no parameter"):
        compression.strategy_from_text("fedavg:momentum=0.5")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        compression.strategy_from_text("fedavgm:momentum")
