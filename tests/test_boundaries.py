"""Import every module in a fresh interpreter and check the boundaries in STYLE.md."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocols", "agent", "cloud_coordinator")
# What a pure protocols module may not pull in, directly or through its imports.
IO_LIBRARIES = {"paho", "zeroconf", "onnxruntime", "torch", "asyncio", "socket"}
# What it may not import itself (logging, for one, imports threading on its own).
DIRECT_FORBIDDEN = IO_LIBRARIES | {"threading", "selectors", "ssl", "agent", "cloud_coordinator"}


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return sorted(names)


def _imported_by(module: str) -> set[str]:
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        f"import {module}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", _modules())
def test_module_respects_the_boundaries(module: str) -> None:
    imported = _imported_by(module)
    if module.startswith("agent"):
        assert "cloud_coordinator" not in imported, f"{module} imports the coordinator"
        assert "torch" not in imported, f"{module} imports torch (only training may)"
    if module.startswith("cloud_coordinator"):
        assert "agent" not in imported, f"{module} imports the agent"
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
            if node.module == "protocols" or node.module.startswith("protocols.mqtt"):
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


def test_the_walk_found_every_package() -> None:
    found = _modules()
    expected = {"protocols.messages", "protocols.mqtt", "agent.daemon", "cloud_coordinator.service"}
    assert expected <= set(found)
