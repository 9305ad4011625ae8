"""A portal: a port on 127.0.0.1 of the root namespace, forwarded into a bed host.

Why: the root namespace cannot reach the bed's addresses (all of 127/8 is local there), yet the
test process and the CLI it runs in subprocesses connect by URL (nats-py makes its own sockets).
``Portal(bed, "bus", addr, 4222)`` listens on a free local port; each connection to it is joined
to a new connection to ``addr:port`` made *from inside* host ``bus`` (``NetBed.open_connection``).
Made from the target's own host, the forwarded connections never cross the bed's network, so the
test's view of the bus survives every partition and impairment the scenario sets up.

Theory: an async context manager in the test's event loop; one task per direction per connection,
all owned by the portal and cancelled when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

from tests.netbed.bed import NetBed

CHUNK = 65536


class Portal:
    """Root-namespace ``127.0.0.1:<port>`` → ``addr:port`` as seen from ``host``."""

    def __init__(self, bed: NetBed, host: str, addr: str, port: int) -> None:
        self.bed, self.host, self.addr, self.target_port = bed, host, addr, port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        """The portal as a NATS URL (for ``--nats``, ``FLEETWAVE_NATS``, ``Bus.connect``)."""
        return f"nats://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Portal:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_reader, up_writer = await self.bed.open_connection(self.host, self.addr,
                                                                  self.target_port)
        except (OSError, TimeoutError):
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy ``src`` to ``dst`` until EOF or an error; then half-close ``dst``."""
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
        with contextlib.suppress(OSError):
            dst.write_eof()
    except (OSError, asyncio.IncompleteReadError):
        with contextlib.suppress(Exception):
            dst.close()
