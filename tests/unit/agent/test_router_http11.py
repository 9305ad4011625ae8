"""HTTP/1.1 head parsing and rewriting for the router: edge cases and garbage, no sockets."""

from __future__ import annotations

import contextlib
import os

import pytest

from agent.router.http11 import (
    HttpError,
    client_response_head,
    error_response,
    parse_chunk_size,
    parse_request,
    parse_response,
    upstream_request_head,
)


def test_request_head_is_rewritten_for_the_upstream() -> None:
    """Hop-by-hop headers (and those Connection names) go; Host stays; XFF is appended."""
    req = parse_request(
        b"GET /p?q=1 HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nX-Forwarded-For: 10.0.0.1\r\nAccept: */*\r\n\r\n"
    )
    assert (req.method, req.target, req.keep_alive) == ("GET", "/p?q=1", True)
    assert req.content_length is None
    head = upstream_request_head(req, "127.0.0.9")
    assert head == (
        b"GET /p?q=1 HTTP/1.1\r\nHost: svc\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 10.0.0.1, 127.0.0.9\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("head", "keep"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
    ],
)
def test_client_persistence(head: bytes, keep: bool) -> None:
    """HTTP/1.1 persists unless Connection: close; HTTP/1.0 only with keep-alive."""
    assert parse_request(head).keep_alive is keep


def test_request_body_framing() -> None:
    """Content-Length and chunked are understood; Expect: 100-continue is taken by the router."""
    req = parse_request(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n")
    assert (req.content_length, req.chunked, req.has_body) == (12, False, True)
    req = parse_request(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert req.chunked and req.expect_continue
    assert all(n.lower() != b"expect" for n, _ in req.headers)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/3\r\nHost: x\r\n\r\n", 505),
        (b"GET / FTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nA: b\x00c\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
         400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"A: b\r\n" * 200 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nA: " + b"b" * 70000 + b"\r\n\r\n", 431),
    ],
)
def test_garbage_requests_get_the_right_status(head: bytes, status: int) -> None:
    """Each malformed head raises HttpError with the status the router answers."""
    with pytest.raises(HttpError) as info:
        parse_request(head)
    assert info.value.status == status


def test_random_bytes_never_raise_anything_but_http_error() -> None:
    """Random garbage either parses or raises HttpError: never another exception."""
    for i in range(2000):
        data = os.urandom(i % 300)
        for blob in (data, b"GET / HTTP/1.1\r\n" + data + b"\r\n\r\n"):
            with contextlib.suppress(HttpError):
                parse_request(blob)
            with contextlib.suppress(HttpError):
                parse_response(blob, "GET")


@pytest.mark.parametrize(
    ("head", "method", "body", "keep"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "GET", "length", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD", "none", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", "chunked", True),
        (b"HTTP/1.1 200 OK\r\n\r\n", "GET", "close", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", "none", True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", "GET", "none", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "POST", "none", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", "GET", "length",
         False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", "GET", "length", False),
    ],
)
def test_response_framing(head: bytes, method: str, body: str, keep: bool) -> None:
    """Body framing follows HEAD, 1xx/204/304, chunked, length, else until close."""
    resp = parse_response(head, method)
    assert (resp.body, resp.keep_alive) == (body, keep)


def test_bad_responses_are_502() -> None:
    """A malformed upstream status line or framing becomes a 502 for the user."""
    for head in (b"HTTP/1.1 2000 OK\r\n\r\n", b"garbage\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"):
        with pytest.raises(HttpError) as info:
            parse_response(head, "GET")
        assert info.value.status == 502


def test_client_response_head() -> None:
    """The client gets the upstream's headers minus hop-by-hop, plus our own persistence."""
    resp = parse_response(
        b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n", "GET"
    )
    assert client_response_head(resp, keep_alive=False, http10=False) == (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert b"Connection: keep-alive" in client_response_head(resp, keep_alive=True, http10=True)


def test_chunk_sizes_and_error_responses() -> None:
    """Chunk sizes parse with extensions; garbage is refused; error responses are complete."""
    assert parse_chunk_size(b"1a;name=v\r\n") == 26
    assert parse_chunk_size(b"0\r\n") == 0
    for bad in (b"\r\n", b"zz\r\n", b"-1\r\n", b"1" * 20 + b"\r\n"):
        with pytest.raises(HttpError):
            parse_chunk_size(bad)
    resp = error_response(503, "no healthy upstream")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert f"Content-Length: {len(body)}".encode() in head and b"Connection: close" in head


def _normalized(head: bytes) -> list[bytes]:
    """Head lines with the spacing around header values normalized, for comparing heads."""
    lines = head.split(b"\r\n")
    return [lines[0]] + [b"%s: %s" % (n, v.strip()) for n, _, v in
                         (ln.partition(b":") for ln in lines[1:] if ln)]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept:  */*  \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Drop: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"\r\nGET / HTTP/1.0\r\nHost: x\r\n\r\n",
    ],
)
def test_verbatim_request_head_equals_the_rebuilt_one(head: bytes) -> None:
    """Forwarding a request head as received gives what rebuilding it would (spacing aside)."""
    req = parse_request(head)
    fast = upstream_request_head(req, "127.0.0.9")
    req.raw = b""
    assert _normalized(fast) == _normalized(upstream_request_head(req, "127.0.0.9"))


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A:  b \r\n\r\n",
        b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n",
    ],
)
@pytest.mark.parametrize(("keep", "http10"), [(True, False), (False, False), (True, True)])
def test_verbatim_response_head_equals_the_rebuilt_one(
    head: bytes, keep: bool, http10: bool
) -> None:
    """Passing a response head through as received gives what rebuilding it would."""
    resp = parse_response(head, "GET")
    fast = client_response_head(resp, keep_alive=keep, http10=http10)
    resp.raw = b""
    slow = client_response_head(resp, keep_alive=keep, http10=http10)
    assert _normalized(fast) == _normalized(slow)
    assert fast.endswith(b"\r\n\r\n") and fast.count(b"\r\n\r\n") == 1


def test_only_heads_with_nothing_to_remove_pass_verbatim() -> None:
    """A clean head is kept as received; one with hop-by-hop headers or XFF is rebuilt."""
    clean = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert parse_request(clean).raw == clean
    assert parse_request(b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n").raw == b""
    assert parse_request(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: a\r\n\r\n").raw == b""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert parse_response(ok, "GET").raw == ok
    assert parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", "GET").raw == b""
    assert parse_response(b"HTTP/1.1 200 OK\r\nKeep-Alive: 5\r\n\r\n", "GET").raw == b""
