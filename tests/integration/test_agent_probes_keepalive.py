"""HttpProbeConnection: one keep-alive connection for a slot's repeated health probes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from agent.host.probes import HttpProbeConnection

Answer = Callable[[int], bytes | None]  # request number (1-based) -> bytes to send, None: close


class Server:
    """A real TCP server on 127.0.0.1 answering each request line with ``answer(n)``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests = 0
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                self.requests += 1
                data = self.answer(self.requests)
                if data is None:
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def drop_idle(self) -> None:
        """Close every connection, as a server does with idle keep-alive connections."""
        for w in self.writers:
            w.close()


@pytest.fixture
async def start() -> AsyncIterator[Callable[[Answer], asyncio.Future[tuple[Server, int]]]]:
    servers: list[asyncio.Server] = []

    async def _start(answer: Answer) -> tuple[Server, int]:
        s = Server(answer)
        srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
        servers.append(srv)
        return s, srv.sockets[0].getsockname()[1]

    yield _start  # type: ignore[misc]  # an async function is what the tests await
    for srv in servers:
        srv.close()
        await asyncio.wait_for(srv.wait_closed(), 5)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


async def test_probes_reuse_one_connection(start) -> None:  # type: ignore[no-untyped-def]
    """Five probes against a keep-alive server pass over a single TCP connection."""
    server, port = await start(lambda n: OK)
    conn = HttpProbeConnection(port, "/healthz")
    results = [await conn.probe(1.0) for _ in range(5)]
    await conn.close()
    assert all(r.ok for r in results)
    assert conn.connects == 1 and server.connections == 1 and server.requests == 5


async def test_a_connection_the_server_dropped_is_reopened_within_the_probe(start) -> None:  # type: ignore[no-untyped-def]
    """A keep-alive connection closed by the server while idle costs no failed probe."""
    server, port = await start(lambda n: OK)
    conn = HttpProbeConnection(port, "/healthz")
    assert (await conn.probe(1.0)).ok
    server.drop_idle()
    r = await conn.probe(1.0)
    await conn.close()
    assert r.ok, r.reason
    assert conn.connects == 2


async def test_connection_close_and_chunked_answers_are_not_reused(start) -> None:  # type: ignore[no-untyped-def]
    """'Connection: close', a chunked body and HTTP/1.0 each make the next probe reconnect."""
    answers = [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n",
    ]
    _server, port = await start(lambda n: answers[(n - 1) % 3])
    conn = HttpProbeConnection(port, "/healthz")
    results = [await conn.probe(1.0) for _ in range(3)]
    await conn.close()
    assert all(r.ok for r in results), results
    assert conn.connects == 3


async def test_an_error_status_fails_and_keeps_the_connection(start) -> None:  # type: ignore[no-untyped-def]
    """A 503 with a body fails the probe, names the status, and the connection is still reused."""
    bad = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nnope\n"
    _server, port = await start(lambda n: bad if n == 1 else OK)
    conn = HttpProbeConnection(port, "/healthz")
    first, second = await conn.probe(1.0), await conn.probe(1.0)
    await conn.close()
    assert not first.ok and "status 503" in first.reason
    assert second.ok and conn.connects == 1


async def test_garbage_fails_and_reconnects(start) -> None:  # type: ignore[no-untyped-def]
    """Bytes that are no HTTP answer fail the probe, and the next probe uses a new connection."""
    _server, port = await start(lambda n: b"SSH-2.0-hello\r\n" if n == 1 else OK)
    conn = HttpProbeConnection(port, "/healthz")
    first, second = await conn.probe(1.0), await conn.probe(1.0)
    await conn.close()
    assert not first.ok and "not an HTTP answer" in first.reason
    assert second.ok and conn.connects == 2


async def test_a_server_closing_without_answer_fails(start) -> None:  # type: ignore[no-untyped-def]
    """A fresh connection closed before any answer fails the probe (it is not retried)."""
    _server, port = await start(lambda n: None)
    conn = HttpProbeConnection(port, "/healthz")
    r = await conn.probe(1.0)
    await conn.close()
    assert not r.ok and "closed before an answer" in r.reason
    assert conn.connects == 1


async def test_a_late_answer_fails_at_the_timeout(start) -> None:  # type: ignore[no-untyped-def]
    """A server that reads the request and never answers fails the probe at its timeout."""
    _server, port = await start(lambda n: b"")  # writes nothing, keeps the connection open
    conn = HttpProbeConnection(port, "/healthz")
    r = await conn.probe(0.2)
    await conn.close()
    assert not r.ok and "no answer within 0.2s" in r.reason


async def test_nothing_listening_fails_with_the_os_reason() -> None:
    """A refused connection fails the probe with the OS's words."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    conn = HttpProbeConnection(port, "/healthz")
    r = await conn.probe(1.0)
    assert not r.ok and "refused" in r.reason.lower()
