"""Inference on the device: the agent's overhead over a raw onnxruntime call, the HTTP API's
added latency, tail latency while training runs, and a resident agent's memory.

Model: digits_mlp (64-512-256-10) exported by the coordinator's own code, inputs from
sklearn digits (raw pixels; the agent applies the manifest's 1/16 scale itself, the raw
call gets pre-scaled pixels). The baseline is ``InferenceSession.run`` on a session of the
version's own ``model.onnx`` bytes made with the agent's session options (1 intra-op
thread, no spinning): not on the agent's session itself, whose graph has the answer nodes
appended (`agent.answer_graph.with_answer_outputs`), which a run fetching only the logits would
still execute. So the ratio is the agent's own cost. Timed, interleaved, medians
(`bench._timing.interleaved_medians`):

- ``inproc_ratio_b1`` / ``inproc_ratio_b64``: `InferenceRuntime.predict` (what
  ``InferenceClient.in_process(service).predict`` calls: schema check, scaling, run,
  softmax confidence, prediction id, the input kept for feedback, metrics) ÷ raw
  ``session.run``, at batch 1 and 64; the same input every call, so after a thread's
  first request of a size the agent runs through its bound (I/O binding) run;
- ``http_added_ms_p50``: median of ``InferenceClient.predict`` over HTTP on loopback
  (JSON, keep-alive, client and server in this process) at batch 1, minus the raw median;
- ``p99_training_ratio``: p99 of in-process predict at batch 1 (one request every 2 ms)
  while the agent's real training child (`agent.trainer.TrainerProcess`, torch, 1 thread)
  trains the digits head on 1,437 samples, ÷ the same p99 with no training; the phases
  alternate (idle, training, idle, training) and each p99 pools its phases;
- ``rss_mb``: VmRSS of a real ``fedge-agent --no-train`` process with the model loaded
  and its API up on a Unix socket (no broker reachable: MQTT keeps retrying), read once
  ``/healthz`` answers and a few predictions went through. ``rss_anon_mb`` and
  ``rss_file_mb`` split it: private memory, and pages of mapped files (mostly the
  onnxruntime and numpy libraries), whose count varies with the kernel's state (the
  same agent has read 5 MB apart from one hour to the next).

Run: ``python -m bench.inference [--trials N] [--phase-s S] [--train-nice N] [--recent-mb M]``
(the last two default to the agent's own defaults; ``--train-nice 0`` trains at the
daemon's priority, ``--recent-mb 16`` keeps as many batches of 64 for feedback as the
1,024-request limit alone did before the byte budget).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import InferenceClient
from agent.config import AgentConfig
from agent.model_store import ModelStore
from agent.onnx_runtime import OnnxModel
from agent.trainer import TrainerProcess
from bench._models import digits, put, service, versions
from bench._timing import emit, interleaved_medians
from protocols.model_format import MODEL_FILE


def _p99(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 99))


def raw_model(svc: Any, bundle: Any) -> OnnxModel:
    """A session of the served version's unmodified model, with the agent's options."""
    rt = svc.runtime
    return OnnxModel.from_bytes(bundle.files[MODEL_FILE], rt.threads, rt.providers)


def inproc(
    svc: Any, model: OnnxModel, pixels: np.ndarray[Any, Any], trials: int
) -> dict[str, float]:
    """Agent predict ÷ raw session.run at batch 1 and 64."""
    rt = svc.runtime
    out = {}
    for rows in (1, 64):
        x = pixels[:rows].copy()
        scaled = (x / 16.0).astype(np.float32)
        inner = 400 if rows == 1 else 40
        candidates: dict[str, Callable[[], object]] = {
            "raw": functools.partial(model.raw_run, scaled),
            "agent": functools.partial(rt.predict, x),
        }
        med = interleaved_medians(candidates, trials, inner)
        out[f"inproc_ratio_b{rows}"] = med["agent"] / med["raw"]
        out[f"raw_us_b{rows}"] = med["raw"] * 1e6
        out[f"agent_us_b{rows}"] = med["agent"] * 1e6
    return out


def http_added(
    svc: Any, model: OnnxModel, pixels: np.ndarray[Any, Any], requests: int
) -> dict[str, float]:
    """Median HTTP predict latency at batch 1 minus the raw median."""
    client = InferenceClient.connect(svc.server.url)
    scaled = (pixels[:1] / 16.0).astype(np.float32)
    x = pixels[:1].copy()
    raw, api = [], []
    for _ in range(50):
        client.predict(x)
    for _ in range(requests):
        t = time.perf_counter()
        model.raw_run(scaled)
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.predict(x)
        api.append(time.perf_counter() - t)
    client.close()
    r, a = statistics.median(raw), statistics.median(api)
    return {"http_added_ms_p50": (a - r) * 1000, "http_p50_ms": a * 1000, "raw_p50_ms": r * 1000}


def _phase(rt: Any, x: np.ndarray[Any, Any], seconds: float) -> list[float]:
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        rt.predict(x)
        samples.append(time.perf_counter() - t)
        time.sleep(0.002)
    return samples


def p99_training(svc: Any, bundle: Any, phase_s: float, nice: int = 10) -> dict[str, float]:
    """p99 predict latency with the training child (`nice` below) busy ÷ p99 with it idle."""
    x, y = digits()
    feats = (x / 16.0).astype(np.float32)
    trainer = TrainerProcess(threads=1, nice=nice)
    request = {
        "features": feats[:1437], "labels": y[:1437], "val_features": feats[1437:],
        "val_labels": y[1437:], "head": bundle.head_state(),
        "layers": bundle.manifest.head_layers, "lr": 0.05, "momentum": 0.9, "epochs": 10_000,
        "batch_size": 16, "prox_mu": 0.0, "max_seconds": phase_s, "seed": 0,
    }  # fmt: skip
    warm = dict(request, epochs=1, max_seconds=1.0)
    trainer.train(warm, timeout=120)  # the child starts and imports torch: not timed
    one = x[:1].copy()
    idle: list[float] = []
    busy: list[float] = []
    for _ in range(2):
        idle += _phase(svc.runtime, one, phase_s)
        worker = threading.Thread(target=trainer.train, args=(request,), kwargs={"timeout": 120})
        worker.start()
        time.sleep(0.3)  # the request reaches the child and training is under way
        busy += _phase(svc.runtime, one, phase_s - 0.6)
        worker.join()
    trainer.close()
    return {
        "p99_training_ratio": _p99(busy) / _p99(idle),
        "p99_idle_ms": _p99(idle) * 1000,
        "p99_training_ms": _p99(busy) * 1000,
    }


def rss(bundle: Any, root: Path) -> dict[str, float]:
    """VmRSS of a resident agent process serving the model, no training."""
    state = root / "agent"
    put(ModelStore(state / "models"), bundle)
    sock = root / "api.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    args = [sys.executable, "-m", "agent", "--no-train", "--device-id", "bench-rss",
            "--data-dir", str(state), "--listen", f"unix:{sock}", "--broker", "127.0.0.1:1",
            "--log-level", "warning", "--log-format", "text"]  # fmt: skip
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = InferenceClient.connect(f"unix:{sock}")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.health()
                break
            except Exception:  # noqa: BLE001 - not up yet: any failure means wait
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the agent did not come up") from None
                time.sleep(0.1)
        x, _ = digits()
        for i in range(100):
            client.predict(x[i : i + 1 + i % 8])
        time.sleep(1.0)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        kb = {
            key: int(value.split()[0])
            for key, _, value in (line.partition(":") for line in status.splitlines())
            if key in ("VmRSS", "RssAnon", "RssFile")
        }
        client.close()
        return {  # (RssAnon and RssFile since Linux 4.5)
            "rss_mb": kb["VmRSS"] / 1024,
            "rss_anon_mb": kb.get("RssAnon", -1024) / 1024,
            "rss_file_mb": kb.get("RssFile", -1024) / 1024,
        }
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    """Run every measurement and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--phase-s", type=float, default=5.0)
    defaults = AgentConfig(device_id="bench", data_dir=".")
    parser.add_argument(
        "--train-nice", type=int, default=defaults.train_nice,
        help="how far below this process the training child runs (the agent's train_nice)",
    )  # fmt: skip
    parser.add_argument(
        "--recent-mb", type=int, default=defaults.inference_recent_mb,
        help="memory for inputs kept for feedback (the agent's inference_recent_mb)",
    )  # fmt: skip
    args = parser.parse_args()
    (bundle,) = versions(1)
    pixels, _ = digits()
    result: dict[str, Any] = {
        "bench": "inference", "model": "digits_mlp", "cpus": os.cpu_count(),
        "train_nice": args.train_nice, "recent_mb": args.recent_mb,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        svc = service(Path(tmp) / "svc", bundle, recent_mb=args.recent_mb)
        try:
            model = raw_model(svc, bundle)
            result.update(inproc(svc, model, pixels, args.trials))
            result.update(http_added(svc, model, pixels, args.requests))
            result.update(p99_training(svc, bundle, args.phase_s, args.train_nice))
        finally:
            svc.stop()
        result.update(rss(bundle, Path(tmp)))
    emit({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})


if __name__ == "__main__":
    main()
