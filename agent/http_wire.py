"""HTTP/1.1 message heads for the local inference API: read, parse and format, no sockets.

The server (`agent.http_api`) and the client (`agent.client`) both use it. It covers what
a local API needs and refuses the rest with the status to answer: bodies framed by
Content-Length (a Transfer-Encoding is 501), persistent connections, ``Expect:
100-continue``, at most `MAX_HEADERS` header lines of at most `MAX_LINE_BYTES` each.
Parsing follows RFC 9112: no whitespace before a header's colon, no line folding, one
Content-Length value, no CR or NUL inside a header value, exactly one Host in an HTTP/1.1
request, and a target in origin form (``/path?query``) or absolute form
(``http://host/path``, whose authority stands for the Host). `read_head` takes a
``readline`` callable, so the framing is tested without a socket; every parser raises
`HttpWireError` and nothing else.
"""

from __future__ import annotations

import http
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.errors import AgentError
from protocols import web_origin

MAX_LINE_BYTES = 8192
MAX_HEADERS = 100
MAX_LEADING_BLANK_LINES = 8  # RFC 9112 2.2: blank lines before a request line are skipped

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_STATUS = re.compile(rb"[1-5][0-9][0-9]")
_REASONS = {int(s): s.phrase for s in http.HTTPStatus}


class HttpWireError(AgentError):
    """A message head that breaks the protocol or a limit; `status` is the answer to send."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request's line and headers (names lower-case; repeated ones joined by ``, ``)."""

    method: str
    target: str
    version: tuple[int, int]
    headers: Mapping[str, str]
    content_length: int | None

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.partition("?")[0]

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after the answer (HTTP/1.1 unless ``close``)."""
        tokens = _connection_tokens(self.headers)
        if self.version >= (1, 1):
            return "close" not in tokens
        return "keep-alive" in tokens

    @property
    def expects_continue(self) -> bool:
        """An HTTP/1.1 client waiting for ``100 Continue`` before it sends the body."""
        expect = self.headers.get("expect", "").lower()
        return self.version >= (1, 1) and expect == "100-continue"


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A response's status and headers (names lower-case)."""

    status: int
    headers: Mapping[str, str]
    content_length: int | None

    @property
    def closes(self) -> bool:
        """Whether the server closes the connection after this answer."""
        return "close" in _connection_tokens(self.headers)


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection")
    return {t.strip().lower() for t in value.split(",")} if value else set()


def read_head(readline: Callable[[int], bytes]) -> list[bytes] | None:
    """The lines of one message head, up to the blank line; None at a clean end of input."""
    lines: list[bytes] = []
    blanks = 0
    while True:
        line = readline(MAX_LINE_BYTES + 1)
        if not line:
            if lines or blanks:
                raise HttpWireError("the connection closed inside a message head")
            return None
        if not line.endswith(b"\n"):
            if len(line) <= MAX_LINE_BYTES:
                raise HttpWireError("the connection closed inside a message head")
            if not lines:
                raise HttpWireError(f"request line over {MAX_LINE_BYTES} bytes", 414)
            raise HttpWireError(f"header line over {MAX_LINE_BYTES} bytes", 431)
        if line == b"\r\n" or line == b"\n":
            if lines:
                return lines
            blanks += 1
            if blanks > MAX_LEADING_BLANK_LINES:
                raise HttpWireError("blank lines where a request line belongs")
            continue
        lines.append(line)
        if len(lines) > MAX_HEADERS + 1:
            raise HttpWireError(f"more than {MAX_HEADERS} header lines", 431)


def _headers(lines: Sequence[bytes]) -> tuple[dict[str, str], int | None]:
    headers: dict[str, str] = {}
    lengths: set[bytes] = set()
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpWireError(f"malformed header line {line[:60]!r}")
        value = value.strip(b" \t\r\n")
        if b"\r" in value or b"\0" in value:  # (RFC 9110 5.5: a bare CR, or NUL)
            raise HttpWireError(f"a CR or NUL inside header line {line[:60]!r}")
        key = name.decode("ascii").lower()
        if key == "content-length":
            lengths.update(v.strip(b" \t") for v in value.split(b","))
        elif key == "host" and key in headers:
            raise HttpWireError("more than one Host header")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if not lengths:
        return headers, None
    if len(lengths) > 1:
        raise HttpWireError("conflicting Content-Length values")
    (length,) = lengths
    if not length.isdigit() or len(length) > 15:
        raise HttpWireError(f"bad Content-Length {length[:20]!r}")
    return headers, int(length)


