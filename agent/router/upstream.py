"""Connections to upstreams and message bodies: the IO primitives the proxy and the mirror share.

``Pool`` keeps a few idle keep-alive ``Channel``s per upstream address and hands out fresh ones;
``BodyReader`` reads one body off a stream in raw pieces (framing included: a chunked body stays
chunked) while optionally feeding the decoded bytes to a ``Capture`` (sha256 and a bounded copy, for
the mirror comparison). Chunked framing is checked, not trusted: each chunk-size line goes on as the
size alone (extensions dropped), and trailer fields are checked and dropped (as nginx does: the
router strips the ``Trailer`` header, and a field some hop merges into the head could override
what the router checked there). Every read and connect runs under a timeout; a request body also
under a deadline for the whole of it.

Errors: ``Broken`` means the peer closed or sent garbage in the middle of a body; connect errors are
the plain ``OSError``/``TimeoutError`` the caller counts as a failure.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque

from agent.router.channel import Channel, Readable, close_conn
from agent.router.errors import Broken, HttpError
from agent.router.http11 import (
    MAX_CHUNK_LINE,
    MAX_HEAD,
    check_trailer_line,
    parse_chunk_size,
)

PIECE = 64 * 1024  # bytes per read while streaming a body
MAX_TRAILERS = 64
LAST_CHUNK = b"0\r\n\r\n"


Conn = Channel

__all__ = ["BodyReader", "Capture", "Conn", "Pool", "close_conn"]


class Pool:
    """Idle keep-alive connections to one upstream address, most recently used first."""

    __slots__ = ("_idle", "host", "max_idle", "port")

    def __init__(self, host: str, port: int, *, max_idle: int = 64) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self._idle: deque[Conn] = deque()

    def take_idle(self) -> Conn | None:
        """An idle connection the server has not closed yet, or None."""
        while self._idle:
            conn = self._idle.pop()
            # A server that closed an idle connection has sent FIN (eof); one that sent bytes
            # nobody asked for is out of step with us: neither can carry a request.
            if conn.eof or conn.buf or conn.is_closing():
                close_conn(conn)
                continue
            return conn
        return None

    async def connect(self, timeout: float) -> Conn:
        """A new connection; raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(Channel, self.host, self.port)
        return conn

    def give_back(self, conn: Conn) -> None:
        """Keep a connection whose last exchange ended cleanly, if there is room."""
        conn.sink = None
        if len(self._idle) < self.max_idle and not conn.is_closing() and not conn.buf:
            self._idle.append(conn)
        else:
            close_conn(conn)

    def close(self) -> None:
        """Close every idle connection."""
        while self._idle:
            close_conn(self._idle.pop())

    @property
    def idle(self) -> int:
        return len(self._idle)


class Capture:
    """sha256 of a decoded body and its first ``limit`` bytes (``truncated`` if longer)."""

    __slots__ = ("_buf", "_sha", "limit", "size", "truncated")

    def __init__(self, limit: int) -> None:
        self._sha = hashlib.sha256()
        self._buf = bytearray()
        self.limit = limit
        self.size = 0
        self.truncated = False

    def feed(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)
        room = self.limit - len(self._buf)
        if room > 0:
            self._buf += data[:room]
        if len(data) > room:
            self.truncated = True

    @property
    def digest(self) -> str:
        return self._sha.hexdigest()

    @property
    def body(self) -> bytes:
        return bytes(self._buf)


class BodyReader:
    """Reads one body in raw pieces; ``read()`` returns b"" once the body is complete.

    ``mode`` is "none", "length" (``length`` bytes), "chunked", or "close" (until EOF). Each read
    waits at most ``timeout``; with a ``deadline`` (event-loop time) the whole body must be in by
    then too, else TimeoutError.
    """

    __slots__ = ("_left", "_reader", "capture", "deadline", "done", "mode", "timeout")

    def __init__(
        self,
        reader: Readable,
        mode: str,
        length: int,
        timeout: float,
        capture: Capture | None = None,
        *,
        deadline: float | None = None,
    ) -> None:
        self._reader = reader
        self.mode = mode
        self._left = length if mode == "length" else 0
        self.timeout = timeout
        self.capture = capture
        self.deadline = deadline
        self.done = mode == "none" or (mode == "length" and length == 0)

    async def read(self) -> bytes:
        if self.done:
            return b""
        timeout = self.timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - asyncio.get_running_loop().time())
            if timeout <= 0:
                raise TimeoutError("the body's deadline passed")
        async with asyncio.timeout(timeout):
            if self.mode == "length":
                return await self._read_length()
            if self.mode == "chunked":
                return await self._read_chunked()
            data = await self._reader.read(PIECE)  # "close": the body ends with the connection
            if not data:
                self.done = True
            elif self.capture is not None:
                self.capture.feed(data)
            return data

    async def _read_length(self) -> bytes:
        data = await self._reader.read(min(self._left, PIECE))
        if not data:
            raise Broken(f"connection closed with {self._left} body bytes missing")
        self._left -= len(data)
        if self._left == 0:
            self.done = True
        if self.capture is not None:
            self.capture.feed(data)
        return data

    async def _read_chunked(self) -> bytes:
        head = b""
        if self._left == 0:
            try:
                size = parse_chunk_size(await self._readline(MAX_CHUNK_LINE))
            except HttpError as exc:
                raise Broken(str(exc)) from None
            if size == 0:
                await self._read_trailers()
                return LAST_CHUNK
            head = b"%x\r\n" % size
            self._left = size
        data = await self._reader.read(min(self._left, PIECE))
        if not data:
            raise Broken("connection closed inside a chunk")
        self._left -= len(data)
        if self.capture is not None:
            self.capture.feed(data)
        if self._left == 0:
            try:
                crlf = await self._reader.readexactly(2)
            except asyncio.IncompleteReadError:
                raise Broken("connection closed after a chunk") from None
            if crlf != b"\r\n":
                raise Broken("chunk not followed by CRLF")
            return head + data + crlf
        return head + data

    async def _read_trailers(self) -> None:
        """Read the trailer section up to its blank line, checking each field; keep none."""
        room = MAX_HEAD
        for _ in range(MAX_TRAILERS + 1):
            line = await self._readline(room)
            if line == b"\r\n":
                self.done = True
                return
            room -= len(line)
            try:
                check_trailer_line(line)
            except HttpError as exc:
                raise Broken(str(exc)) from None
        raise Broken(f"more than {MAX_TRAILERS} trailer lines")

    async def _readline(self, limit: int) -> bytes:
        """A chunk-size or trailer line up to its LF: a bare LF ends it too, and the line is then
        refused at once (its parser wants CRLF) rather than read on to some later CRLF."""
        try:
            return await self._reader.readuntil(b"\n", limit)
        except asyncio.IncompleteReadError:
            raise Broken("connection closed inside a chunked body") from None
        except asyncio.LimitOverrunError:
            raise Broken(f"a chunk-size or trailer line longer than {limit} bytes") from None
