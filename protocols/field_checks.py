"""Checks message fields make in ``__post_init__`` (pure): each raises ValueError, which
decoders report as ``bad_field``."""

from __future__ import annotations

import math
from collections.abc import Iterable

from protocols.topics import valid_id

#: The largest counter a message may carry (what SQLite's INTEGER holds).
MAX_COUNT = (1 << 63) - 1
_HEX = frozenset("0123456789abcdef")


def ids(**values: str) -> None:
    """ValueError unless every value is a valid identifier (`protocols.topics.valid_id`)."""
    for what, value in values.items():
        if not valid_id(value):
            raise ValueError(f"{what} {value!r} is not a valid identifier")


def finite(what: str, values: Iterable[float]) -> None:
    """ValueError unless every value is finite (the encoder refuses NaN and Inf too)."""
    if not all(map(math.isfinite, values)):
        raise ValueError(f"{what} must be finite numbers, not NaN or Inf")


def counts(**values: int) -> None:
    """ValueError unless every value is a counter: 0 to `MAX_COUNT`."""
    for what, value in values.items():
        if not 0 <= value <= MAX_COUNT:
            raise ValueError(f"{what} must be 0 to 2**63-1, got {value}")


def valid_sha256(value: str) -> bool:
    """Whether `value` is a sha256 as the protocol writes it: 64 lowercase hex digits."""
    return len(value) == 64 and _HEX.issuperset(value)


def sha256(value: str) -> None:
    """ValueError unless `value` is a sha256 as the protocol writes it."""
    if not valid_sha256(value):
        raise ValueError("sha256 must be 64 lowercase hex digits")