def _version(raw: bytes) -> tuple[int, int]:
    match = _VERSION.fullmatch(raw)
    if match is None:
        raise HttpWireError(f"bad HTTP version {raw[:20]!r}")
    version = (int(match[1]), int(match[2]))
    if version[0] != 1:
        raise HttpWireError(f"HTTP/{version[0]}.{version[1]} is not supported: use HTTP/1.1", 505)
    return version


def parse_request_head(lines: Sequence[bytes]) -> RequestHead:
    """The request `read_head` read; HttpWireError (with the status to answer) if malformed."""
    if not lines:
        raise HttpWireError("empty request")
    parts = lines[0].rstrip(b"\r\n").split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise HttpWireError(f"malformed request line {lines[0][:60]!r}")
    method, target, raw_version = parts
    authority = None
    if not target.startswith(b"/"):
        target, authority = _absolute_form(target)
    if any(c <= 0x20 or c >= 0x7F for c in target):
        raise HttpWireError(f"request target must be a path, got {target[:60]!r}")
    version = _version(raw_version)
    headers, length = _headers(lines[1:])
    if "transfer-encoding" in headers:
        raise HttpWireError("Transfer-Encoding bodies are not supported: send Content-Length", 501)
    if version >= (1, 1) and "host" not in headers:  # (RFC 9112 3.2)
        raise HttpWireError("an HTTP/1.1 request needs a Host header")
    if authority is not None:  # (RFC 9112 3.2.2: it replaces the Host header)
        headers["host"] = authority
    return RequestHead(method.decode("ascii"), target.decode("ascii"), version, headers, length)


def _absolute_form(target: bytes) -> tuple[bytes, str]:
    """(path and query, authority) of an absolute-form target ``http://host/path``."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise HttpWireError(f"request target must be a path, got {target[:60]!r}")
    end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    if not authority or any(c <= 0x20 or c >= 0x7F for c in authority):
        raise HttpWireError(f"request target has no host: {target[:60]!r}")
    return (path if path.startswith(b"/") else b"/" + path), authority.decode("ascii")


def check_local_request(head: RequestHead) -> None:
    """HttpWireError (403) if `head` comes from a web page, not a local program
    (`protocols.web_origin.refusal`: for a TCP listener, which a browser can reach)."""
    headers = head.headers
    why = web_origin.refusal(
        headers.get("host"), headers.get("origin"), headers.get("sec-fetch-site")
    )
    if why is not None:
        raise HttpWireError(why, 403)


def parse_response_head(lines: Sequence[bytes]) -> ResponseHead:
    """The response `read_head` read; HttpWireError if malformed or not framed by length."""
    if not lines:
        raise HttpWireError("empty response")
    parts = lines[0].rstrip(b"\r\n").split(b" ", 2)
    if len(parts) < 2 or not _STATUS.fullmatch(parts[1]):
        raise HttpWireError(f"malformed status line {lines[0][:60]!r}")
    _version(parts[0])
    headers, length = _headers(lines[1:])
    if "transfer-encoding" in headers:
        raise HttpWireError("a Transfer-Encoding answer: the local API frames by Content-Length")
    return ResponseHead(int(parts[1]), headers, length)


def format_response(
    status: int,
    body: bytes,
    content_type: str,
    close: bool = False,
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    """An HTTP/1.1 response with `body`, framed by Content-Length, as one buffer."""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    )
    for name, value in extra:
        head += f"{name}: {value}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode("latin-1") + body


def format_request(
    method: str, target: str, host: str, body: bytes | None = None, content_type: str = ""
) -> bytes:
    """An HTTP/1.1 request, its body framed by Content-Length, as one buffer."""
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
    if body is None:
        return (head + "\r\n").encode("latin-1")
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
