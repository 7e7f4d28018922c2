"""The error tree of the wire protocol.

    ProtocolError
    ├── DecodeError        bytes from the wire could not be turned into a message (the peer's fault)
    │   ├── VersionError   the message names a major version this side does not speak
    │   └── RefusedMessageError  a valid message this side must not act on: meant for another
    │                            receiver (``wrong_device``), or older than one it acted on
    │                            (``replayed``)
    └── EncodeError        a message could not be encoded (this side's fault)

`DecodeError` is the only exception a decoder lets out, whatever the input. Each carries a
short machine-readable ``reason`` so receivers can count rejections by cause.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error raised by `protocols`."""

    reason: str = "protocol"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class DecodeError(ProtocolError):
    """Bytes received from a peer are not a valid message."""

    reason = "malformed"


class VersionError(DecodeError):
    """A message names a major version this side does not speak."""

    reason = "version"


class RefusedMessageError(DecodeError):
    """A well-formed, authentic message that is not for this receiver, or a replay."""

    reason = "replayed"


class EncodeError(ProtocolError):
    """A local value cannot be encoded as a message."""

    reason = "encode"
