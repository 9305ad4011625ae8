"""HTTP/1.1 message heads for the router: pure parsing and rewriting, no sockets.

The proxy reads a head (everything up to the blank line) and hands its bytes here. We parse only
what a proxy needs: the request line or status line, body framing (Content-Length, chunked, or
read-until-close), persistence (keep-alive), and the hop-by-hop headers that must not cross the
proxy. The head we send on is rebuilt from the original header lines minus the hop-by-hop ones, so
header order and case pass through unchanged.

Garbage never raises anything but ``HttpError``, whose ``status`` is what the router answers
(400, 431, 501, 505) and whose message goes in the response body.

Framing is read once and must mean the same to every hop: a request whose ``Connection`` names
Content-Length, Transfer-Encoding or Host is refused (the router would frame the body on a header
the upstream never sees, and the upstream would read the body as a request of its own), and those
headers are never dropped as hop-by-hop whatever ``Connection`` says (a response is not refused
for it, and a second layer costs nothing). Chunk-size lines are checked whole (no bare CR or LF,
well-formed extensions, at most ``MAX_CHUNK_LINE`` bytes, a size below ``MAX_CHUNK_SIZE``) and
re-emitted as the size alone.

Line ends are CRLF, and nothing else: a bare LF or a bare CR anywhere in a request head or a
chunk line is answered 400 and the connection closed, as soon as it arrives (``bare_line_end``
finds it in a head still incomplete, so a client that ends its lines with LF gets its 400 at once
instead of waiting for a blank CRLF line that never comes). RFC 9112 2.2 lets a recipient accept a
bare LF as a line end, and many origin servers do; a proxy must not. Whatever the router accepts
it forwards, and the servers behind it disagree on what a bare LF or CR means (a line end, part of
a value, an error): the same bytes could be one request to the router and two to the upstream. A
refusal costs a client that was never conforming; an acceptance, rewritten or not, is a bet on
every upstream's parser.

The head that goes upstream has one meaning whatever parser reads it: framing in one canonical
form (one ``Transfer-Encoding`` field in lower case with ``chunked`` last, or one decimal
``Content-Length``; a request with two Content-Length values, even equal, is refused, as nginx
does), one ``Host``, and an origin-form target (an absolute-form target is rewritten to origin
form and its authority becomes the Host, RFC 9112 3.2.2). ``CONNECT`` is refused (501): the router
does not tunnel.

What the head says about the client is the router's to say: X-Forwarded-For is set to the peer's
address, and the other forwarding headers (``FORWARDING``) are dropped, unless the peer is a
trusted proxy. A field whose name holds an underscore is dropped whoever sent it, as nginx does:
CGI-style servers read ``X_Forwarded_For`` as X-Forwarded-For.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.router.errors import HttpError

MAX_HEAD = 64 * 1024  # bytes of a request or response head (431 beyond)
MAX_HEADERS = 128  # header lines per head (431 beyond)
MAX_CHUNK_LINE = 4096  # a chunk-size line with extensions
# The largest chunk size passed on: it fits a signed 64-bit integer, so an upstream that reads
# sizes into one (most do) reads the size the router read, never a negative or wrapped one.
MAX_CHUNK_SIZE = 2**63 - 1

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the legacy ones.
# Transfer-Encoding is not here: the router forwards chunked bodies chunked (see parse_chunk_size).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Used with fullmatch, never with "$" (which also matches before a final LF: "GET\n" would pass).
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?")
_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(_TOKEN_CHARS)
# A CR not followed by LF, or an LF not preceded by CR (a CR at the very end may be followed by
# its LF in the next segment).
_BARE_CR_LF = re.compile(rb"\r(?=[^\n])|(?<!\r)\n")
# RFC 3986 host [":" port] as a Host value may carry it (reg-name, IPv4, IP-literal), no userinfo.
_HOST = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=%]*(?::[0-9]*)?|\[[0-9A-Fa-f:.vV]+\](?::[0-9]*)?")
# An absolute-form request target (RFC 9112 3.2.2): the authority, then the path and query.
_ABSOLUTE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]+)([/?][^#]*)?")
_QUOTED = rb'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\xff])*"'
# RFC 9112 7.1.1: chunk-size [ chunk-ext ] CRLF, with the optional whitespace around ";" and "="
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*[ \t]*\r\n"
    % (_TOKEN_CHARS, _TOKEN_CHARS, _QUOTED)
)
# Headers whose removal would change how a message is framed or where it goes: never hop-by-hop.
_NOT_HOP_BY_HOP = frozenset({b"content-length", b"transfer-encoding", b"host"})
# The headers the index holds: those whose values the router reads, and the hop-by-hop ones (so
# that a head without any needs no filtering).
_READ = frozenset({b"connection", b"content-length", b"transfer-encoding", b"host", b"expect"})
# What a proxy in front says about the client (its address, the host and scheme it was asked
# for): believed only from a trusted proxy; from anyone else dropped (X-Forwarded-For replaced by
# the peer's address), since the router cannot vouch for them and a service cannot tell whose
# they are. The whole X-Forwarded- family counts (-Host, -Proto, -Port, -Prefix, -Ssl, ...).
FORWARDING = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})
_FORWARDING_PREFIX = b"x-forwarded-"
_INDEXED = _READ | HOP_BY_HOP | FORWARDING


@dataclass(slots=True)
class RequestHead:
    """A parsed request head and the head to send upstream."""

    method: str
    target: str
    version: bytes  # b"HTTP/1.1" or b"HTTP/1.0"
    keep_alive: bool  # the client wants the connection kept after this exchange
    content_length: int | None
    chunked: bool
    expect_continue: bool
    headers: list[tuple[bytes, bytes]]  # (name as sent, value), hop-by-hop removed
    # The head as received when it can go upstream as it is (plus X-Forwarded-For): it had
    # nothing to remove. b"" when it must be rebuilt from ``headers``.
    raw: bytes = b""
    # The client sent a forwarding header (``is_forwarding``): kept from a trusted proxy,
    # dropped (X-Forwarded-For replaced) from anyone else.
    forwarded: bool = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head; ``body`` says how its body is framed for the request it answers."""

    status: int
    version: bytes
    reason: bytes
    keep_alive: bool  # the upstream will keep the connection after this response
    body: str  # "none" | "length" | "chunked" | "close"
    content_length: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # hop-by-hop removed
    # The head as received when it can reach the client as it is (HTTP/1.1, nothing to remove);
    # b"" when it must be rebuilt from ``headers``.
    raw: bytes = b""


