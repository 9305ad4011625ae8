"""One TCP connection as the router uses it: a Protocol with a receive buffer and two modes.

Theory of operation: asyncio streams cost a task wake-up per read and a copy per buffer; the router
handles most requests without either. A ``Channel`` is an ``asyncio.Protocol`` whose bytes go:

- to its ``sink`` when one is set (callback mode, the proxy's fast path): ``on_data`` gets each
  piece as the transport delivered it, so a response that arrives in one segment is relayed
  without passing through a buffer (at most one copy, to join it to its head), and ``on_closed``
  says the peer went away;
- otherwise into ``buf``, where the awaitable ``readuntil``/``read``/``readexactly`` find them
  (stream mode, for the general path and the mirror). Reading pauses while ``buf`` holds more than
  ``limit`` bytes and resumes as the reader takes them: that is the backpressure.

``drain`` waits while the transport's write buffer is above its high-water mark (``pause_writing``
from the transport). Reads and drains never wait for ever by themselves: callers hold them under a
timeout. The errors are the ones asyncio streams raise (``IncompleteReadError`` on EOF inside a
``readexactly``/``readuntil``, ``LimitOverrunError`` on a head beyond the limit, the transport's
``OSError`` on a reset), so callers handle one vocabulary.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Protocol, cast

DEFAULT_LIMIT = 256 * 1024
_LINGER_NONE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class Readable(Protocol):
    """The stream side of a channel: what a body reader needs."""

    async def readuntil(self, separator: bytes = b"\r\n\r\n", limit: int | None = None) -> bytes:
        ...

    async def read(self, n: int) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...


class Sink(Protocol):
    """Who receives a channel's events in callback mode."""

    def on_data(self, channel: Channel, data: bytes) -> None: ...

    def on_closed(self, channel: Channel) -> None: ...


class Channel(asyncio.Protocol):
    """A connection's transport, receive buffer, and the waiter of whoever reads it."""

    __slots__ = (
        "_drain_waiter",
        "_read_paused",
        "_waiter",
        "buf",
        "closed",
        "eof",
        "error",
        "limit",
        "sink",
        "transport",
        "write_paused",
    )

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.limit = limit
        self.eof = False  # the peer will send nothing more
        self.closed = False  # the connection is gone
        self.error: BaseException | None = None
        self.sink: Sink | None = None
        self.write_paused = False
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports are not asyncio.Transport subclasses, but they are one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_data(self, data)
            return
        self.buf += data
        self._wake()
        if len(self.buf) > self.limit and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.sink is not None:
            self.sink.on_closed(self)
        self._wake()
        return True  # keep our side open: a client may half-close and still read the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.eof = True
        self.error = exc
        if self.sink is not None:
            self.sink.on_closed(self)
        self._wake()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- writing ----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport takes more; raises ConnectionResetError if it is gone."""
        if self.closed:
            raise ConnectionResetError("connection lost")
        if not self.write_paused:
            return
        waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
        await waiter
        if self.closed:
            raise ConnectionResetError("connection lost")

    def close(self) -> None:
        """Close without waiting (the transport flushes what it holds, then goes)."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes included."""
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Drop the connection with a reset (RST), unsent bytes included. ``abort`` alone ends
        it with a FIN when nothing is unread, which the peer cannot tell from a clean close."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # (already gone: nothing left to reset)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.closed or self.transport is None or self.transport.is_closing()

    def at_eof(self) -> bool:
        return self.eof and not self.buf

    # -- reading (stream mode) --------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _consumed(self) -> None:
        if self._read_paused and len(self.buf) <= self.limit and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    async def _wait(self) -> None:
        if self._waiter is not None:
            raise RuntimeError("two readers on one channel")
        if self._read_paused and self.transport is not None:
            self._read_paused = False  # the reader wants more than the limit: let it come
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _raise_error(self) -> None:
        if self.error is not None:
            raise ConnectionResetError(str(self.error) or "connection reset") from None

    async def readuntil(self, separator: bytes = b"\r\n\r\n", limit: int | None = None) -> bytes:
        """Bytes up to and including ``separator``; the stream errors when there are none."""
        limit = self.limit if limit is None else limit
        start = 0
        while True:
            buf = self.buf
            i = buf.find(separator, start)
            if i >= 0:
                end = i + len(separator)
                if end > limit:
                    raise asyncio.LimitOverrunError("separator found beyond the limit", i)
                data = bytes(buf[:end])
                del buf[:end]
                self._consumed()
                return data
            if len(buf) > limit:
                raise asyncio.LimitOverrunError("separator not found within the limit", len(buf))
            if self.eof:
                self._raise_error()
                partial = bytes(buf)
                buf.clear()
                raise asyncio.IncompleteReadError(partial, None)
            start = max(0, len(buf) - len(separator) + 1)
            await self._wait()

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes as soon as there are any; b"" at EOF."""
        while not self.buf:
            if self.eof:
                self._raise_error()
                return b""
            await self._wait()
        buf = self.buf
        if len(buf) <= n:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        self._consumed()
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; IncompleteReadError if the peer stops short."""
        while len(self.buf) < n:
            if self.eof:
                self._raise_error()
                partial = bytes(self.buf)
                self.buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
            await self._wait()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self._consumed()
        return data


def close_conn(conn: Channel) -> None:
    """Close a connection without waiting (the transport finishes on its own)."""
    conn.close()
