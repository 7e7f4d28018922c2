"""An async (FedBuff) job with real agents over a real Mosquitto: one agent is held
stopped (SIGSTOP) while the other two keep the versions coming; once let go, its update
trained on an older version still counts, with its staleness recorded.

The agents follow the model from their start (``--model``), so a held device knows every
version made while it was held and can tell that the newest descends from its task's base:
it trains from the newest (``base = "latest"``). Enough rounds that the held device, whose
training child starts only once it is let go, gets an update in before the job ends."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.broker import Mosquitto
from tests.integration.fl_helpers import (
    fleet,
    get_job,
    job_spec,
    prepare_data,
    rounds_done,
    start_job,
    wait_job,
)
from tests.procs import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROUNDS = 24  # (it came in at round 8 of 40 on a 2-core machine)


def test_async_job_keeps_going_without_a_stopped_device(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    data = prepare_data(tmp_path, 3, "iid")
    with fleet(mosquitto, tmp_path, data, "--model", "digits-mlp") as (coordinator, agents):
        slow = agents[0]
        spec = job_spec("fedbuff", mode="async", async_buffer=2, rounds=ROUNDS,
                        devices_per_round=3, max_staleness=ROUNDS)  # fmt: skip
        start_job(coordinator, spec)
        slow.signal(signal.SIGSTOP)  # it holds (or is about to get) its first task
        try:
            wait_until(lambda: len(rounds_done(get_job(coordinator, "fedbuff"))) >= 3, 90)
        finally:
            slow.signal(signal.SIGCONT)
        job = wait_job(coordinator, "fedbuff", timeout=120)
        assert "Traceback" not in coordinator.output()
    assert job["state"] == "done", job["message"]
    done = rounds_done(job)
    assert [r["round"] for r in done] == list(range(1, ROUNDS + 1))
    for r in done:
        assert r["metrics"]["mode"] == "async"
        # a buffer closes at 2 updates; one arriving as it closes may still be folded in
        assert r["metrics"]["updates"] == len(r["metrics"]["contributors"]) == 2
        assert r["new_version"] == f"fedbuff.r{r['round']}"
        assert r["base_version"] == f"fedbuff.r{r['round'] - 1}"
    # the first versions were made without the held device ...
    assert all(slow.device_id not in r["metrics"]["contributors"] for r in done[:3])
    # ... and once let go, its update trained on an older version counted, down-weighted
    late = [r for r in done if slow.device_id in r["metrics"]["contributors"]]
    assert late, [r["metrics"]["contributors"] for r in done]
    assert late[0]["metrics"]["staleness_max"] >= 1
    accuracy = [r["metrics"]["accuracy"] for r in done]
    assert accuracy[-1] >= 0.8, accuracy
