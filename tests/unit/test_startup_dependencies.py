"""What a daemon says about its Python dependencies at start: an agent with training on
but no torch warns once; a coordinator without torch exits with one line, no traceback;
onnxruntime's own unformatted warnings stay out of the journal."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.daemon import Agent, missing_torch_warning
from cloud_coordinator.broker import free_port
from protocols.config import EXIT_CONFIG, BrokerConfig

ROOT = Path(__file__).resolve().parents[2]


def _without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "torch" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_training_without_torch_is_named_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_torch(monkeypatch)
    warning = missing_torch_warning(True)
    assert warning is not None
    assert "torch is not installed" in warning
    assert "fedge[train]" in warning
    assert "Training on a device" in warning
    assert "set train = false" in warning
    assert missing_torch_warning(False) is None  # not training: nothing to say


def test_torch_present_or_training_off_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert missing_torch_warning(True) is None


def test_the_daemon_warns_once_at_start_without_importing_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = AgentConfig(
        "cam-3", str(tmp_path), train=False, inference=False,
        mqtt=BrokerConfig(host="127.0.0.1", port=free_port()),
    )  # fmt: skip
    agent = Agent(config)  # (train=False: no learner, so nothing else needs torch)
    agent.config = dataclasses.replace(config, train=True)
    _without_torch(monkeypatch)
    torch_loaded = "torch" in sys.modules
    agent.request_stop()
    with caplog.at_level(logging.WARNING, logger="agent.daemon"):
        assert agent.run() == 0
    warnings = [r for r in caplog.records if "torch is not installed" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert ("torch" in sys.modules) == torch_loaded  # looked up, never imported


def _python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDGE_", "ORT_", "XDG_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["HOME"] = str(tmp_path / "home")
    return env


def test_coordinator_without_torch_says_which_extra_to_install(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text("")
    code = (
        "import sys; sys.modules['torch'] = None  # as if not installed\n"
        "from cloud_coordinator.cli import main\n"
        f"sys.exit(main(['serve', '--config', {str(config)!r}, '--broker', '127.0.0.1:1',"
        f" '--data-dir', {str(tmp_path / 'data')!r}, '--http', '127.0.0.1:0']))\n"
    )
    result = _python(code, _clean_env(tmp_path), tmp_path)
    assert result.returncode == EXIT_CONFIG == 78, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedge-coordinator: cannot start: the module 'torch'")
    assert "fedge[coordinator]" in lines[0]


def test_onnxruntime_is_quiet_without_a_writable_home(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    env["HOME"] = "/proc/fedge-no-home"  # like the fedge user's /nonexistent, for root too
    code = (
        "import agent.onnx_runtime as o\n"
        "try:\n"
        "    o.OnnxModel.from_bytes(b'not a model')\n"
        "except o.InferenceError as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = _python(code, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no "Failed to persist telemetry device ID", no colours
    assert result.stdout.startswith("refused: cannot load ONNX model")  # errors still raised


def test_a_provider_onnxruntime_could_not_start_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # onnxruntime's own "Failed to create CUDAExecutionProvider" warning is silenced now
    pytest.importorskip("onnx")
    from agent import onnx_runtime as rt
    from tests.agent_training.test_onnx_runtime import _tiny_model

    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    monkeypatch.setattr(rt.ort, "get_available_providers", lambda: [cuda, cpu])
    real = rt.ort.InferenceSession

    def no_gpu(data: bytes, sess_options: Any, providers: list[str]) -> Any:
        return real(data, sess_options=sess_options, providers=[cpu])  # fell back to the CPU

    monkeypatch.setattr(rt.ort, "InferenceSession", no_gpu)
    with caplog.at_level(logging.WARNING, logger="agent.onnx_runtime"):
        model = rt.OnnxModel.from_bytes(_tiny_model(), providers=[cuda, cpu])
    assert model.providers == [cpu]
    assert f"execution providers {cuda} could not be started" in caplog.text
    assert f"the model runs on {cpu}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent.onnx_runtime"):
        rt.OnnxModel.from_bytes(_tiny_model(), providers=[cpu])
    assert caplog.text == ""
