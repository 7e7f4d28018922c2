"""Hot swaps under load: failed requests while model versions are swapped repeatedly.

An inference service (the agent's own: runtime, HTTP API on loopback) serves digits_mlp.
Four client threads send predict requests over HTTP back to back (JSON and msgpack,
batches of 1 to 4 rows, keep-alive), while the main thread installs a new version every
``--interval`` seconds (`InferenceService.install`: read ``model.onnx`` from the model
store, build a session, check the schema, warm it up, swap the reference), cycling through
``--versions`` distinct versions, each new to the runtime when installed (so every swap
loads and warms a real session), until at least ``--requests`` answered and ``--swaps``
swaps were done. A request fails when it raises or answers with a version that was never
installed. Nothing is timed for a target: ``requests`` and ``failed`` are counts.

Run: ``python -m bench.hot_swap [--requests N] [--swaps N] [--interval S]``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from agent.client import InferenceClient
from bench._models import digits, service, versions
from bench._timing import emit


def main() -> None:
    """Swap versions under a steady request load; print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--swaps", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument(
        "--versions",
        type=int,
        default=4,
        help="at least 3, so the version "
        "installed is never the standby: every swap loads a fresh session",
    )
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    bundles = versions(args.versions)
    names = {b.manifest.version for b in bundles}
    pixels, _ = digits()
    stop = threading.Event()
    counts = [0] * args.clients
    failures: list[str] = []
    seen: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        svc = service(Path(tmp), bundles[0])
        assert svc.server is not None
        for b in bundles[1:]:
            for entry in b.manifest.files:
                svc.store.put_blob(entry.sha256, b.files[entry.name])
            svc.store.put_manifest(b.manifest)

        def load(i: int) -> None:
            client = InferenceClient.connect(svc.server.url, use_msgpack=i % 2 == 1)  # type: ignore[union-attr]
            rows = 1 + i % 4
            while not stop.is_set():
                try:
                    version = client.predict(pixels[i : i + rows]).version
                    seen.add(version)
                    if version not in names:
                        failures.append(f"unknown version {version}")
                    counts[i] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    failures.append(repr(exc))
            client.close()

        threads = [threading.Thread(target=load, args=(i,)) for i in range(args.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        swaps = swap_failures = 0
        k = 1
        while sum(counts) < args.requests or swaps < args.swaps:
            time.sleep(args.interval)
            bundle = bundles[k % len(bundles)]
            k += 1
            if svc.install(bundle.manifest):
                swaps += 1
            else:
                swap_failures += 1
        stop.set()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        svc.stop()
    emit({
        "bench": "hot_swap", "requests": sum(counts), "failed": len(failures),
        "swaps": swaps, "swap_failures": swap_failures, "versions_seen": len(seen),
        "clients": args.clients, "wall_s": round(wall, 2),
        "requests_per_s": round(sum(counts) / wall, 1),
        "first_failures": failures[:3],
    })  # fmt: skip


if __name__ == "__main__":
    main()
