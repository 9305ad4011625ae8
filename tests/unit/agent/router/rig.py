"""The router's proxy in the test's own event loop, on real loopback sockets (free ports).

``Rig`` holds a ``Proxy`` listening on 127.0.0.1 and the scripted upstreams a test starts: each
``Scripted`` upstream lets the test's handler answer (or not) every request head it reads, and
counts its connections, the open ones included. ``route`` puts a config in force as the agent
would. Every wait is bounded (``until``, ``read_response``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from agent.router.control import RouterConfig, Upstream
from agent.router.proxy import Proxy
from agent.router.routing import build_routing

# handler(conn_no, req_no, head, reader, writer) -> True to keep the connection open
Handler = Callable[
    [int, int, bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]
]
WAIT = 10.0  # seconds any one wait of a test may take


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def path_of(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


@dataclass
class Scripted:
    """An upstream server that lets ``handler`` answer each request head."""

    handler: Handler
    port: int = 0
    conns: int = 0  # connections accepted
    open: int = 0  # connections still open
    requests: int = 0  # request heads read
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    server: asyncio.Server | None = None

    async def start(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        self.open += 1
        conn_no, req_no = self.conns, 0
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                req_no += 1
                self.requests += 1
                if not await self.handler(conn_no, req_no, head, reader, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the router closed, or stop() ended a handler still waiting
        finally:
            self.tasks.discard(task)
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks)
        await self.server.wait_closed()


@dataclass
class Rig:
    proxy: Proxy
    port: int
    upstreams: list[Scripted] = field(default_factory=list)

    async def upstream(self, handler: Handler) -> Scripted:
        up = await Scripted(handler).start()
        self.upstreams.append(up)
        return up

    def route(self, slots: dict[str, Scripted], **options: object) -> None:
        """Put in force a config where each of ``slots`` is healthy with weight 1."""
        self.proxy.apply(build_routing(RouterConfig(
            service="svc", listen_host="127.0.0.1", listen_port=self.port,
            upstreams=[Upstream(slot=s, port=up.port, weight=1, healthy=True)
                       for s, up in slots.items()],
            **options,  # type: ignore[arg-type]  # each test passes other fields
        )))


R = TypeVar("R", bound=Rig)


@contextlib.asynccontextmanager
async def running(kind: type[R] = Rig) -> AsyncIterator[R]:  # type: ignore[assignment]
    """A started proxy listening on a free loopback port, with no config yet, in a ``kind`` of
    rig; torn down whole (the proxy, its pools, the upstreams the test started)."""
    proxy = Proxy()
    proxy.start()
    server = await asyncio.get_running_loop().create_server(proxy.protocol, "127.0.0.1", 0)
    r = kind(proxy, server.sockets[0].getsockname()[1])
    try:
        yield r
    finally:
        server.close()
        await proxy.close()
        for pool in proxy.pools.values():
            pool.close()
        for up in r.upstreams:
            await up.stop()
        await server.wait_closed()


async def until(pred: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``pred`` until it holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)  # the polling period of a bounded wait


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one Content-Length response."""
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
    return int(head.split(b" ")[1]), body
