"""The daemon's side of training: one warm child process that trains heads with torch.

The daemon never imports torch. `TrainerProcess` starts the child lazily as a fresh
interpreter (``python -c ... agent.train_worker.child_main``: like multiprocessing's
``spawn`` it shares no threads or locks with the daemon, but it pickles nothing and does
not re-run the daemon's ``__main__``), hands it one end of a socket pair, waits for it to
report ready (torch imported), then sends each request as bytes and waits for the result
with a timeout. Messages are msgpack maps made by `agent.train_worker.encode_message`. The
child exits after `idle_timeout_s` without a request, when the pipe closes, or when the
daemon dies; the next `train` starts a fresh one.

    AgentError (agent.errors)
    └── TrainingError (agent.train_worker)   bad request, or training raised in the child
        ├── TrainingTimeoutError             no result in time; the child was killed
        └── WorkerCrashedError               the child died or could not start
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import agent
from agent.train_messages import TrainingError, decode_message, encode_message

if TYPE_CHECKING:
    import subprocess
    from multiprocessing.connection import Connection

__all__ = ["TrainerProcess", "TrainingError", "TrainingTimeoutError", "WorkerCrashedError"]

_JOIN_S = 5.0


class TrainingTimeoutError(TrainingError):
    """The child gave no result before the timeout; it was killed."""


class WorkerCrashedError(TrainingError):
    """The training child died (or could not start) while a request was pending."""


class TrainerProcess:
    """A lazily started, restartable torch child; `train` takes and returns `train_head` dicts.

    The child runs `nice` steps below the daemon, under ``SCHED_BATCH``: training is
    background work, so on a busy device the scheduler gives way to the daemon's inference
    requests first.
    """

    def __init__(
        self,
        threads: int = 1,
        idle_timeout_s: float = 120.0,
        parent_check_s: float = 1.0,
        nice: int = 10,
    ) -> None:
        if threads < 1 or idle_timeout_s <= 0 or parent_check_s <= 0:
            raise TrainingError("threads, idle_timeout_s and parent_check_s must be positive")
        if not 0 <= nice <= 19:
            raise TrainingError(f"nice must be 0-19, not {nice}")
        self.threads = threads
        self.nice = nice
        self.idle_timeout_s = idle_timeout_s
        self.parent_check_s = parent_check_s
        self.starts = 0  # how many children were started (for telemetry and tests)
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        """True while a child process is running."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The running child's process id, or None."""
        return self._process.pid if self._process is not None and self.alive else None

    def train(self, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Run `train_head(request)` in the child; TrainingError (or a subclass) on failure.

        `timeout` covers everything, a cold start of the child included (about 1-3 s to
        import torch). Returns writable float32 head arrays, like `train_head`.
        """
        deadline = time.monotonic() + timeout
        payload = encode_message("train", {"threads": None, **request})
        with self._lock:
            for attempt in range(2):
                conn = self._ensure_started(deadline)
                # A child that stops reading (hung, frozen) would block the send for good
                # once the pipe is full: past the deadline it is killed, which ends it.
                process = self._process
                watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _kill, (process,))
                watchdog.daemon = True
                watchdog.start()
                try:
                    try:
                        conn.send_bytes(payload)
                    finally:
                        watchdog.cancel()
                    if not conn.poll(max(0.0, deadline - time.monotonic())):
                        self._stop(kill=True)
                        raise TrainingTimeoutError(
                            f"no training result within {timeout:.1f} s; the worker was killed"
                        )
                    reply = conn.recv_bytes()
                except (EOFError, OSError) as exc:
                    if time.monotonic() >= deadline:
                        self._stop(kill=True)
                        raise TrainingTimeoutError(
                            f"the training worker took no request within {timeout:.1f} s"
                            " (not reading); it was killed"
                        ) from exc
                    code = self._stop(kill=False)  # it closed the pipe: let it finish exiting
                    if code == 0 and attempt == 0:
                        continue  # it had just exited for idleness: start another, once
                    raise WorkerCrashedError(
                        f"the training worker died during the request (exit code {code})"
                    ) from exc
                op, result = decode_message(reply)
                if op == "error":
                    raise TrainingError(f"training failed in the worker: {result.get('error')}")
                if op != "result" or "head" not in result or "metrics" not in result:
                    raise TrainingError(f"unexpected reply {op!r} from the training worker")
                head = {k: np.array(v, dtype=np.float32) for k, v in result["head"].items()}
                return {"head": head, "metrics": result["metrics"]}
        raise WorkerCrashedError("the training worker exited twice in a row")

    def start(self, timeout: float = 60.0) -> None:
        """Start the child now (normally `train` does it) and wait until it is ready."""
        with self._lock:
            self._ensure_started(time.monotonic() + timeout)

    def close(self) -> None:
        """Ask the child to exit, kill it if it does not; a later `train` starts a new one."""
        with self._lock:
            conn = self._conn
            if conn is not None and self.alive:
                with contextlib.suppress(OSError):  # already gone: _stop reaps it
                    conn.send_bytes(encode_message("exit", {}))
            self._stop(kill=False)

    def __enter__(self) -> TrainerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _ensure_started(self, deadline: float) -> Connection:
        if self._conn is not None and self.alive:
            return self._conn
        self._stop(kill=True)
        # Imported when a child is first started: a resident agent that is not training
        # does not hold them (about 0.6 MB).
        import multiprocessing
        import subprocess

        parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
        fd = child_conn.fileno()
        args = [fd, self.threads, self.idle_timeout_s, self.parent_check_s, self.nice]
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, *map(str, args)],
                stdin=subprocess.DEVNULL,
                pass_fds=(fd,),
                env=_child_env(self.threads),
                start_new_session=True,  # a Ctrl-C meant for the daemon is not the child's
            )
        except OSError as exc:
            parent_conn.close()
            raise WorkerCrashedError(f"cannot start the training worker: {exc}") from exc
        finally:
            child_conn.close()  # only the child holds it now, so its death reads as EOF
        self._process, self._conn = process, parent_conn
        self.starts += 1
        try:
            ready = parent_conn.poll(max(0.0, deadline - time.monotonic()))
            message = parent_conn.recv_bytes() if ready else None
        except (EOFError, OSError) as exc:
            code = self._stop(kill=False)
            raise WorkerCrashedError(f"the training worker died at start (code {code})") from exc
        if message is None:
            self._stop(kill=True)
            raise TrainingTimeoutError("the training worker did not start in time; it was killed")
        op, _ = decode_message(message)
        if op != "ready":
            self._stop(kill=True)
            raise WorkerCrashedError(f"the training worker said {op!r} instead of 'ready'")
        return parent_conn

    def _stop(self, kill: bool) -> int | None:
        """Reap the child (killing it when `kill` or when it will not exit); its exit code."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if kill and process.poll() is None:
            process.kill()
        import subprocess  # (loaded: there is a process)

        try:
            return process.wait(_JOIN_S)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


_CHILD_CODE = "import sys; from agent.train_worker import child_main; child_main(sys.argv[1:])"


def _child_env(threads: int) -> dict[str, str]:
    """The daemon's environment, with this package importable and thread pools pinned."""
    env = dict(os.environ)
    root = str(Path(agent.__file__).resolve().parent.parent)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not path else os.pathsep.join((root, path))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    """Kill `process` if it still runs (the send watchdog)."""
    if process is not None and process.poll() is None:
        with contextlib.suppress(OSError):
            process.kill()
