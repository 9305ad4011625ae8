"""Hostile HTTP/1.1 for the router: request heads, response heads, chunked bodies, and
``one_form_problem``, the check that what goes upstream can be read one way only."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from hypothesis import strategies as st

from agent.router.channel import Channel
from agent.router.errors import Broken, HttpError
from agent.router.http11 import (
    MAX_CHUNK_SIZE,
    bare_line_end,
    client_response_head,
    parse_chunk_size,
    parse_request,
    parse_response,
    upstream_request_head,
)
from agent.router.upstream import BodyReader
from tests.hostile.kit import CASE_SECONDS, blob, ints, mutate, pick, within

# -- the router's HTTP/1.1 parser ------------------------------------------------------------------

METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"CONNECT", b"G ET", b"GET\n", b"",
           b"\x00"]
TARGETS = [b"/", b"/p?q=1", b"*", b"http://svc/x", b"HTTP://a:1?x", b"https://u@h/", b"//x",
           b"/a b", b"/\r\n", b"x", b"http:///", b"/%00"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1\n", b"http/1.1", b""]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"TE",
         b"X-Forwarded-For", b"Keep-Alive", b"Upgrade", b"transfer-encoding", b"Host ",
         b" Host", b"X-A\n", b"Content-Length\r", b"X-A"]
VALUES = [b"svc", b"chunked", b"Chunked", b" chunked ", b"chunked, identity", b"identity",
          b"gzip, chunked", b"chunked, chunked", b",chunked,", b"0", b"5", b"005", b"5, 5", b"-1",
          b"+5", b"0x5", b"9" * 20, b"close", b"keep-alive", b"Content-Length", b"host",
          b"100-continue", b"\tx", b"a\rb", b"a\nb", b"a\x00b", b"svc:8080", b"[::1]:1", b"a/b"]
LINE_ENDS = [b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n", b" \r\n", b"\n\r"]


@st.composite
def request_heads(draw: Any) -> bytes:
    """A request head built from hostile parts (methods, targets, framing headers, line ends,
    obs-fold), possibly mutated at the byte level, or plain bytes."""
    if draw(ints(0, 9)) == 0:
        return bytes(draw(blob(200)))
    end = lambda: draw(pick(tuple(LINE_ENDS)))  # noqa: E731
    sp = lambda: draw(pick(tuple([b" "] * 8 + [b"  ", b"\t", b""])))  # noqa: E731
    parts = [
        draw(pick(tuple(METHODS), binary=6)), sp(),
        draw(pick(tuple(TARGETS), binary=10)), sp(),
        draw(pick(tuple(VERSIONS))), end(),
    ]
    for _ in range(draw(ints(0, 6))):
        fold = draw(pick(tuple([b""] * 8 + [b" ", b"\t"])))
        name = draw(pick(tuple(NAMES), binary=8))
        value = draw(pick(tuple(VALUES), binary=12))
        colon = draw(pick(tuple([b": "] * 6 + [b":", b" : ", b":\t"])))
        parts += [fold, name, colon, value, end()]
    parts.append(draw(pick(tuple([b"\r\n"] * 6 + [b"\n", b"", b"\r\n\r\n"]))))
    head = b"".join(parts)
    return mutate(head, draw) if draw(ints(0, 4)) == 0 else head


_FIELD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ ]?[^\x00-\x08\x0a-\x1f\x7f]*")


def one_form_problem(head: bytes) -> str | None:
    """Why ``head`` (going upstream) could be read two ways, or None: CRLF line ends only, an
    origin-form target, at most one Host, one framing header in canonical form."""
    if not head.endswith(b"\r\n\r\n"):
        return "does not end with CRLF CRLF"
    lines = head[:-4].split(b"\r\n")
    if any(b"\r" in ln or b"\n" in ln for ln in lines):
        return "a bare CR or LF"
    request_line = lines[0].split(b" ")
    if len(request_line) != 3:
        return "request line not three parts"
    _, target, _ = request_line
    if not (target.startswith(b"/") or target == b"*"):
        return f"target {target!r} not origin-form"
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if not _FIELD.fullmatch(line):
            return f"not a field line: {line!r}"
        name, _, value = line.partition(b":")
        fields.setdefault(name.lower(), []).append(value.strip())
    if len(fields.get(b"host", [])) > 1:
        return "more than one Host"
    te, cl = fields.get(b"transfer-encoding", []), fields.get(b"content-length", [])
    if te and cl:
        return "both Transfer-Encoding and Content-Length"
    if len(te) > 1 or len(cl) > 1:
        return "a framing header twice"
    if te and (te[0] != te[0].lower() or not te[0].endswith(b"chunked")):
        return f"Transfer-Encoding {te[0]!r} not canonical"
    if cl and not (cl[0].isdigit() and cl[0] == b"%d" % int(cl[0])):
        return f"Content-Length {cl[0]!r} not canonical"
    return None


def check_request(head: bytes) -> None:
    """Property: a head is refused with HttpError (400/431/501/505), or accepted only if it has
    no bare CR or LF, and what goes upstream is in one form and parses back to the same request."""

    def run() -> None:
        try:
            req = parse_request(head)
        except HttpError as exc:
            assert exc.status in (400, 431, 501, 505), exc.status
            return
        assert not bare_line_end(head), "a head with a bare CR or LF was accepted"
        out = upstream_request_head(req, "192.0.2.1")
        problem = one_form_problem(out)
        assert problem is None, f"upstream head {out!r}: {problem}"
        again = parse_request(out)
        assert (again.method, again.target, again.content_length, again.chunked) == (
            req.method, req.target, req.content_length, req.chunked
        ), out

    within(CASE_SECONDS, run)


STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.0 204 No", b"HTTP/1.1 100 Continue", b"HTTP/1.1 2000",
                b"HTTP/1.1 200", b"HTTP/1.1 200 OK\n", b"HTTP/1.1 304 \r", b"garbage",
                b"HTTP/1.1 101 x"]


@st.composite
def response_heads(draw: Any) -> bytes:
    """A response head from hostile parts, or bytes."""
    if draw(ints(0, 9)) == 0:
        return bytes(draw(blob(200)))
    parts = [draw(pick(tuple(STATUS_LINES), binary=20)), b"\r\n"]
    for _ in range(draw(ints(0, 5))):
        parts += [draw(pick(tuple(NAMES), binary=8)), b": ",
                  draw(pick(tuple(VALUES), binary=12)),
                  draw(pick(tuple(LINE_ENDS)))]
    head = b"".join([*parts, b"\r\n"])
    return mutate(head, draw) if draw(ints(0, 4)) == 0 else head


def check_response(head: bytes) -> None:
    """Property: a response head is refused with HttpError(502) or relayed as a head with CRLF
    line ends only and a three-digit status."""

    def run() -> None:
        for method in ("GET", "HEAD"):
            try:
                resp = parse_response(head, method)
            except HttpError as exc:
                assert exc.status == 502, exc.status
                return
            for keep, http10 in ((True, False), (False, True)):
                out = client_response_head(resp, keep_alive=keep, http10=http10)
                assert out.endswith(b"\r\n\r\n") and not bare_line_end(out), out
                assert re.match(rb"HTTP/1\.[01] [0-9]{3}[ \r]", out), out

    within(CASE_SECONDS, run)


@st.composite
def chunked_bodies(draw: Any) -> bytes:
    """A chunked body with hostile size lines, data that lies about its size, and trailers."""
    if draw(ints(0, 9)) == 0:
        return bytes(draw(blob(200)))
    parts = []
    for _ in range(draw(ints(0, 4))):
        data = draw(blob(20))
        size = draw(pick(tuple([b"%x" % len(data)] * 4 + [
            b"%X" % len(data), b"0%x" % len(data), b"-1", b"zz", b"ffffffffffffffff", b"0x1",
            b"8000000000000000", b"7fffffffffffffff", b"1" * 17, b"", b" 1", b"1 ",
        ])))
        ext = draw(pick(tuple([b"", b";a=b", b';a="x\\"y"', b";", b"; a", b";a=\"", b";\x00"])))
        parts += [size, ext, draw(pick(tuple(LINE_ENDS))), data,
                  draw(pick(tuple(LINE_ENDS)))]
    parts.append(draw(pick(tuple([b"0\r\n", b"0;x\r\n", b"0\n", b"00\r\n", b""]))))
    for _ in range(draw(ints(0, 2))):
        parts += [draw(pick(tuple(NAMES))), b": ", draw(pick(tuple(VALUES))),
                  draw(pick(tuple(LINE_ENDS)))]
    parts.append(draw(pick(tuple([b"\r\n"] * 4 + [b"\n", b""]))))
    body = b"".join(parts)
    return mutate(body, draw) if draw(ints(0, 4)) == 0 else body


def strict_chunks(data: bytes) -> bytes:
    """Decode a chunked body written in the router's canonical form only; ValueError otherwise."""
    out = b""
    while True:
        line, sep, data = data.partition(b"\r\n")
        if not sep or not re.fullmatch(rb"0|[1-9a-f][0-9a-f]*", line):
            raise ValueError(f"size line {line!r} not canonical")
        size = int(line, 16)
        if size == 0:
            if data != b"\r\n":
                raise ValueError("trailers or bytes after the last chunk")
            return out
        if data[size : size + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        out, data = out + data[:size], data[size + 2 :]


def check_chunked(body: bytes, loop: asyncio.AbstractEventLoop) -> None:
    """Property: a chunked body is refused with Broken, or relayed in canonical chunked form
    (size lines in lower-case hex, no extensions, no trailers) that any parser reads alike."""

    async def relay() -> bytes:
        channel = Channel(1 << 20)
        channel.buf += body
        channel.eof = True
        reader = BodyReader(channel, "chunked", 0, 5.0)
        out = b""
        while piece := await reader.read():
            out += piece
        return out

    def run() -> None:
        try:
            out = loop.run_until_complete(relay())
        except Broken:
            return
        strict_chunks(out)

    within(CASE_SECONDS, run)


def check_chunk_line(line: bytes) -> None:
    """Property: a chunk-size line gives a size in range or raises HttpError(400)."""
    try:
        size = parse_chunk_size(line)
    except HttpError as exc:
        assert exc.status == 400
        return
    assert 0 <= size <= MAX_CHUNK_SIZE and not bare_line_end(line[:-2])
