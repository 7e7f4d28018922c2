"""The coordinator's error tree.

CoordinatorError
└── StoreError   the state database is missing or unusable

Shared with the agent: `protocols.config.ConfigError` (bad configuration; exit status 78).
"""

from __future__ import annotations

from protocols.config import ConfigError


class CoordinatorError(Exception):
    """Base of the coordinator's own errors."""


class StoreError(CoordinatorError):
    """The state database cannot be opened or used."""


__all__ = ["ConfigError", "CoordinatorError", "StoreError"]
