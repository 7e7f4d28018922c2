"""Fedge wire protocol v1: topics, versioned msgpack messages, tensor and chunk codecs.

Every module here is pure (bytes in, frozen dataclasses out) except `protocols.mqtt`, the
one paho adapter that the agent and the coordinator share; no pure module imports it.
"""

from protocols._version import __version__

PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "__version__"]
