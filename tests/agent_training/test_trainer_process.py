"""TrainerProcess with a real child: results, errors, restarts, timeouts, idle and orphan exit."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import train_worker
from agent.train_worker import train_head
from agent.trainer import TrainerProcess, TrainingError, TrainingTimeoutError, WorkerCrashedError
from tests.agent_training.conftest import MLP, Digits

ROOT = Path(__file__).resolve().parents[2]
START_S = 120.0  # importing torch in a fresh child on a busy CI machine


def _request(digits: Digits, **overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "features": digits.x_train,
        "labels": digits.y_train,
        "val_features": digits.x_val,
        "val_labels": digits.y_val,
        "layers": MLP,
        "epochs": 1,
    }
    request.update(overrides)
    return request


def _gone(pid: int, within: float) -> bool:
    """True once `pid` has exited (a zombie counts as exited) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def trainer() -> Iterator[TrainerProcess]:
    """One warm child shared by the tests that leave it alive."""
    with TrainerProcess(threads=1, idle_timeout_s=300) as process:
        process.start(timeout=START_S)
        yield process


def test_the_child_computes_what_train_head_computes(
    trainer: TrainerProcess, digits: Digits
) -> None:
    request = _request(digits, seed=3)
    result = trainer.train(request, timeout=START_S)
    local = train_head({**request, "threads": 1})
    assert result["metrics"]["val_acc_after"] == pytest.approx(local["metrics"]["val_acc_after"])
    assert result["metrics"]["samples"] == len(digits.y_train)
    for name, array in local["head"].items():
        np.testing.assert_allclose(result["head"][name], array, rtol=1e-5, atol=1e-6)


def test_a_bad_request_is_an_error_and_the_child_lives_on(
    trainer: TrainerProcess, digits: Digits
) -> None:
    pid = trainer.pid
    with pytest.raises(TrainingError, match="labels must lie") as info:
        trainer.train(_request(digits, labels=digits.y_train + 10), timeout=START_S)
    assert not isinstance(info.value, WorkerCrashedError)
    assert trainer.pid == pid
    assert trainer.train(_request(digits, epochs=1), timeout=START_S)["metrics"]["steps"] > 0
    assert trainer.pid == pid


@pytest.mark.slow
def test_a_killed_child_is_restarted(digits: Digits) -> None:
    with TrainerProcess(idle_timeout_s=300) as trainer:
        trainer.train(_request(digits), timeout=START_S)
        first = trainer.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert _gone(first, within=10)
        result = trainer.train(_request(digits), timeout=START_S)
        assert result["metrics"]["steps"] > 0
        assert trainer.starts == 2
        assert trainer.pid not in (None, first)


@pytest.mark.slow
def test_a_stuck_request_times_out_and_the_child_is_killed(digits: Digits) -> None:
    with TrainerProcess(idle_timeout_s=300) as trainer:
        trainer.start(timeout=START_S)
        pid = trainer.pid
        assert pid is not None
        started = time.monotonic()
        with pytest.raises(TrainingTimeoutError, match="killed"):
            trainer.train(_request(digits, epochs=100_000), timeout=1.0)
        assert time.monotonic() - started < 10
        assert _gone(pid, within=10)
        assert not trainer.alive
        assert trainer.train(_request(digits), timeout=START_S)["metrics"]["steps"] > 0


def test_a_child_that_stops_reading_times_out_instead_of_blocking_the_send(
    digits: Digits,
) -> None:
    # A frozen child (here: stopped) never drains the pipe; a request larger than the
    # pipe's buffer used to block the sender for good, whatever the timeout.
    with TrainerProcess(idle_timeout_s=300) as trainer:
        trainer.start(timeout=START_S)
        pid = trainer.pid
        assert pid is not None
        big = np.tile(digits.x_train, (8, 1))  # megabytes: more than any pipe buffer
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(TrainingTimeoutError, match="killed"):
                trainer.train(_request(digits, features=big, labels=np.tile(digits.y_train, 8)),
                              timeout=2.0)  # fmt: skip
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert time.monotonic() - started < 10
        assert _gone(pid, within=10)
        assert trainer.train(_request(digits), timeout=START_S)["metrics"]["steps"] > 0


