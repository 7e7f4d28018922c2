"""`fedge-coordinator demo` end to end: broker, coordinator and agents as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("embedded", ["mosquitto", "amqtt"])
def test_demo_brings_three_agents_online_and_stops_cleanly(embedded: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "cloud_coordinator", "demo", "--duration", "6",
         "--embedded", embedded, "--workdir", str(tmp_path / "demo")],
        env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"broker: {embedded}" in out
    assert "all 3 agents online" in out
    assert "3 of 3 devices online" in out
    for i in (1, 2, 3):
        assert f"agent-0{i}   offline (shutdown)" in out
    assert "all processes stopped cleanly" in out
