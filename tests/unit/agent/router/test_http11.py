"""HTTP/1.1 head parsing and rewriting for the router: edge cases and garbage, no sockets."""

from __future__ import annotations

import contextlib
import os

import pytest

from agent.router.channel import Channel
from agent.router.errors import Broken, HttpError
from agent.router.http11 import (
    MAX_CHUNK_LINE,
    MAX_HEAD,
    bare_line_end,
    client_response_head,
    error_response,
    parse_chunk_size,
    parse_request,
    parse_response,
    upstream_request_head,
)
from agent.router.upstream import BodyReader


def test_request_head_is_rewritten_for_the_upstream() -> None:
    """Hop-by-hop headers (and those Connection names) go; Host stays; XFF is the peer's."""
    req = parse_request(
        b"GET /p?q=1 HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nX-Forwarded-For: 10.0.0.1\r\nAccept: */*\r\n\r\n"
    )
    assert (req.method, req.target, req.keep_alive) == ("GET", "/p?q=1", True)
    assert req.content_length is None
    head = upstream_request_head(req, "127.0.0.9")
    assert head == (
        b"GET /p?q=1 HTTP/1.1\r\nHost: svc\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 127.0.0.9\r\n\r\n"
    )


def test_x_forwarded_for_is_set_at_the_edge() -> None:
    """A client's own X-Forwarded-For (every line of it) is replaced by the peer address."""
    req = parse_request(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"x-forwarded-for: 6.6.6.6, 7.7.7.7\r\n\r\n"
    )
    assert req.forwarded
    head = upstream_request_head(req, "192.0.2.7")
    assert head == b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n"


def test_x_forwarded_for_of_a_trusted_proxy_is_appended_to() -> None:
    """Behind a trusted proxy its X-Forwarded-For lines are kept, in order, and the peer added."""
    req = parse_request(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"x-forwarded-for: 6.6.6.6, 7.7.7.7\r\n\r\n"
    )
    head = upstream_request_head(req, "192.0.2.7", trusted_proxy=True)
    assert head == (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        b"X-Forwarded-For: 10.0.0.1, 6.6.6.6, 7.7.7.7, 192.0.2.7\r\n\r\n"
    )
    plain = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not plain.forwarded
    assert upstream_request_head(plain, "192.0.2.7", trusted_proxy=True).endswith(
        b"X-Forwarded-For: 192.0.2.7\r\n\r\n"
    )


@pytest.mark.parametrize(
    "name", [b"X_Forwarded_For", b"x-forwarded_for", b"X_Real_IP", b"X_Remote_User"]
)
@pytest.mark.parametrize("trusted", [False, True])
def test_a_header_whose_name_has_an_underscore_is_dropped(name: bytes, trusted: bool) -> None:
    """``X_Forwarded_For`` went upstream as sent, beside the X-Forwarded-For the router set: a
    CGI/WSGI server maps both to HTTP_X_FORWARDED_FOR and merges them (a review spoofed the
    client address through wsgiref so). Every name with an underscore is dropped, as nginx does,
    whoever the peer; other headers and underscores in values stay."""
    req = parse_request(
        b"GET /a_b HTTP/1.1\r\nHost: x\r\n" + name + b": 6.6.6.6\r\nCookie: fw_id=a_b\r\n\r\n"
    )
    head = upstream_request_head(req, "192.0.2.7", trusted_proxy=trusted)
    assert head == (
        b"GET /a_b HTTP/1.1\r\nHost: x\r\nCookie: fw_id=a_b\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n"
    )


FORWARDING = (
    b"Forwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\n"
    b"X-Forwarded-Host: bank.example\r\nx-forwarded-proto: https\r\nX-Forwarded-Port: 443\r\n"
)


