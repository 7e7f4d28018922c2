"""The coordinator's error tree.

CoordinatorError
├── ConfigError (protocols.config)  bad configuration; exit status 78
└── StoreError                      the state database is missing or unusable
"""

from __future__ import annotations

from protocols.config import ConfigError


class CoordinatorError(Exception):
    """Base of the coordinator's own errors."""


class StoreError(CoordinatorError):
    """The state database cannot be opened or used."""


__all__ = ["ConfigError", "CoordinatorError", "StoreError"]
