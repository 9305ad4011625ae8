"""agent.router.client: what a client connection may cost the router when it misbehaves."""

from __future__ import annotations

import asyncio
import socket
import struct

from agent.router.client import HIGH_WATER
from tests.unit.agent.router.rig import Rig, get, ok, path_of, read_response, until

BODY = 10_000  # bytes of each answer


async def sized(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
    w.write(ok(path_of(head).ljust(BODY, b".")))
    return True


async def test_a_client_that_reads_nothing_has_at_most_one_answer_past_the_limit(
    rig: Rig,
) -> None:
    """Pipelined requests wait while the client's write buffer is over HIGH_WATER, and are all
    answered, in order, once the client reads."""
    up = await rig.upstream(sized)
    rig.route({"a": up})
    n = 2000  # 20 MB of answers: more than the kernel's socket buffers hold on loopback
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (the kernel takes little)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", rig.port))
    await loop.sock_sendall(sock, b"".join(get(f"/{i}") for i in range(n)))
    await until(lambda: len(rig.proxy.clients) == 1)
    (client,) = rig.proxy.clients
    assert client.transport is not None
    await until(lambda: client.write_paused and not client.busy and client.task is None)
    assert client.transport.get_write_buffer_size() < HIGH_WATER + 2 * BODY
    assert up.requests < n
    reader, writer = await asyncio.open_connection(sock=sock)
    for i in range(n):
        status, body = await read_response(reader)
        assert status == 200 and body.startswith(f"/{i}.".encode())
    writer.close()
    assert up.requests == n


async def test_a_client_gone_mid_request_frees_its_upstream_connection(rig: Rig) -> None:
    """A client reset while the upstream is still working on its POST closes that upstream
    connection at once (not after RESPONSE_TIMEOUT), so it no longer counts against the cap."""

    async def hold(c: int, r: int, head: bytes, reader: asyncio.StreamReader, _: object) -> bool:
        await reader.readexactly(2)  # the body
        await reader.read()  # answer nothing until the router closes the connection
        return False

    up = await rig.upstream(hold)
    rig.route({"a": up}, max_connections=10)
    clients = []
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        clients.append(writer)
    await until(lambda: up.requests == 3)
    for writer in clients:
        # A reset (a linger of 0 s): the router reads ECONNRESET. (A plain close would be a
        # half-close, and a half-closed client still gets its answer.)
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()
    await until(lambda: not rig.proxy.clients)
    await until(lambda: up.open == 0, timeout=5.0)
    assert up.conns == 3
