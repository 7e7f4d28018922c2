"""Which HTTP requests come from web pages: the check both sides' HTTP APIs make (pure).

The agent's local API and the coordinator's API have no authentication and are meant for
programs on the same machine (or behind a proxy that adds authentication). A browser on
that machine can still reach them: a page can send a cross-site form or fetch, and a
page on a DNS name rebound to 127.0.0.1 becomes same-origin with the API. `refusal`
tells such a request from a program's by its headers, which programs other than
browsers do not send.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["is_local_host", "refusal"]


def _host_part(authority: str) -> str | None:
    """The host of a ``Host`` header value (no port, no brackets), or None if malformed."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[1:end] if end > 0 else None
    return authority.rpartition(":")[0] if ":" in authority else authority


def is_local_host(authority: str, also: Iterable[str] = ()) -> bool:
    """Whether a ``Host`` value names this machine: ``localhost`` (RFC 6761), an IP
    literal, or one of the names in `also` (say, the name the API is bound to).

    Only a DNS name can be rebound to 127.0.0.1 by a web page; an IP literal that reached
    the socket is one of the machine's own addresses.
    """
    host = _host_part(authority)
    if host is None:
        return False
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost") or host in also:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def refusal(
    host: str | None, origin: str | None, fetch_site: str | None, also: Iterable[str] = ()
) -> str | None:
    """Why a request with these ``Host``, ``Origin`` and ``Sec-Fetch-Site`` headers comes
    from a web page (a message for a 403), or None for a program's request.

    Refused: a Host that is not a local name (a DNS-rebinding page), an Origin other than
    the API's own, a ``Sec-Fetch-Site`` other than ``same-origin`` or ``none``.
    """
    if host is not None and not is_local_host(host, also):
        return f"Host {host[:80]!r} is not a local name: address the API as localhost or by IP"
    if (origin is not None and origin != f"http://{host}") or fetch_site not in (
        None, "same-origin", "none",
    ):  # fmt: skip
        return "requests from web pages are refused: the API is for local programs"
    return None
