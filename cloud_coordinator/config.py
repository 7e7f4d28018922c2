"""The coordinator's configuration: one frozen object, loaded once from file, env, then flags.

Files, first found wins: ``--config PATH``, ``$FEDGE_CONFIG``, ``/etc/fedge/coordinator.toml``,
``$XDG_CONFIG_HOME/fedge/coordinator.toml``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from protocols.config import BrokerConfig, default_data_dir, load
from protocols.topics import valid_id

DB_NAME = "coordinator.db"


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything the coordinator needs to know."""

    data_dir: str
    coordinator_id: str = "main"
    http_host: str = "127.0.0.1"
    http_port: int = 8780
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "text", "journal"] = "auto"
    aggregation_device: Literal["auto", "cpu", "cuda"] = "auto"
    aggregation_threads: int = 0
    chunk_size: int = 256 * 1024
    mqtt: BrokerConfig = field(default_factory=BrokerConfig)

    def __post_init__(self) -> None:
        if not valid_id(self.coordinator_id):
            raise ValueError(f"coordinator_id {self.coordinator_id!r} is not a valid identifier")
        if self.aggregation_threads < 0:
            raise ValueError(f"aggregation_threads must be >= 0, got {self.aggregation_threads}")
        if self.chunk_size < 1024:
            raise ValueError(f"chunk_size must be at least 1024 bytes, got {self.chunk_size}")
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be 0-65535, got {self.http_port}")

    @property
    def effective_chunk_size(self) -> int:
        """`chunk_size`, lowered so a chunk message fits under the broker payload cap."""
        return max(1024, min(self.chunk_size, self.mqtt.max_payload_bytes - 1024))

    @property
    def db_path(self) -> Path:
        """The SQLite state database."""
        return Path(self.data_dir) / DB_NAME


def load_config(
    flags: Mapping[str, Any], environ: Mapping[str, str], config_path: str | None = None
) -> CoordinatorConfig:
    """Build the config from defaults, the config file, `environ` and `flags` (later wins)."""
    defaults = {"data_dir": default_data_dir("fedge-coordinator")}
    return load(CoordinatorConfig, defaults, flags, environ, "coordinator.toml", config_path)
