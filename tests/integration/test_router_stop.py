"""A router that stops answers every connection the kernel has already taken for it.

The kernel completes a handshake before the router accepts the connection, and the client has
usually sent its request by then. Closing the listener resets what is still queued, and closing
a just-accepted connection before its first request is read resets it too: in both cases a client
sees ECONNRESET for a request nobody read (a CI run of ``fleetwave remove`` under load met one).

Made deterministic by queueing connections while nothing accepts them: in the first tests the
test's own loop is not running while it connects (plain blocking sockets); in the last the router
process is stopped (SIGSTOP) while clients connect and send, then told to stop and resumed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

from agent.router.listener import accept_queue, close_gracefully, refuse_new_connections
from tests.integration.test_router import (  # noqa: F401  (fixtures: used by name)
    Router,
    Service,
    cfg,
    router,
    services,
    up,
)

QUEUED = 20


async def _echo_server() -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(b"answered " + line)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0, backlog=64)


def _queue_clients(port: int, n: int) -> list[socket.socket]:
    """n connections that send a line; the caller's loop does not run meanwhile, so none is
    accepted: all wait in the listener's accept queue."""
    clients = []
    for i in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(f"request {i}\n".encode())
        clients.append(c)
    return clients


def _answers(clients: list[socket.socket]) -> list[str]:
    got = []
    for c in clients:
        try:
            got.append(c.recv(100).decode())
        except OSError as exc:
            got.append(f"{type(exc).__name__}")
        finally:
            c.close()
    return got


async def test_a_closed_listener_first_serves_the_connections_it_queued() -> None:
    server = await _echo_server()
    port = server.sockets[0].getsockname()[1]
    clients = _queue_clients(port, QUEUED)
    sock = socket.socket(fileno=server.sockets[0].fileno())
    try:
        assert accept_queue(sock) == QUEUED  # (what the kernel reports, as `ss -l` does)
    finally:
        sock.detach()

    left = await close_gracefully(server, within=5.0)

    assert left == 0
    answers = await asyncio.to_thread(_answers, clients)
    assert answers == [f"answered request {i}\n" for i in range(QUEUED)]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    await server.wait_closed()


async def test_a_filtered_listener_takes_no_new_connection_but_finishes_handshakes() -> None:
    """After the filter a SYN gets no answer (the client waits, then is refused by the closed
    port), while a connection already queued is still there to be accepted."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    port = listener.getsockname()[1]
    with listener:
        queued = socket.create_connection(("127.0.0.1", port), timeout=2)
        assert refuse_new_connections(listener)
        late = socket.socket()
        late.settimeout(0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):  # no SYN-ACK: not taken (and so never reset)
            late.connect(("127.0.0.1", port))
        assert time.monotonic() - started >= 0.4
        late.close()
        assert accept_queue(listener) == 1
        conn, _ = listener.accept()
        conn.close()
        queued.close()


async def _get(port: int, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /?n={i} HTTP/1.1\r\nHost: svc.example\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _status(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> str:
    reader, writer = conn
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        return head.split(b" ", 2)[1].decode()
    except (OSError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def test_a_router_told_to_stop_answers_every_request_it_had_taken(
        router: Router, services: list[Service]) -> None:  # noqa: F811
    """The router is frozen while clients connect and send; it is then sent SIGTERM and thawed.
    Every one of those requests is answered (200), none reset; afterwards the port refuses."""
    a = Service("a")
    services.append(a)
    st = await router.client.configure(cfg(up("a", a, 100)))
    assert st.port is not None
    os.kill(router.pid, signal.SIGSTOP)
    try:
        conns = [await _get(st.port, i) for i in range(QUEUED)]
        os.kill(router.pid, signal.SIGTERM)
    finally:
        os.kill(router.pid, signal.SIGCONT)
    statuses = await asyncio.gather(*(_status(c) for c in conns))
    assert statuses == ["200"] * QUEUED
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", st.port)
