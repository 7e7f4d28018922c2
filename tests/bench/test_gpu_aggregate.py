"""bench.gpu_aggregate keeps working: a tiny run on this machine's device and its JSON line."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_aggregate


def test_a_tiny_run_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_aggregate.main(["--updates", "12", "--params", "1000", "--trials", "2", "--inner", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert all(not line.startswith("{") for line in lines[:-1])
    assert (result["bench"], result["updates"], result["params"]) == ("gpu_aggregate", 12, 1000)
    assert result["byzantine"] == 1
    for key in ("copy_ms", "read_ms", "sum_ms", "median_ms", "multi_krum_ms"):
        assert result[key] > 0
    assert result["sum_bandwidth_fraction"] > 0
    if torch.cuda.is_available():
        assert result["device"] == "cuda"
        assert result["median_speedup"] > 0
        assert result["krum_speedup"] > 0
        assert result["gpu_matches_cpu"] is True
    else:
        assert result["device"] == "cpu"
        assert result["median_speedup"] is None
        assert result["krum_speedup"] is None
        assert "no GPU" in result["note"]


def test_multi_krum_helper_matches_the_rule() -> None:
    cpu = torch.device("cpu")
    rows = torch.tensor([[0.0], [1.0], [2.0], [4.0], [100.0]])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # f = 1 keeps rows 0-3 (see tests/strategies): (0*1 + 1*2 + 2*3 + 4*4) / 10
    out = gpu_aggregate.multi_krum(rows, weights, 1, cpu)
    assert out.tolist() == pytest.approx([2.4])


def test_too_few_updates_for_krum_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        gpu_aggregate.main(["--updates", "4", "--params", "10", "--byzantine", "1"])