Headers = list[tuple[bytes, bytes]]


def _split_headers(lines: list[bytes]) -> tuple[Headers, dict[bytes, list[bytes]]]:
    """Header lines to (name, value) pairs and an index of the ones we read; raises on garbage."""
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header lines")
    # One scan of all the lines for control characters instead of one per value: the common
    # case is clean, and a dirty head is refused below with the precise reason.
    checked = _BAD_VALUE.search(b"".join(lines)) is None
    pairs: list[tuple[bytes, bytes]] = []
    index: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or not _TOKEN.fullmatch(name):
            # Also refuses obs-fold (a line starting with a space): RFC 9112 5.2 lets us.
            raise HttpError(400, "malformed header line")
        value = value.strip(b" \t")
        if not checked and _BAD_VALUE.search(value):
            raise HttpError(400, "control character in a header value")
        pairs.append((name, value))
        lower = name.lower()
        if lower in _INDEXED or lower.startswith(_FORWARDING_PREFIX):
            index.setdefault(lower, []).append(value)
    return pairs, index


def is_forwarding(lower: bytes) -> bool:
    """Whether a (lower-case) header name says where a request came from or how it was asked."""
    return lower in FORWARDING or lower.startswith(_FORWARDING_PREFIX)


def _without_underscores(headers: Headers) -> Headers:
    """``headers`` without the fields whose names hold an underscore (itself if none do).

    CGI, WSGI, PHP and Rack servers turn both ``-`` and ``_`` into ``_`` (``HTTP_X_FORWARDED_FOR``),
    so ``X_Forwarded_For`` would reach a service as the X-Forwarded-For the router rewrites, and
    ``X_Remote_User`` as a header an authenticating layer sets. nginx drops such fields by default
    (``underscores_in_headers off``) and so do we: all of them, not a list of names to protect,
    since no list covers what every service reads; no common client sends one."""
    if not any(b"_" in name for name, _ in headers):
        return headers
    return [(n, v) for n, v in headers if b"_" not in n]


