"""The agent's configuration: one frozen object, loaded once from file, then env, then flags.

Files, first found wins: ``--config PATH``, ``$FEDGE_CONFIG``, ``/etc/fedge/agent.toml``,
``$XDG_CONFIG_HOME/fedge/agent.toml`` (``~/.config/fedge/agent.toml``).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from protocols.config import BrokerConfig, default_data_dir, load
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
    dataset_dir: str | None = None
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
