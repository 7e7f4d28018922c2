"""`fedge-coordinator demo` end to end: broker, coordinator and agents as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# wallclock: the demo's canary rollout is judged on prediction latency (canary vs the rest),
# which a busy machine (the other tests, on parallel workers) can push over its limit.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.wallclock]


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "cloud_coordinator", "demo", "--workdir", str(tmp_path / "demo"),
         "--agents", "3", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_demo_trains_a_model_and_ends_with_a_json_summary(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--rounds", "3", "--embedded", "mosquitto")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "broker: mosquitto" in out
    assert "all 3 agents online" in out
    assert "round   3/3" in out
    for i in (1, 2, 3):
        assert f"agent-0{i}   offline (shutdown)" in out
    assert "all processes stopped cleanly" in out
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("final_accuracy", "baseline_accuracy", "seconds_per_round", "uplink_bytes",
                "dense_bytes"):  # fmt: skip
        assert key in summary
    assert summary["rounds"] == 3
    assert summary["final_accuracy"] > 0.8
    assert summary["baseline_accuracy"] > 0.95
    # the last act: an agent serves the model locally, and a canary rollout is promoted
    assert "serves digits-mlp demo.r3 locally" in out
    assert "rollout promoted: canary healthy" in out
    assert summary["rollout"] == "promoted"


def test_demo_over_the_embedded_mqtt_3_1_1_broker(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--rounds", "2", "--embedded", "amqtt", "--compression", "topk")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "broker: amqtt" in out
    assert "(MQTT 3.1.1)" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rounds"] == 2
    assert summary["compression"] == "topk"
    assert summary["uplink_bytes"] * 20 < summary["dense_bytes"]
