"""`agent.native_memory`: freed heap goes back to the system after a model load (glibc)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import inference_service, native_memory
from tests.agent_inference.conftest import Bundles, new_service, put

ROOT = Path(__file__).resolve().parents[2]
_GLIBC = sys.platform.startswith("linux") and native_memory.trim_available()


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(not _GLIBC, reason="needs glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_system() -> None:
    # In a fresh interpreter: many small blocks (heap, not mmap) are filled, then all but the
    # last freed. The last one pins the heap's top, so glibc's own trimming cannot return the
    # rest (RSS stays: checked by hand); release_free_heap must.
    code = """
from agent import native_memory
from tests.agent_inference.test_native_memory import _rss_kb
blocks = [bytearray(b"x" * 60_000) for _ in range(1500)]  # about 90 MB
pin = blocks[-1]
del blocks
before = _rss_kb()
released = native_memory.release_free_heap()
after = _rss_kb()
print(released, before, after)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    released, before, after = out.stdout.split()
    assert released == "True"
    assert int(before) - int(after) > 50_000, out.stdout  # most of the 90 MB, in KiB


def test_without_glibc_it_releases_nothing_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_memory, "_TRIM", None)  # what _find_trim gives off glibc
    assert native_memory.trim_available() is False
    assert native_memory.release_free_heap() is False


def test_the_model_loader_releases_the_heap_after_each_load(
    tmp_path: Path, bundles: Bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(inference_service, "release_free_heap", lambda: calls.append("trim"))
    service = new_service(tmp_path, bundles.v1)
    service.start()
    try:
        assert service.wait_idle(30)
        assert calls == ["trim"]  # the first load
        put(service.store, bundles.v2)
        service.model_activated(bundles.v2.manifest)  # queued for the loader: a swap
        assert service.wait_idle(30)
        serving = service.runtime.serving
        assert serving is not None
        assert serving.version == "v2"
        assert calls == ["trim", "trim"]
    finally:
        service.stop()
