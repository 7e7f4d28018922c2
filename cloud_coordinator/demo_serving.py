"""The demo's last act: the agents serve the trained model, and a canary rollout.

It talks to each agent's local inference API over its Unix socket (plain HTTP, as any
application on the device would; the coordinator never imports the agent) and to the
coordinator's HTTP API for the rollout.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud_coordinator import datasets
from cloud_coordinator.demo_view import say
from cloud_coordinator.local_fleet import LocalFleet
from cloud_coordinator.templates import get_template

SOCKET_NAME = "inference.sock"  # the agent's default inference_listen, under its data_dir


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def predict(sock: Path, rows: np.ndarray[Any, Any]) -> dict[str, Any]:
    """POST /v1/predict to the agent behind `sock`; the JSON answer (OSError if none)."""
    conn = _Unix(sock, timeout=10.0)
    try:
        body = json.dumps({"input": rows.tolist()})
        conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer: dict[str, Any] = json.loads(response.read())
        if response.status != 200:
            raise OSError(f"predict answered {response.status}: {answer}")
        return answer
    finally:
        conn.close()


def raw_holdout(fleet: LocalFleet, seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The holdout as an application on a device has it: raw rows (the agent preprocesses)."""
    template = get_template(fleet.template)
    holdout = datasets.server_data(template, seed).holdout
    scale = float(template.preprocessing.get("scale", 1.0))
    offset = float(template.preprocessing.get("offset", 0.0))
    return (holdout.x - offset) / scale, holdout.y


def sockets(fleet: LocalFleet) -> list[Path]:
    """Each agent's inference socket, in agent order."""
    return sorted((fleet.workdir / "agents").glob(f"*/{SOCKET_NAME}"))


def show_local_predictions(fleet: LocalFleet, start: float, seed: int) -> None:
    """Ask one agent to classify a few holdout digits and print what it answers."""
    x, y = raw_holdout(fleet, seed)
    socks = sockets(fleet)
    if not socks:
        say(start, "no agent inference socket found; skipping the serving part")
        return
    rows = x[:8]
    began = time.perf_counter()
    answer = predict(socks[0], rows)
    took = (time.perf_counter() - began) * 1e3
    got = [p["prediction"] for p in answer["predictions"]]
    say(start, f"{socks[0].parent.name} serves {answer['model']} {answer['version']} locally:"
               f" 8 holdout digits in {took:.1f} ms over its Unix socket")  # fmt: skip
    print(f"          predicted {' '.join(got)}")
    print(f"          true      {' '.join(str(int(label)) for label in y[:8])}", flush=True)


def canary_rollout(fleet: LocalFleet, start: float, seed: int, version: str) -> dict[str, Any]:
    """Roll `version` out through a canary while every agent serves traffic; the result."""
    model = get_template(fleet.template).name.replace("_", "-")
    # Every process of the demo shares this machine, so a request's latency is mostly how
    # soon the scheduler runs it: on 2 cores the canary's mean over its first 20 requests
    # came out 0.5-0.95 ms over the rest's (x1.6) for the same work. A regression here
    # must be 5 ms to count; a fleet's rollouts keep the default (0.5 ms).
    rule = {"min_duration_s": 2, "min_requests": 20, "max_wait_s": 60,
            "min_latency_increase_ms": 5}  # fmt: skip
    rollout: dict[str, Any] = fleet.api("/v1/rollouts", {
        "model": model, "version": version, "canary_fraction": 0.2, "rule": rule})  # fmt: skip
    canary = ", ".join(rollout["canary"])
    say(start, f"rollout {rollout['rollout_id']}: {version} to the canary first ({canary});"
               " the rest wait for the verdict")  # fmt: skip
    x, _ = raw_holdout(fleet, seed)
    deadline = time.monotonic() + 60
    n = 0
    while rollout["state"] == "canary" and time.monotonic() < deadline:
        for sock in sockets(fleet):  # applications on every device keep asking
            rows = x[n % len(x) : n % len(x) + 4]
            with contextlib.suppress(OSError):  # a device swapping: its judge counts it
                predict(sock, rows)
        n += 4
        time.sleep(0.1)
        rollout = fleet.api(f"/v1/rollouts/{rollout['rollout_id']}")
    say(start, f"rollout {rollout['state']}: {rollout['reason'] or 'no verdict in 60 s'}")
    return rollout
