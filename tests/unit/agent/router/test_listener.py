"""agent.router.listener: a graceful close that is itself cancelled still closes the listener."""

from __future__ import annotations

import asyncio
import socket

import pytest

import agent.router.listener as listener
from tests.unit.agent.router.rig import until


async def test_a_close_cancelled_while_it_waits_for_the_queue_still_frees_the_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled while the accept queue is not yet empty, close_gracefully closes the listener
    anyway: its port can be bound again at once."""
    looks = 0

    def never_empty(sock: socket.socket) -> int:
        nonlocal looks
        looks += 1
        return 1  # a connection always waiting: the close waits for its whole ``within``

    monkeypatch.setattr(listener, "accept_queue", never_empty)

    async def nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        closing = asyncio.create_task(listener.close_gracefully(server, within=60.0))
        await until(lambda: looks >= 2)  # inside its wait
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert not server.is_serving()
        socket.create_server(("127.0.0.1", port)).close()  # (no "address already in use")
    finally:
        server.close()
        await server.wait_closed()
