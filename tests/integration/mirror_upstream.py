"""A real HTTP/1.1 upstream on 127.0.0.1 (port 0) for the mirror's tests: it records every
request head it receives and answers each with the body ``reply(path)`` gives, keep-alive."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def default_reply(path: str) -> bytes:
    return b'{"ok": true}'


class RecordingUpstream:
    """GET-only upstream; ``heads`` holds each request head as received, in order."""

    def __init__(self, reply: Callable[[str], bytes] = default_reply) -> None:
        self.reply = reply
        self.heads: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> RecordingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def headers(self, index: int) -> dict[str, str]:
        """The ``index``-th request's headers, names lower-cased."""
        lines = self.heads[index].decode("latin-1").split("\r\n")[1:]
        pairs = (line.partition(":") for line in lines if line)
        return {name.lower(): value.strip() for name, _, value in pairs}

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` requests have arrived (bounded)."""
        deadline = time.monotonic() + timeout
        while len(self.heads) < count:
            assert time.monotonic() < deadline, f"{len(self.heads)} of {count} requests arrived"
            await asyncio.sleep(0.01)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                path = head.split(b" ", 2)[1].decode("latin-1")
                body = self.reply(path)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
