"""The agent's configuration: one frozen object, loaded once from file, then env, then flags.

Files, first found wins: ``--config PATH``, ``$FEDGE_CONFIG``, ``/etc/fedge/agent.toml``,
``$XDG_CONFIG_HOME/fedge/agent.toml`` (``~/.config/fedge/agent.toml``).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from protocols.config import BrokerConfig, default_data_dir, load
from protocols.signing import parse_key
from protocols.topics import valid_id

_ID_RULE = "use 1-64 characters from A-Z a-z 0-9 _ . -"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent daemon needs to know."""

    device_id: str
    data_dir: str
    fleet: str = "default"
    telemetry_interval_s: float = 5.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "text", "journal"] = "auto"
    train: bool = True
    train_nice: int = 10
    dataset_dir: str | None = None
    inference: bool = True
    inference_listen: str = ""
    inference_model: str = ""
    inference_threads: int = 1
    inference_providers: str = "cpu"
    inference_max_batch: int = 1024
    inference_recent_inputs: int = 1024
    inference_recent_mb: int = 4
    inference_feedback_max_rows: int = 10000
    inference_batch_wait_ms: float = 0.0
    inference_batch_rows: int = 32
    model_keys: str = ""
    allow_unsigned_models: bool = False
    offload: bool = False
    offload_threshold: float = 0.6
    offload_timeout_ms: int = 300
    keep_low_confidence: bool = False
    low_confidence_max_rows: int = 10000
    mqtt: BrokerConfig = field(default_factory=BrokerConfig)

    def __post_init__(self) -> None:
        if not valid_id(self.device_id):
            raise ValueError(f"device_id {self.device_id!r} is invalid: {_ID_RULE}")
        if not valid_id(self.fleet):
            raise ValueError(
                f"fleet {self.fleet!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . -"
            )
        if not 0.1 <= self.telemetry_interval_s <= 86400:
            raise ValueError(
                f"telemetry_interval_s must be 0.1-86400, got {self.telemetry_interval_s}"
            )
        if not 0 <= self.train_nice <= 19:
            raise ValueError(f"train_nice must be 0-19, got {self.train_nice}")
        parse_listen(self.inference_listen, self.data_dir)
        if self.inference_model and not valid_id(self.inference_model):
            raise ValueError(f"inference_model {self.inference_model!r} is invalid: {_ID_RULE}")
        if not 1 <= self.inference_threads <= 256:
            raise ValueError(f"inference_threads must be 1-256, got {self.inference_threads}")
        unknown = [p for p in _providers(self.inference_providers) if p not in PROVIDERS]
        if unknown or not _providers(self.inference_providers):
            raise ValueError(
                f"inference_providers {self.inference_providers!r}: use a comma-separated "
                f"list of {', '.join(PROVIDERS)}"
            )
        for key in ("inference_max_batch", "inference_recent_inputs"):
            if not 1 <= getattr(self, key) <= 1_000_000:
                raise ValueError(f"{key} must be 1-1000000, got {getattr(self, key)}")
        if not 0 <= self.inference_batch_wait_ms <= 1000:
            raise ValueError(
                "inference_batch_wait_ms must be 0 (off) to 1000, "
                f"got {self.inference_batch_wait_ms}"
            )
        if not 1 <= self.inference_batch_rows <= self.inference_max_batch:
            raise ValueError(
                f"inference_batch_rows must be 1 to inference_max_batch "
                f"({self.inference_max_batch}), got {self.inference_batch_rows}"
            )
        if not 1 <= self.inference_recent_mb <= 65536:
            raise ValueError(f"inference_recent_mb must be 1-65536, got {self.inference_recent_mb}")
        if not 0 <= self.inference_feedback_max_rows <= 10_000_000:
            raise ValueError(
                f"inference_feedback_max_rows must be 0-10000000, "
                f"got {self.inference_feedback_max_rows}"
            )

        for text in _split(self.model_keys):
            try:
                parse_key(text)
            except ValueError as exc:
                raise ValueError(
                    f"model_keys: {exc}; use the base64 key `fedge-coordinator public-key` "
                    "prints (comma-separated for several)"
                ) from None
        if not 0.0 <= self.offload_threshold <= 1.0:
            raise ValueError(f"offload_threshold must be 0-1, got {self.offload_threshold}")
        if not 1 <= self.offload_timeout_ms <= 60_000:
            raise ValueError(f"offload_timeout_ms must be 1-60000, got {self.offload_timeout_ms}")
        if self.offload and self.mqtt.protocol != "5":
            raise ValueError(
                'offload needs mqtt.protocol = "5" (MQTT 5 request/response); with 3.1.1'
                " every offloaded prediction would wait out offload_timeout_ms"
            )
        if not 1 <= self.low_confidence_max_rows <= 10_000_000:
            raise ValueError(
                f"low_confidence_max_rows must be 1-10000000, got {self.low_confidence_max_rows}"
            )

    @property
    def trusted_keys(self) -> tuple[bytes, ...]:
        """The pinned model-signing public keys (raw), from ``model_keys``."""
        return tuple(parse_key(text) for text in _split(self.model_keys))

    @property
    def providers(self) -> tuple[str, ...]:
        """The requested execution providers, short names, best first."""
        return _providers(self.inference_providers)


#: Execution providers `inference_providers` may name (onnx_runtime maps them).
PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SOCKET_NAME = "inference.sock"


def _providers(text: str) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in text.split(",") if p.strip())


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where the inference API listens: a Unix socket path, or a loopback host and port."""

    path: str | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: str, data_dir: str) -> ListenAddress:
    """`inference_listen` parsed: ``""`` (``<data_dir>/inference.sock``), ``unix:PATH``, or
    ``HOST:PORT`` on loopback; ValueError otherwise."""
    if not value:
        path = str(Path(data_dir) / SOCKET_NAME)
        if len(path.encode()) > 107:
            raise ValueError(
                f"inference_listen: the default socket {path} is longer than the 107 bytes a"
                ' Unix socket path may have; set inference_listen = "unix:/shorter/path"'
            )
        return ListenAddress(path=path)
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/") or len(path.encode()) > 107:
            raise ValueError(
                f"inference_listen {value!r}: unix: needs an absolute path of at most 107 bytes"
            )
        return ListenAddress(path=path)
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or host not in LOOPBACK_HOSTS or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"inference_listen {value!r}: use unix:/absolute/path or a loopback HOST:PORT "
            f"({', '.join(LOOPBACK_HOSTS)}; port 0-65535, 0 picks a free one)"
        )
    return ListenAddress(host=host, port=int(port))


def default_device_id() -> str:
    """A device id derived from the host name."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:64].strip("-")
    return name or "device"


def load_config(
    flags: Mapping[str, Any], environ: Mapping[str, str], config_path: str | None = None
) -> AgentConfig:
    """Build the config from defaults, the config file, `environ` and `flags` (later wins)."""
    defaults = {"device_id": default_device_id(), "data_dir": default_data_dir("fedge-agent")}
    return load(AgentConfig, defaults, flags, environ, "agent.toml", config_path)