@pytest.mark.slow
def test_a_child_dying_mid_request_is_reported(digits: Digits) -> None:
    with TrainerProcess(idle_timeout_s=300) as trainer:
        trainer.start(timeout=START_S)
        pid = trainer.pid
        assert pid is not None
        killer = subprocess.Popen(  # kills the child while it trains
            [sys.executable, "-c", f"import os, time; time.sleep(1.0); os.kill({pid}, 9)"]
        )
        try:
            with pytest.raises(WorkerCrashedError, match="-9"):
                trainer.train(_request(digits, epochs=100_000), timeout=START_S)
        finally:
            killer.wait()


@pytest.mark.slow
def test_an_idle_child_exits_and_a_new_one_serves_the_next_request(digits: Digits) -> None:
    with TrainerProcess(idle_timeout_s=1.0, parent_check_s=0.2) as trainer:
        trainer.train(_request(digits), timeout=START_S)
        pid = trainer.pid
        assert pid is not None
        assert _gone(pid, within=10)
        assert not trainer.alive
        assert trainer.train(_request(digits), timeout=START_S)["metrics"]["steps"] > 0
        assert trainer.starts == 2


def _nice_and_policy(pid: int) -> tuple[int, int]:
    """(nice, scheduling policy) of a process, from /proc/PID/stat (fields 19 and 41)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16]), int(fields[38])


def test_the_child_runs_below_the_daemon_under_sched_batch(trainer: TrainerProcess) -> None:
    assert trainer.pid is not None
    nice, policy = _nice_and_policy(trainer.pid)
    assert nice == min(19, os.nice(0) + 10)
    assert policy == os.SCHED_BATCH


def test_nice_zero_keeps_the_daemons_priority() -> None:
    with TrainerProcess(idle_timeout_s=300, nice=0) as process:
        process.start(timeout=START_S)
        assert process.pid is not None
        assert _nice_and_policy(process.pid)[0] == os.nice(0)


def test_a_nice_outside_0_19_is_refused() -> None:
    with pytest.raises(TrainingError, match="nice must be 0-19"):
        TrainerProcess(nice=20)


def test_close_asks_the_child_to_exit(digits: Digits) -> None:
    trainer = TrainerProcess(idle_timeout_s=300)
    trainer.start(timeout=START_S)
    pid = trainer.pid
    assert pid is not None
    trainer.close()
    assert not trainer.alive
    assert trainer.pid is None
    assert _gone(pid, within=10)
    trainer.close()  # twice is fine


@pytest.mark.slow
def test_the_child_exits_when_the_daemon_dies(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from agent.trainer import TrainerProcess
        trainer = TrainerProcess(idle_timeout_s=300, parent_check_s=0.2)
        trainer.start(timeout=120)
        print(trainer.pid, flush=True)
        time.sleep(300)
        """
    )
    daemon = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert daemon.stdout is not None
        child = int(daemon.stdout.readline())
        daemon.kill()  # SIGKILL: no cleanup runs in the daemon
        daemon.wait()
        assert _gone(child, within=15)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if daemon.stdout is not None:
            daemon.stdout.close()


def test_the_daemon_side_never_imports_torch() -> None:
    code = (
        "import sys, json\n"
        "import agent.trainer, agent.compression, agent.onnx_runtime, agent.local_data\n"
        "import agent.train_worker\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == []


def test_a_child_whose_parent_died_before_it_was_ready_exits_quietly() -> None:
    # (a daemon killed with -9 while its child started: the child's "ready" met a broken
    # pipe, and its traceback went to the journal)
    parent_end, child_end = multiprocessing.Pipe()
    parent_end.close()
    train_worker.worker_main(child_end, idle_timeout_s=1.0)  # returns, raises nothing
    assert child_end.closed
