"""agent.http_wire: message heads read from bytes, parsed and formatted, without sockets."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.http_wire import (
    MAX_HEADERS,
    MAX_LINE_BYTES,
    HttpWireError,
    RequestHead,
    format_request,
    format_response,
    parse_request_head,
    parse_response_head,
    read_head,
)


def _request(data: bytes) -> RequestHead:
    lines = read_head(io.BytesIO(data).readline)
    assert lines is not None
    return parse_request_head(lines)


def _status_of(data: bytes) -> int:
    with pytest.raises(HttpWireError) as caught:
        _request(data)
    return caught.value.status


def test_a_post_with_its_headers() -> None:
    head = _request(
        b"POST /v1/predict?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
        b"\r\nContent-Length:  12 \r\nX-A: 1\r\nx-a: 2\r\n\r\n{...body...}"
    )
    assert (head.method, head.target, head.path, head.version) == (
        "POST", "/v1/predict?x=1", "/v1/predict", (1, 1),
    )  # fmt: skip
    assert head.content_length == 12
    assert head.headers["content-type"] == "application/json"
    assert head.headers["x-a"] == "1, 2"
    assert head.keep_alive
    assert not head.expects_continue


@pytest.mark.parametrize(
    ("version", "connection", "keep"),
    [
        (b"1.1", b"", True),
        (b"1.1", b"Connection: close\r\n", False),
        (b"1.1", b"Connection: Keep-Alive, Close\r\n", False),
        (b"1.0", b"", False),
        (b"1.0", b"Connection: keep-alive\r\n", True),
    ],
)
def test_persistence_follows_the_version_and_connection_header(
    version: bytes, connection: bytes, keep: bool
) -> None:
    head = _request(b"GET /healthz HTTP/" + version + b"\r\nHost: x\r\n" + connection + b"\r\n")
    assert head.keep_alive is keep
    assert head.content_length is None


def test_expect_continue_only_from_http_1_1() -> None:
    ask = b"Host: x\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n"
    assert _request(b"POST / HTTP/1.1\r\n" + ask).expects_continue
    assert not _request(b"POST / HTTP/1.0\r\n" + ask).expects_continue


def test_bare_newlines_and_leading_blank_lines_are_accepted() -> None:
    head = _request(b"\r\n\nGET /metrics HTTP/1.1\nHost: x\n\n")
    assert (head.path, head.headers["host"]) == ("/metrics", "x")


def test_an_absolute_form_target_is_taken_its_authority_standing_for_the_host() -> None:
    head = _request(b"GET http://127.0.0.1:8790/healthz?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (head.target, head.path) == ("/healthz?x=1", "/healthz")
    assert head.headers["host"] == "127.0.0.1:8790"  # (RFC 9112 3.2.2)
    assert _request(b"GET HTTP://localhost?a HTTP/1.0\r\n\r\n").target == "/?a"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /\r\n\r\n", 400),  # HTTP/0.9
        (b"GET  / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http:///a HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # (absolute form, no host)
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # RFC 9112 3.2: HTTP/1.1 needs a Host
        (b"GET / HTTP/1.1\r\nHost: x\r\nhost: y\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),  # a bare CR
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
        (b"GET /\x7f HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTPS/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: 1\r\n folded\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 9999999999999999\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: x\r\n", 400),  # closed inside the head
        (b"GET / HTTP/1.1\r\nHost: x", 400),
        (b"\r\n" * 9 + b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET /" + b"a" * MAX_LINE_BYTES + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nA: " + b"a" * MAX_LINE_BYTES + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"A: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
    ],
)
def test_malformed_requests_name_the_status_to_answer(data: bytes, status: int) -> None:
    assert _status_of(data) == status


def test_the_limits_themselves_are_accepted() -> None:
    name_and_colon = b"A: "
    line = name_and_colon + b"a" * (MAX_LINE_BYTES - len(name_and_colon) - 2) + b"\r\n"
    assert len(line) == MAX_LINE_BYTES
    head = _request(b"GET / HTTP/1.0\r\n" + line * MAX_HEADERS + b"\r\n")  # (no Host)
    assert len(head.headers["a"]) == MAX_HEADERS * (MAX_LINE_BYTES - 5) + 2 * (MAX_HEADERS - 1)
    head = _request(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n")
    assert head.content_length == 3


def test_a_clean_end_of_input_is_none_and_one_head_is_read_at_a_time() -> None:
    assert read_head(io.BytesIO(b"").readline) is None
    stream = io.BytesIO(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
    paths = []
    while (lines := read_head(stream.readline)) is not None:
        paths.append(parse_request_head(lines).path)
    assert paths == ["/a", "/b"]


def test_responses_parse_and_refuse_other_framing() -> None:
    lines = read_head(
        io.BytesIO(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}").readline
    )
    assert lines is not None
    head = parse_response_head(lines)
    assert (head.status, head.content_length, head.closes) == (503, 2, False)
    head = parse_response_head([b"HTTP/1.0 200\r\n", b"Connection: close\r\n"])
    assert (head.status, head.content_length, head.closes) == (200, None, True)
    for bad in (
        [b"HTTP/1.1 20 OK\r\n"],
        [b"HTTP/1.1\r\n"],
        [b"SPDY/1.1 200 OK\r\n"],
        [b"HTTP/1.1 200 OK\r\n", b"Transfer-Encoding: chunked\r\n"],
        [],
    ):
        with pytest.raises(HttpWireError):
            parse_response_head(bad)


def test_golden_bytes_of_what_is_written() -> None:
    assert format_response(200, b"{}", "application/json") == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert format_response(405, b"", "text/plain", close=True, extra=[("Allow", "GET")]) == (
        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n"
        b"Allow: GET\r\nConnection: close\r\n\r\n"
    )
    assert format_request("GET", "/healthz", "localhost") == (
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    assert format_request("POST", "/v1/predict", "127.0.0.1:8790", b"{}", "application/json") == (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:8790\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )


def test_what_is_written_reads_back() -> None:
    request = format_request("POST", "/v1/feedback", "h", b"abc", "application/msgpack")
    stream = io.BytesIO(request)
    lines = read_head(stream.readline)
    assert lines is not None
    head = parse_request_head(lines)
    assert (head.method, head.content_length, stream.read()) == ("POST", 3, b"abc")
    response = format_response(404, b"nope", "text/plain", close=True)
    stream = io.BytesIO(response)
    lines = read_head(stream.readline)
    assert lines is not None
    answer = parse_response_head(lines)
    assert (answer.status, answer.closes, stream.read()) == (404, True, b"nope")


_VALID = format_request("POST", "/v1/predict", "localhost", b'{"input": [1]}', "application/json")


def _statuses(data: bytes) -> list[int]:
    """Statuses of the HttpWireErrors met reading `data` as heads, each parsed both ways."""
    stream = io.BytesIO(data)
    statuses: list[int] = []
    while True:
        try:
            lines = read_head(stream.readline)
        except HttpWireError as exc:
            return [*statuses, exc.status]
        if lines is None:
            return statuses
        for parse in (parse_request_head, parse_response_head):
            try:
                parse(lines)
            except HttpWireError as exc:
                statuses.append(exc.status)


@given(st.binary(max_size=600))
def test_random_bytes_only_raise_http_wire_error(data: bytes) -> None:
    assert set(_statuses(data)) <= {400, 414, 431, 501, 505}


@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=6))
def test_mutated_requests_only_raise_http_wire_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_VALID)
    for at, value in edits:
        data[at] = value
    assert set(_statuses(bytes(data))) <= {400, 414, 431, 501, 505}


def test_the_fuzz_oracle_sees_errors() -> None:
    assert _statuses(format_request("GET", "/", "h")) == [400]  # a request is not a response
    assert _statuses(_VALID) == [400, 400]  # ... and its body is not a head
    assert _statuses(b"GET / HTTP/3.0\r\n\r\n") == [505, 400]
