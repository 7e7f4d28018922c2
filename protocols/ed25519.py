"""Ed25519 signature verification (RFC 8032, section 5.1.7) in pure Python.

Devices only ever verify: a manifest signature, once per model version. Doing it here keeps
the `cryptography` package (about 6 MB resident, and its wheel) off the device; the
coordinator, which signs, still uses `cryptography` (`protocols.signing`). Verification
handles only public data, so its timing needs no care; one call takes a few milliseconds.

The check is the one OpenSSL's makes: the public key and ``R`` decode as points on the
curve, ``S`` is below the group order, and ``[S]B - [k]A`` encodes to exactly ``R``, with
``k = SHA-512(R || A || message) mod L``. `tests/protocols/test_ed25519.py` compares every
answer with `cryptography`'s, on valid and on altered signatures.
"""

from __future__ import annotations

import hashlib

_P = 2**255 - 19  # the field's prime
_L = 2**252 + 27742317777372353535851937790883648493  # the base point's order
_D = -121665 * pow(121666, _P - 2, _P) % _P  # the curve constant d
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)  # a square root of -1

#: A point in extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, x*y = T/Z.
_Point = tuple[int, int, int, int]
_IDENTITY: _Point = (0, 1, 1, 0)

SIGNATURE_BYTES = 64
KEY_BYTES = 32


def _add(p: _Point, q: _Point) -> _Point:
    """p + q (the unified formula for a = -1: also right for p == q)."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = 2 * _D * t1 * t2 % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _multiply(scalar: int, point: _Point) -> _Point:
    """[scalar]point, by double-and-add over the scalar's bits."""
    result = _IDENTITY
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _x_of(y: int, sign: int) -> int | None:
    """The x with the given low bit on the curve at `y`, or None if there is none."""
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x2 = u * pow(v, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
        if (x * x - x2) % _P:
            return None
    return _P - x if x & 1 != sign else x


def _decode(data: bytes) -> _Point | None:
    """The point a 32-byte encoding names, or None if it names none."""
    n = int.from_bytes(data, "little")
    y = n & ((1 << 255) - 1)
    x = _x_of(y, n >> 255)
    return None if x is None else (x, y, 1, x * y % _P)


def _encode(point: _Point) -> bytes:
    x, y, z, _ = point
    inverse = pow(z, _P - 2, _P)
    x, y = x * inverse % _P, y * inverse % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


_BY = 4 * pow(5, _P - 2, _P) % _P
_BASE: _Point = (_x_of(_BY, 0) or 0, _BY, 1, (_x_of(_BY, 0) or 0) * _BY % _P)


def signature_matches(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    if len(public_key) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    a = _decode(bytes(public_key))
    r_bytes = bytes(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or s >= _L or _decode(r_bytes) is None:
        return False
    digest = hashlib.sha512(r_bytes + bytes(public_key) + bytes(message)).digest()
    k = int.from_bytes(digest, "little") % _L
    minus_a = ((_P - a[0]) % _P, a[1], a[2], (_P - a[3]) % _P)
    return _encode(_add(_multiply(s, _BASE), _multiply(k, minus_a))) == r_bytes