def _connection_tokens(index: dict[bytes, list[bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in index.get(b"connection", ()):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _strip_hop_by_hop(
    pairs: list[tuple[bytes, bytes]], tokens: set[bytes], index: dict[bytes, list[bytes]]
) -> list[tuple[bytes, bytes]]:
    if not tokens and HOP_BY_HOP.isdisjoint(index):
        return pairs  # nothing to drop (the usual case)
    drop = (HOP_BY_HOP | tokens) - _NOT_HOP_BY_HOP
    return [(n, v) for n, v in pairs if n.lower() not in drop]


def _codings(te: list[bytes]) -> list[bytes]:
    return [c.strip().lower() for v in te for c in v.split(b",") if c.strip()]


def _framing(index: dict[bytes, list[bytes]], *, request: bool) -> tuple[int | None, bool]:
    """(content_length, chunked) from the headers; raises on ambiguity (request smuggling).

    RFC 9112 6.3: a request whose Transfer-Encoding does not end in chunked has no length anyone
    can agree on: 400 and close. A request may carry one Content-Length value only; a response
    may repeat the same value (as RFC 9110 8.6 allows a recipient to accept).
    """
    te = index.get(b"transfer-encoding")
    cl = index.get(b"content-length")
    if te is not None:
        if cl is not None:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        codings = _codings(te)
        if not codings or codings[-1] != b"chunked":
            raise HttpError(400, "Transfer-Encoding without chunked last: the length is unknown")
        if codings.count(b"chunked") != 1:
            raise HttpError(400, "Transfer-Encoding applies chunked more than once")
        if request and codings != [b"chunked"]:
            # A coding before chunked (gzip, chunked) is valid HTTP/1.1 that no client sends,
            # and an upstream that reads only an exact "chunked" would take the body for the
            # next request (smuggling); nginx answers 501 too.
            raise HttpError(501, "Transfer-Encoding other than chunked alone is not supported")
        return None, True
    if cl is not None:
        values = [c.strip() for v in cl for c in v.split(b",")]
        if len(set(values)) != 1:
            raise HttpError(400, "conflicting Content-Length values")
        if request and len(values) != 1:
            raise HttpError(400, "more than one Content-Length")
        value = values[0]
        if not value.isdigit() or len(value) > 18:
            raise HttpError(400, "invalid Content-Length")
        return int(value), False
    return None, False


def _replace(headers: Headers, lower: bytes, value: bytes) -> Headers:
    """``headers`` with the fields named ``lower`` made one, ``value``, where the first was."""
    out: Headers = []
    placed = False
    for name, v in headers:
        if name.lower() != lower:
            out.append((name, v))
        elif not placed:
            out.append((name, value))
            placed = True
    if not placed:
        out.append((b"Host" if lower == b"host" else lower, value))
    return out


def _canonical(headers: Headers, index: dict[bytes, list[bytes]], length: int | None) -> Headers:
    """``headers`` with framing in the one form every parser reads alike (itself if it is)."""
    te = index.get(b"transfer-encoding")
    if te is not None:
        # Always rebuilt (chunked requests take the general path anyway): the field the upstream
        # gets is one line, lower case, single spaces, whatever case and OWS the client chose.
        headers = _replace(headers, b"transfer-encoding", b", ".join(_codings(te)))
    elif length is not None:
        canonical = b"%d" % length
        if index[b"content-length"] != [canonical]:
            headers = _replace(headers, b"content-length", canonical)
    return headers


def _target(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """(origin-form target, the authority of an absolute-form one, else None); raises on garbage."""
    if target[:1] == b"/":
        return target, None
    if target == b"*" and method == b"OPTIONS":
        return target, None
    m = _ABSOLUTE.fullmatch(target)
    if m is None:
        raise HttpError(400, "malformed request target")
    authority, path = m.group(1), m.group(2) or b"/"
    if b"@" in authority or not _HOST.fullmatch(authority):
        raise HttpError(400, "malformed authority in the request target")
    return (b"/" + path if path[:1] == b"?" else path), authority


def bare_line_end(data: bytes | bytearray, start: int = 0) -> bool:
    """True if ``data[start:]`` holds a bare CR or LF (a head or line is then refused).

    A CR at the very end is not bare yet: its LF may come next. Callers that see a head grow
    pass ``start`` just before the bytes they have not looked at, so each byte is scanned once.
    """
    return _BARE_CR_LF.search(data, start) is not None


def _lines(head: bytes) -> list[bytes]:
    """The lines of a head, split at CRLF only, without its final blank line.

    Only that one CRLF CRLF is cut, never a run of CRs and LFs (``rstrip``): "Host: x\n" then
    CRLF CRLF would lose its bare LF here and go upstream with it.
    """
    if head.endswith(b"\r\n\r\n"):
        head = head[:-4]
    elif head.endswith(b"\r\n"):
        head = head[:-2]
    return head.split(b"\r\n")


def parse_request(head: bytes) -> RequestHead:
    """Parse a request head (with or without its final blank line)."""
    if len(head) > MAX_HEAD:
        raise HttpError(431, f"request head larger than {MAX_HEAD} bytes")
    lines = _lines(head)
    while lines and not lines[0]:
        lines.pop(0)  # RFC 9112 2.2: a server should ignore empty lines before the request line
    if not lines:
        raise HttpError(400, "empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    # No whitespace in a target either (a tab is a header value's, not a target's): an
    # upstream that splits the line on any whitespace would read another target or version.
    if (not _TOKEN.fullmatch(method) or not target or _BAD_VALUE.search(target)
            or b"\t" in target):
        raise HttpError(400, "malformed request line")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HttpError(400, "malformed request line")
    if method == b"CONNECT":
        raise HttpError(501, "CONNECT is not supported: the router does not tunnel")
    target, authority = _target(method, target)
    pairs, index = _split_headers(lines[1:])
    hosts = index.get(b"host")
    if hosts is not None and (len(hosts) > 1 or not _HOST.fullmatch(hosts[0])):
        raise HttpError(400, "more than one Host" if len(hosts) > 1 else "malformed Host")
    content_length, chunked = _framing(index, request=True)
    if version == b"HTTP/1.0" and chunked:
        raise HttpError(400, "chunked request body in HTTP/1.0")
    tokens = _connection_tokens(index)
    if not tokens.isdisjoint(_NOT_HOP_BY_HOP):
        named = b", ".join(sorted(tokens & _NOT_HOP_BY_HOP)).decode("ascii")
        raise HttpError(400, f"Connection may not name {named}")
    if version == b"HTTP/1.1":
        if hosts is None:
            raise HttpError(400, "HTTP/1.1 request without Host")
        keep_alive = b"close" not in tokens
    else:
        keep_alive = b"keep-alive" in tokens
    expect = index.get(b"expect")
    expect_continue = expect is not None and expect[-1].lower() == b"100-continue"
    headers = _strip_hop_by_hop(pairs, tokens, index)
    if expect_continue:
        # The router answers 100 Continue itself and buffers the body, so the upstream must not.
        headers = [(n, v) for n, v in headers if n.lower() != b"expect"]
    if chunked or content_length is not None:
        headers = _canonical(headers, index, content_length)
    if authority is not None:
        headers = _replace(headers, b"host", authority)  # RFC 9112 3.2.2: the URI's authority wins
    if b"_" in head:  # (a cheap test first: most heads have no underscore at all)
        headers = _without_underscores(headers)
    forwarded = any(is_forwarding(name) for name in index)
    verbatim = (
        headers is pairs  # (a rewritten target or framing comes with rewritten headers)
        and not forwarded
        and head.endswith(b"\r\n\r\n")
        and not head.startswith(b"\r\n")
    )
    return RequestHead(
        method=method.decode("ascii"),
        target=target.decode("latin-1"),
        version=version,
        keep_alive=keep_alive,
        content_length=content_length,
        chunked=chunked,
        expect_continue=expect_continue,
        headers=headers,
        raw=head if verbatim else b"",
        forwarded=forwarded,
    )


def upstream_request_head(
    req: RequestHead, client_ip: str, *, trusted_proxy: bool = False
) -> bytes:
    """The head to send upstream: the client's, hop-by-hop removed, X-Forwarded-For set.

    X-Forwarded-For is the peer's address alone, and the other forwarding headers (Forwarded,
    X-Real-IP, X-Forwarded-Host, -Proto, ...) are dropped: what a client says it forwards is its
    own claim. Only a ``trusted_proxy`` peer's are kept: its X-Forwarded-For list (all its lines,
    in order) appended to, the others as it sent them.
    """
    peer = client_ip.encode("ascii")
    if req.raw:
        return req.raw[:-2] + b"X-Forwarded-For: " + peer + b"\r\n\r\n"
    out = [f"{req.method} {req.target} ".encode("latin-1") + req.version]
    chain: list[bytes] = []
    for name, value in req.headers:
        if req.forwarded:
            lower = name.lower()
            if lower == b"x-forwarded-for":
                if trusted_proxy and value:
                    chain.append(value)
                continue
            if not trusted_proxy and is_forwarding(lower):
                continue
        out.append(name + b": " + value)
    chain.append(peer)
    out.append(b"X-Forwarded-For: " + b", ".join(chain))
    out.append(b"\r\n")
    return b"\r\n".join(out)


def parse_response(head: bytes, request_method: str) -> ResponseHead:
    """Parse a response head and decide its body framing for a request with ``request_method``."""
    if len(head) > MAX_HEAD:
        raise HttpError(502, f"upstream response head larger than {MAX_HEAD} bytes")
    lines = _lines(head)
    m = _STATUS_LINE.fullmatch(lines[0]) if lines else None
    if m is None:
        raise HttpError(502, "upstream sent a malformed status line")
    version = b"HTTP/1." + m.group(1)
    status = int(m.group(2))
    reason = lines[0][13:] or b"-"
    try:
        pairs, index = _split_headers(lines[1:])
        content_length, chunked = _framing(index, request=False)
    except HttpError as exc:
        raise HttpError(502, f"upstream sent a bad response head: {exc}") from None
    tokens = _connection_tokens(index)
    keep_alive = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        body, length = "none", 0
    elif chunked:
        body, length = "chunked", 0
    elif content_length is not None:
        body, length = "length", content_length
    else:
        body, length, keep_alive = "close", 0, False
    headers = _strip_hop_by_hop(pairs, tokens, index)
    verbatim = (
        headers is pairs
        and version == b"HTTP/1.1"
        and len(lines[0]) > 13
        and head.endswith(b"\r\n\r\n")
    )
    return ResponseHead(
        status=status,
        version=version,
        reason=reason,
        keep_alive=keep_alive,
        body=body,
        content_length=length,
        headers=headers,
        raw=head if verbatim else b"",
    )


def client_response_head(
    resp: ResponseHead, *, keep_alive: bool, http10: bool, extra: bytes = b""
) -> bytes:
    """The head to send the client: the upstream's, hop-by-hop removed, our persistence added;
    ``extra``: whole header lines of ours (each ending in CRLF), e.g. an assigned cookie."""
    if resp.raw:  # (then it has no Connection header of its own)
        if not keep_alive:
            return resp.raw[:-2] + extra + b"Connection: close\r\n\r\n"
        if http10:
            return resp.raw[:-2] + extra + b"Connection: keep-alive\r\n\r\n"
        return resp.raw[:-2] + extra + b"\r\n" if extra else resp.raw
    out = [b"HTTP/1.1 " + str(resp.status).encode() + b" " + resp.reason]
    out.extend(name + b": " + value for name, value in resp.headers)
    if extra:
        out.append(extra[:-2])
    if not keep_alive:
        out.append(b"Connection: close")
    elif http10:
        out.append(b"Connection: keep-alive")
    out.append(b"\r\n")
    return b"\r\n".join(out)


def parse_chunk_size(line: bytes) -> int:
    """The size in a chunk-size line ending in CRLF; raises HttpError(400) on garbage.

    Extensions are checked, then ignored: the router forwards the size alone. A bare CR or LF
    anywhere is refused, since a lenient parser behind us could end the line there and frame
    the body differently.
    """
    if len(line) > MAX_CHUNK_LINE:
        raise HttpError(400, f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
    m = _CHUNK_LINE.fullmatch(line)
    if m is None:
        raise HttpError(400, "malformed chunk-size line")
    size = int(m.group(1), 16)
    if size > MAX_CHUNK_SIZE:
        raise HttpError(400, f"chunk size over {MAX_CHUNK_SIZE}")
    return size


def check_trailer_line(line: bytes) -> None:
    """Refuse a trailer field line (ending in CRLF) that would not pass as a header line."""
    if not line.endswith(b"\r\n"):
        raise HttpError(400, "malformed trailer line")
    _split_headers([line[:-2]])


REASONS = {
    100: "Continue",
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def error_response(status: int, message: str, *, keep_alive: bool = False) -> bytes:
    """A complete plain-text response the router itself produces."""
    body = f"fleetwave router: {message}\n".encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\n"
    )
    if not keep_alive:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body
