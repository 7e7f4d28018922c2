"""The agent's error tree.

AgentError
└── IllegalTransitionError   a lifecycle event that is not allowed in the current state

Shared with the coordinator: `protocols.config.ConfigError` (bad configuration; the daemon
exits with status 78).
"""

from __future__ import annotations

from protocols.config import ConfigError


class AgentError(Exception):
    """Base of the agent's own errors."""


class IllegalTransitionError(AgentError):
    """A lifecycle event arrived in a state where it is not allowed."""


__all__ = ["AgentError", "ConfigError", "IllegalTransitionError"]
