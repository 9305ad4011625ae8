"""The router's HTTP/1.1 parsing under hostile input, fuzzed with ``tests.hostile``."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given

from agent.router.errors import HttpError
from agent.router.http11 import parse_request, parse_response
from tests import hostile
from tests.hostile import CI


@CI
@given(head=hostile.request_heads())
def test_request_heads_are_refused_or_forwarded_in_one_form(head: bytes) -> None:
    """A request head is refused with 400/431/501/505, or has no bare CR or LF and goes
    upstream in one form that parses back to the same request."""
    hostile.check_request(head)


@CI
@given(head=hostile.response_heads())
def test_response_heads_are_refused_or_relayed_cleanly(head: bytes) -> None:
    """An upstream's response head is a 502 or reaches the client with CRLF line ends only."""
    hostile.check_response(head)


@CI
@given(body=hostile.chunked_bodies())
def test_chunked_bodies_are_refused_or_relayed_canonically(body: bytes) -> None:
    """A chunked body is refused with Broken or relayed in canonical chunked form."""
    loop = asyncio.new_event_loop()
    try:
        hostile.check_chunked(body, loop)
    finally:
        loop.close()


@CI
@given(line=hostile.chunked_bodies())
def test_chunk_size_lines_are_in_range_or_refused(line: bytes) -> None:
    """Any chunk-size line gives a size within MAX_CHUNK_SIZE or raises HttpError(400)."""
    hostile.check_chunk_line(line.partition(b"\n")[0] + b"\n")


# -- what the fuzzing found, kept as regression cases ---------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        # rstrip(b"\r\n") ate a bare LF before the final CRLF CRLF, and the head went upstream
        # verbatim, LF and all.
        b"GET /x HTTP/1.1\r\nHost: svc\n\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\r\n\r\n",
        # "$" matched before a final LF: a method or a header name ending in LF passed.
        b"GET\n /x HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: svc\r\nX-A\n: 1\r\n\r\n",
    ],
)
def test_found_by_fuzzing_request(head: bytes) -> None:
    """A head with a bare CR or LF the parser used to let through is refused with 400."""
    with pytest.raises(HttpError) as info:
        parse_request(head)
    assert info.value.status == 400
    hostile.check_request(head)


def test_found_by_fuzzing_response() -> None:
    """The shrunk case b'HTTP/1.1 200 OK\\n\\r\\n\\r\\n': a status line ending in a bare LF was
    relayed to the client verbatim; it is a 502 now."""
    with pytest.raises(HttpError) as info:
        parse_response(b"HTTP/1.1 200 OK\n\r\n\r\n", "GET")
    assert info.value.status == 502
    hostile.check_response(b"HTTP/1.1 200 OK\n\r\n\r\n")


def test_a_tab_in_the_request_target_is_refused() -> None:
    """``GET /a<TAB>HTTP/1.0 HTTP/1.1`` was forwarded as is: an upstream that splits the request
    line on any whitespace (RFC 9112 lets it) reads another target and version. Found by a
    review."""
    with pytest.raises(HttpError) as info:
        parse_request(b"GET /a\tHTTP/1.0 HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert info.value.status == 400