def test_forwarding_headers_of_an_untrusted_client_are_dropped() -> None:
    """Forwarded, X-Real-IP and the X-Forwarded- family from a peer that is no trusted proxy are
    its own claims about its address, host and scheme: dropped, like its X-Forwarded-For."""
    req = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n" + FORWARDING + b"Accept: */*\r\n\r\n")
    assert req.forwarded and not req.raw
    assert upstream_request_head(req, "192.0.2.7") == (
        b"GET / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n"
    )


def test_forwarding_headers_of_a_trusted_proxy_are_kept() -> None:
    """A trusted proxy's forwarding headers go on as it sent them (X-Forwarded-For appended to)."""
    req = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n" + FORWARDING + b"\r\n")
    assert upstream_request_head(req, "192.0.2.7", trusted_proxy=True) == (
        b"GET / HTTP/1.1\r\nHost: x\r\n" + FORWARDING + b"X-Forwarded-For: 192.0.2.7\r\n\r\n"
    )


@pytest.mark.parametrize(
    "connection",
    [b"Content-Length", b"transfer-encoding", b"HOST", b"keep-alive, Content-Length",
     b"close,Transfer-Encoding"],
)
def test_connection_may_not_name_framing_or_host(connection: bytes) -> None:
    """A Connection token naming Content-Length, Transfer-Encoding or Host is refused with 400.

    Dropping the header it names after the router framed the body on it would let the upstream
    read the body as a request of its own (request smuggling).
    """
    for framing in (b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b""):
        head = (b"POST / HTTP/1.1\r\nHost: x\r\n" + framing + b"Connection: " + connection
                + b"\r\n\r\n")
        with pytest.raises(HttpError) as info:
            parse_request(head)
        assert info.value.status == 400
        assert "Connection" in str(info.value)


def test_upstream_framing_headers_outlive_its_connection_tokens() -> None:
    """A response whose Connection names Content-Length still reaches the client with it."""
    resp = parse_response(
        b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Hop\r\nX-Hop: 1\r\n"
        b"Content-Length: 2\r\n\r\n",
        "GET",
    )
    assert (resp.body, resp.content_length) == ("length", 2)
    head = client_response_head(resp, keep_alive=True, http10=False)
    assert head == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"


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
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert req.chunked and req.expect_continue
    assert all(n.lower() != b"expect" for n, _ in req.headers)


@pytest.mark.parametrize("te", [b"gzip, chunked", b"deflate,chunked", b"x-custom , Chunked"])
def test_a_request_coding_before_chunked_is_refused_501(te: bytes) -> None:
    """Valid HTTP/1.1 that no client sends: an upstream reading only an exact "chunked" (older
    gunicorn, waitress) would take the body for the next request. 501, as nginx answers."""
    with pytest.raises(HttpError) as refused:
        parse_request(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    assert refused.value.status == 501


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
        # RFC 9112 6.3: chunked not last in a request: the length is unknown, 400 and close.
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x/y\r\n\r\n", 400),
        # "$" matched before a final LF: a method or a name ending in LF went upstream as it was.
        (b"GET\n /x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nX-A\n: 1\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\nHost: x\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\rX: 1\r\n\r\n", 400),
        (b"GET x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://u@evil/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 501),
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
    assert parse_chunk_size(b"1A ; a ; b = \"x;y\\\"z\"\t\r\n") == 26
    assert parse_chunk_size(b"0\r\n") == 0
    assert parse_chunk_size(b"7fffffffffffffff\r\n") == 2**63 - 1
    for bad in (b"\r\n", b"zz\r\n", b"-1\r\n", b"1" * 20 + b"\r\n", b"8000000000000000\r\n",
                b"ffffffffffffffff\r\n", b"0x5\r\n", b"+5\r\n"):
        with pytest.raises(HttpError):
            parse_chunk_size(bad)
    resp = error_response(503, "no healthy upstream")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert f"Content-Length: {len(body)}".encode() in head and b"Connection: close" in head


@pytest.mark.parametrize(
    "line",
    [
        b"5\nGET / HTTP/1.1\r\n",  # a bare LF: another parser may end the line there
        b"5;a=b\nc\r\n",
        b"5;a\rb\r\n",
        b"5;a=\x00\r\n",
        b"5;\r\n",  # an extension without a name
        b"5;a=\"open\r\n",  # an unterminated quoted string
        b"5;a b\r\n",
        b"5 6\r\n",
        b"5",  # no CRLF at all
        b"5;x=" + b"y" * MAX_CHUNK_LINE + b"\r\n",
    ],
)
def test_malformed_chunk_lines_are_refused(line: bytes) -> None:
    """Bare LF or CR, control characters, bad extensions and over-long lines raise HttpError."""
    with pytest.raises(HttpError) as info:
        parse_chunk_size(line)
    assert info.value.status == 400


def _reader(data: bytes, limit: int = 1 << 20) -> BodyReader:
    """A BodyReader over a channel that already holds ``data`` and then its end (no socket)."""
    channel = Channel(limit)
    channel.buf += data
    channel.eof = True
    return BodyReader(channel, "chunked", 0, 5.0)


async def _forwarded(data: bytes) -> bytes:
    reader = _reader(data)
    out = b""
    while piece := await reader.read():
        out += piece
    assert reader.done
    return out


async def test_chunked_body_is_forwarded_without_extensions_or_trailers() -> None:
    """Chunk extensions are checked then dropped; trailers are checked then dropped."""
    body = (
        b"5;name=value\r\nhello\r\n"
        b"1A ; q=\"a;b\"\r\n" + b"x" * 26 + b"\r\n"
        b"0;last\r\nX-Checksum: abc\r\nContent-Length: 99\r\n\r\n"
    )
    assert await _forwarded(body) == (
        b"5\r\nhello\r\n1a\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n"
    )


@pytest.mark.parametrize(
    "body",
    [
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after the size
        b"5;a=b\nc\r\nhello\r\n0\r\n\r\n",  # bare LF inside an extension
        b"5;" + b"e" * MAX_CHUNK_LINE + b"\r\nhello\r\n0\r\n\r\n",  # over MAX_CHUNK_LINE
        b"5;" + b"e" * (2 * MAX_CHUNK_LINE),  # no line end within MAX_CHUNK_LINE
        b"5\r\nhello\n0\r\n\r\n",  # chunk data ended by a bare LF
        b"0\r\nX-A: 1\nX-B: 2\r\n\r\n",  # bare LF in the trailers
        b"0\r\nnot a header\r\n\r\n",
        b"0\r\nX-A: \x01\r\n\r\n",
        b"0\r\n folded: 1\r\n\r\n",
        b"0\r\n" + b"X-A: 1\r\n" * 100 + b"\r\n",  # too many trailer lines
        b"0\r\nX-A: " + b"v" * MAX_HEAD + b"\r\n\r\n",  # trailers over MAX_HEAD
    ],
)
async def test_malformed_chunked_bodies_are_broken(body: bytes) -> None:
    """Each malformed chunked body raises Broken (the connection is dropped), nothing else."""
    with pytest.raises(Broken):
        await _forwarded(body)


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


def test_framing_reaches_the_upstream_in_one_canonical_form() -> None:
    """Transfer-Encoding in any case or spacing goes upstream as one lower-case field, and a
    Content-Length with leading zeros as plain decimal; nothing else in the head changes."""
    req = parse_request(
        b"POST /p HTTP/1.1\r\nHost: x\r\ntransfer-encoding:\t CHUNKED \r\nA: 1\r\n\r\n"
    )
    assert req.chunked and not req.raw
    assert upstream_request_head(req, "192.0.2.1") == (
        b"POST /p HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\nA: 1\r\n"
        b"X-Forwarded-For: 192.0.2.1\r\n\r\n"
    )
    req = parse_request(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 007\r\n\r\n")
    assert req.content_length == 7
    assert b"\r\nContent-Length: 7\r\n" in upstream_request_head(req, "192.0.2.1")


def test_absolute_form_goes_upstream_in_origin_form() -> None:
    """An absolute-form target becomes origin-form and its authority the one Host (RFC 9112
    3.2.2), so the upstream cannot take the request for another host than the router did."""
    req = parse_request(b"GET HTTP://Other.example:81?q=1 HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert req.target == "/?q=1"
    assert upstream_request_head(req, "192.0.2.1") == (
        b"GET /?q=1 HTTP/1.1\r\nHost: Other.example:81\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n"
    )
    opts = parse_request(b"OPTIONS * HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert opts.target == "*"


@pytest.mark.parametrize(
    ("data", "bare"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n", False),
        (b"GET / HTTP/1.1\r", False),  # its LF may come in the next segment
        (b"GET / HTTP/1.1\nHost: x\n", True),
        (b"GET / HTTP/1.1\r\nHost: x\rY", True),
        (b"\n", True),
    ],
)
def test_bare_line_ends_are_found_in_an_incomplete_head(data: bytes, bare: bool) -> None:
    """A bare CR or LF is found before the head is complete; a final CR is not bare yet; and
    scanning a head as it grows a byte at a time (from the last byte seen, as the router does)
    finds the same."""
    assert bare_line_end(data) is bare
    scanned, found = 0, False
    for end in range(1, len(data) + 1):
        found = found or bare_line_end(data[:end], scanned)
        scanned = max(0, end - 1)
    assert found is bare


@pytest.mark.parametrize(
    "raw",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",  # sent as received
     b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nContent-Length: 2\r\n\r\n"],  # rebuilt
)
@pytest.mark.parametrize(("keep", "http10"), [(True, False), (False, False), (True, True)])
def test_an_assigned_cookie_line_rides_every_head(raw: bytes, keep: bool, http10: bool) -> None:
    """The router's own header line (an assigned cohort cookie) is added once, inside the head,
    whether the upstream's head goes as received or is rebuilt."""
    resp = parse_response(raw, "GET")
    extra = b"Set-Cookie: fw=abc; Path=/; HttpOnly\r\n"
    head = client_response_head(resp, keep_alive=keep, http10=http10, extra=extra)
    assert head.endswith(b"\r\n\r\n") and head.count(extra) == 1
    assert head.index(extra) < head.index(b"\r\n\r\n") + 2
    assert b"X-Hop" not in head
