"""Import every module in a fresh interpreter state and check the boundaries in STYLE.md.

One helper process per side imports only what it must, then forks a child per module: the
child imports that one module and reports which top-level packages it pulled in. Forking
keeps the state fresh (nothing but the helper's own imports is loaded) without paying for
an interpreter start per module. The coordinator's helper preloads heavy third-party
libraries (torch, onnx, scikit-learn) — that hides nothing the coordinator check looks for
(it only asks whether `agent` is imported) — while the helper for `protocols` and `agent`
loads nothing, so an agent module that drags in torch is caught.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocols", "agent", "cloud_coordinator")
# What a pure protocols module may not pull in, directly or through its imports.
IO_LIBRARIES = {"paho", "zeroconf", "onnxruntime", "torch", "asyncio", "socket"}
# What it may not import itself (logging, for one, imports threading on its own).
DIRECT_FORBIDDEN = IO_LIBRARIES | {"threading", "selectors", "ssl", "agent", "cloud_coordinator"}

_FORK_SERVER = """
import json, os, sys
for name in {preload!r}:
    __import__(name)
results = {{}}
for module in {modules!r}:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        before = set(sys.modules)
        try:
            __import__(module)
            out = sorted({{m.split('.')[0] for m in set(sys.modules) - before}})
        except BaseException as exc:
            out = {{"error": repr(exc)}}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    results[module] = json.loads(b"".join(chunks))
print(json.dumps(results))
"""


def _modules(package: str) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


def _all_modules() -> list[str]:
    return [m for package in PACKAGES for m in _modules(package)]


@cache
def _imports(side: str) -> dict[str, list[str] | dict[str, str]]:
    if side == "cloud_coordinator":
        preload, modules = ["torch", "onnx", "onnxruntime", "sklearn"], _modules(side)
    else:
        preload, modules = [], _modules("protocols") + _modules("agent")
    code = _FORK_SERVER.format(preload=preload, modules=modules)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    result: dict[str, list[str] | dict[str, str]] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("module", _all_modules())
def test_module_respects_the_boundaries(module: str) -> None:
    side = "cloud_coordinator" if module.startswith("cloud_coordinator") else "edge"
    found = _imports(side)[module]
    assert isinstance(found, list), f"importing {module} failed: {found}"
    imported = set(found)
    if module.startswith("agent"):
        assert "cloud_coordinator" not in imported, f"{module} imports the coordinator"
        assert "torch" not in imported, f"{module} imports torch (only training may)"
    if module.startswith("cloud_coordinator"):
        assert "agent" not in imported, f"{module} imports the agent"
    else:  # devices verify signatures with protocols.ed25519; only the coordinator signs
        assert "cryptography" not in imported, f"{module} loads cryptography"
    if module.startswith("protocols") and module != "protocols.mqtt":
        leaked = (imported & IO_LIBRARIES) | (imported & {"agent", "cloud_coordinator"})
        assert not leaked, f"{module} pulls in {sorted(leaked)}; protocols/ must stay pure"


def _direct_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
            if node.module == "protocols":
                names |= {f"protocols.{a.name}" for a in node.names if a.name == "mqtt"}
            if node.module.startswith("protocols.mqtt"):
                names.add("protocols.mqtt")
    return names


@pytest.mark.parametrize(
    "path", sorted(p for p in (ROOT / "protocols").glob("*.py") if p.name != "mqtt.py"), ids=str
)
def test_pure_protocol_modules_import_no_io(path: Path) -> None:
    forbidden = _direct_imports(path) & (DIRECT_FORBIDDEN | {"protocols.mqtt"})
    assert not forbidden, f"{path.name} imports {sorted(forbidden)}"


# The inference path (issue 5): what each module may pull in. The runtime and the API run in
# the daemon, so never torch; the client runs in applications, so not onnxruntime either.
INFERENCE_MODULES = {
    "agent.onnx_runtime": {"torch"},
    "agent.serving": {"torch"},
    "agent.version_slots": {"torch"},
    "agent.served_model": {"torch"},
    "agent.inference_service": {"torch"},
    "agent.http_api": {"torch", "onnxruntime"},
    "agent.http_wire": {"torch", "onnxruntime", "numpy"},
    "agent.http_conn": {"torch", "onnxruntime", "numpy"},
    "agent.client": {"torch", "onnxruntime"},
    "agent.predictions": {"torch", "onnxruntime", "numpy"},
    "agent.api_codec": {"torch", "onnxruntime"},
    "agent.inference_metrics": {"torch", "onnxruntime"},
    "agent.feedback": {"torch", "onnxruntime"},
    "agent.rollout": {"torch", "onnxruntime", "numpy"},
}


@pytest.mark.parametrize("module", sorted(INFERENCE_MODULES))
def test_the_inference_path_stays_light(module: str) -> None:
    found = _imports("edge")[module]
    assert isinstance(found, list), f"importing {module} failed: {found}"
    leaked = set(found) & INFERENCE_MODULES[module]
    assert not leaked, f"{module} pulls in {sorted(leaked)}"


def test_onnxruntime_is_imported_by_one_agent_module_only() -> None:
    importers = sorted(
        p.name for p in (ROOT / "agent").glob("*.py") if "onnxruntime" in _direct_imports(p)
    )
    assert importers == ["onnx_runtime.py"]


def test_the_walk_found_every_package() -> None:
    expected = {"protocols.messages", "protocols.mqtt", "agent.daemon", "cloud_coordinator.service"}
    assert expected <= set(_all_modules())


def test_the_check_catches_a_torch_import_on_the_edge_side() -> None:
    # agent.train_worker imports torch lazily (inside functions), so importing it is clean;
    # importing torch itself through the edge helper must show up.
    code = _FORK_SERVER.format(preload=[], modules=["torch"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch" in json.loads(out.stdout)["torch"]


# Loaded only once a device trains (`agent.trainer`, `agent.compression`, `agent.local_data`
# import them when first needed): a resident agent that only serves predictions does not
# hold them, about 1 MB of its resident memory (`bench.inference`'s `rss_mb`).
TRAINING_ONLY = {"multiprocessing", "subprocess", "zipfile"}


@pytest.mark.parametrize("module", ["agent.daemon", "agent.inference_service", "agent.learning"])
def test_a_resident_agent_loads_no_training_machinery(module: str) -> None:
    found = _imports("edge")[module]
    assert isinstance(found, list), f"importing {module} failed: {found}"
    loaded = set(found) & TRAINING_ONLY
    assert not loaded, f"{module} loads {sorted(loaded)} before any training"
