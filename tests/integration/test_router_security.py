"""The router process at its edge, as an attacker would meet it: smuggling, forged X-Forwarded-For,
chunk extensions and trailers, too many connections, trickled bodies. (A trickled head is cut by
the idle deadline: tests/integration/test_router_fastpath.py.)

Each test runs a real router process (``start_router``) in front of a real upstream HTTP server on
127.0.0.1 that records exactly what it received (the bytes, and the requests it parsed out of
them, as a typical server would), and talks to the router over raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from agent.router import RouterConfig, Upstream
from tests.integration import test_router as base
from tests.integration.test_router import Router, wait_stats

router = base.router  # the same fixture: a real router process, shut down and its log checked

SMUGGLED = b"GET /smuggled-path HTTP/1.1\r\nHost: svc\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"


@dataclass
class Seen:
    """One request the upstream parsed: its request line, headers (lower-case names), body."""

    line: str
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes = b""  # the head as received, bytes for bytes

    @property
    def path(self) -> str:
        parts = self.line.split(" ")
        return parts[1] if len(parts) == 3 else f"<garbage {self.line!r}>"

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


@dataclass
class Recorder:
    """An HTTP/1.1 upstream that answers each request with its path, recording all it got."""

    seen: list[Seen] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    port: int = 0
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> Recorder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # stop() ends a connection the router keeps idle
        finally:
            self.tasks.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        self.raw += head
        lines = head.decode("latin-1").split("\r\n")
        headers = [
            (k.strip().lower(), v.strip())
            for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
        ]
        seen = Seen(lines[0], headers, b"", head)
        self.seen.append(seen)
        if seen.path.startswith("<garbage"):
            return False
        if "chunked" in ",".join(seen.header("transfer-encoding")).lower():
            seen.body = await self._chunked(reader)
        else:
            seen.body = await reader.readexactly(int(seen.header("content-length")[0] or 0)
                                                 if seen.header("content-length") else 0)
            self.raw += seen.body
        reply = json.dumps({"path": seen.path, "len": len(seen.body)}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
        await writer.drain()
        return True

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = b""
        while True:
            line = await reader.readline()  # LF-terminated, as many servers read it
            self.raw += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    self.raw += line
                self.raw += line
                return body
            data = await reader.readexactly(size + 2)
            self.raw += data
            body += data[:-2]


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    r = await Recorder().start()
    try:
        yield r
    finally:
        await r.stop()


def config(rec: Recorder, **options: object) -> RouterConfig:
    return RouterConfig(
        service="hello", listen_host="127.0.0.1", listen_port=0, drain_timeout=2.0,
        upstreams=[Upstream(slot="a", port=rec.port, weight=1, healthy=True)],
        **options,  # type: ignore[arg-type]  # each case passes other fields
    )


class Raw:
    """One client connection to the router that sends bytes as given and reads responses.

    Plain socket calls (not asyncio streams): a response the router sent just before it reset
    the connection is still read, as the kernel hands it over before the reset.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int) -> Raw:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def _more(self) -> bool:
        try:
            data = await self.loop.sock_recv(self.sock, 65536)
        except ConnectionError:
            data = b""
        self.buf += data
        return bool(data)

    async def response(self) -> tuple[int, bytes]:
        """(status, body) of the next response; (0, b"") if the router closed the connection."""
        async with asyncio.timeout(15):
            while b"\r\n\r\n" not in self.buf:
                if not await self._more():
                    return 0, b""
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(self.buf) < length:
                if not await self._more():
                    return 0, b""
            body, self.buf = self.buf[:length], self.buf[length:]
            return int(head.split(b" ")[1]), body

    async def closed_by_router(self) -> bool:
        """True once the router closes the connection (bounded wait)."""
        async with asyncio.timeout(15):
            while await self._more():
                pass
        return True

    async def trickle(self, data: bytes) -> int:
        """Send ``data`` a byte at a time every 50 ms; how many went before the router cut."""
        for sent in range(len(data)):
            try:
                await self.send(data[sent : sent + 1])
            except ConnectionError:
                return sent
            await asyncio.sleep(0.05)  # the trickle's pace (the attack), not a wait
        return len(data)

    def close(self) -> None:
        self.sock.close()


async def request(port: int, data: bytes) -> tuple[int, bytes]:
    c = await Raw.open(port)
    try:
        await c.send(data)
        return await c.response()
    finally:
        c.close()


async def settled(rec: Recorder, port: int) -> list[str]:
    """The paths the upstream parsed, once a later request has reached it: anything the router
    sent on before it (a smuggled request included) has been parsed by then."""
    assert await request(port, b"GET /after HTTP/1.1\r\nHost: svc\r\n\r\n") == (
        200, b'{"path": "/after", "len": 0}'
    )
    return rec.paths()


# -- defect 1: request smuggling through Connection -----------------------------------------------


@pytest.mark.parametrize("connection", ["Content-Length", "content-length, keep-alive"])
async def test_connection_content_length_smuggles_nothing(
    router: Router, recorder: Recorder, connection: str
) -> None:
    """A body framed by a Content-Length that Connection names never reaches the upstream as a
    request of its own: the router answers 400 and the upstream sees nothing of it."""
    st = await router.client.configure(config(recorder))
    head = (
        f"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: {len(SMUGGLED)}\r\n"
        f"Connection: {connection}\r\n\r\n"
    ).encode()
    status, _ = await request(st.port, head + SMUGGLED)
    assert await settled(recorder, st.port) == ["/after"]
    assert status == 400


async def test_connection_transfer_encoding_smuggles_nothing(
    router: Router, recorder: Recorder
) -> None:
    """The same with a chunked body whose Transfer-Encoding header Connection names."""
    st = await router.client.configure(config(recorder))
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    head = (
        b"POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: Transfer-Encoding\r\n\r\n"
    )
    status, _ = await request(st.port, head + body)
    assert await settled(recorder, st.port) == ["/after"]
    assert status == 400


@pytest.mark.parametrize("warm", [True, False], ids=["fast-path", "general-path"])
async def test_connection_cannot_remove_host(
    router: Router, recorder: Recorder, warm: bool
) -> None:
    """Connection: Host is refused on the callback fast path (an idle pooled upstream connection
    is there) and on the general path alike; the upstream never gets a request without Host."""
    st = await router.client.configure(config(recorder))
    c = await Raw.open(st.port)
    try:
        if warm:  # leaves an idle keep-alive upstream connection in the pool: the fast path
            await c.send(b"GET /warm HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert (await c.response())[0] == 200
        await c.send(b"GET /hostless HTTP/1.1\r\nHost: svc\r\nConnection: Host\r\n\r\n")
        status, _ = await c.response()
    finally:
        c.close()
    paths = await settled(recorder, st.port)
    assert "/hostless" not in paths
    assert all(s.header("host") == ["svc"] for s in recorder.seen)
    assert status == 400


async def test_well_framed_bodies_still_pass(router: Router, recorder: Recorder) -> None:
    """Requests with a body and ordinary Connection tokens still reach the upstream whole."""
    st = await router.client.configure(config(recorder))
    status, body = await request(
        st.port,
        b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nConnection: keep-alive, X-A\r\n"
        b"X-A: 1\r\n\r\nhello",
    )
    assert (status, json.loads(body)) == (200, {"path": "/p", "len": 5})
    assert recorder.seen[0].header("x-a") == []
    assert recorder.seen[0].header("content-length") == ["5"]


# -- defect 8a: X-Forwarded-For at the edge --------------------------------------------------------


async def _forwarded_for(router: Router, rec: Recorder, **options: object) -> list[list[str]]:
    """XFF as the upstream saw it for a POST (general path) and a GET on a warm pool (fast)."""
    st = await router.client.configure(config(rec, **options))
    c = await Raw.open(st.port)
    try:
        for head in (
            b"POST /general HTTP/1.1\r\nHost: svc\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"Content-Length: 2\r\n\r\nhi",
            b"GET /fast HTTP/1.1\r\nHost: svc\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"X-Forwarded-For: 7.7.7.7\r\n\r\n",
        ):
            await c.send(head)
            assert (await c.response())[0] == 200
    finally:
        c.close()
    assert rec.paths() == ["/general", "/fast"]
    return [s.header("x-forwarded-for") for s in rec.seen]


async def test_x_forwarded_for_is_set_from_the_peer(router: Router, recorder: Recorder) -> None:
    """By default a client's X-Forwarded-For is replaced by its own address, on both paths."""
    assert await _forwarded_for(router, recorder) == [["127.0.0.1"], ["127.0.0.1"]]


async def test_x_forwarded_for_of_a_trusted_proxy_is_kept(
    router: Router, recorder: Recorder
) -> None:
    """With the peer in ``trusted_proxies`` its X-Forwarded-For is kept and the peer appended."""
    seen = await _forwarded_for(router, recorder, trusted_proxies=["10.0.0.0/8", "127.0.0.0/8"])
    assert seen == [["6.6.6.6, 127.0.0.1"], ["6.6.6.6, 7.7.7.7, 127.0.0.1"]]


async def test_bad_trusted_proxies_are_refused(router: Router, recorder: Recorder) -> None:
    """A trusted_proxies entry that is no address or network refuses the whole config."""
    with pytest.raises(base.RouterUnavailable, match="trusted_proxies"):
        await router.client.configure(config(recorder, trusted_proxies=["10.0.0.0/33"]))


# -- defect 8b: chunk extensions and trailers ------------------------------------------------------


async def test_chunk_extensions_and_trailers_do_not_reach_the_upstream(
    router: Router, recorder: Recorder
) -> None:
    """The upstream gets the chunks' sizes and data only: no extension, no trailer field."""
    st = await router.client.configure(config(recorder))
    status, body = await request(
        st.port,
        b"POST /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=\"x\"\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
    )
    assert (status, json.loads(body)) == (200, {"path": "/c", "len": 5})
    assert recorder.raw.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


@pytest.mark.parametrize(
    "body",
    [
        b"5;a\nGET /smuggled-path HTTP/1.1\r\nhello\r\n0\r\n\r\n",  # bare LF in a chunk line
        b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n",  # over MAX_CHUNK_LINE
        b"5\r\nhello\r\n0\r\nX-A: 1\nX-B: 2\r\n\r\n",  # bare LF in a trailer
    ],
)
async def test_malformed_chunked_request_is_refused(
    router: Router, recorder: Recorder, body: bytes
) -> None:
    """A malformed chunked request body gets 400 and the upstream never sees the request."""
    st = await router.client.configure(config(recorder))
    status, _ = await request(
        st.port, b"POST /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    )
    assert await settled(recorder, st.port) == ["/after"]
    assert status == 400


# -- defect 7: exhaustion --------------------------------------------------------------------------


async def test_connections_over_the_cap_are_refused(router: Router, recorder: Recorder) -> None:
    """With max_connections=3 the fourth connection gets a 503 and is closed, and is counted;
    once one of the three goes, a new connection is served again."""
    st = await router.client.configure(config(recorder, max_connections=3))
    held = [await Raw.open(st.port) for _ in range(3)]
    try:
        for c in held:  # each is accepted and served: it holds its place
            await c.send(b"GET /held HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert (await c.response())[0] == 200
        extra = await Raw.open(st.port)
        status, body = await extra.response()
        assert status == 503 and b"connections" in body
        assert await extra.closed_by_router()
        extra.close()
        await wait_stats(router, lambda s: s.slots["router"].errors >= 1)
        held.pop().close()
        deadline = time.monotonic() + 15
        while True:  # the router sees the close a moment later: poll, bounded
            status, _ = await request(st.port, b"GET /again HTTP/1.1\r\nHost: svc\r\n\r\n")
            if status == 200:
                break
            assert time.monotonic() < deadline, "a freed place was never given again"
            await asyncio.sleep(0.05)
    finally:
        for c in held:
            c.close()


async def test_a_trickled_body_is_cut_at_its_deadline(router: Router, recorder: Recorder) -> None:
    """A body trickled a byte at a time (each read well within the per-read timeout) is cut
    with 408 once body_timeout has passed since its head; the upstream never sees it."""
    st = await router.client.configure(config(recorder, body_timeout=0.5))
    c = await Raw.open(st.port)
    try:
        await c.send(b"POST /slow HTTP/1.1\r\nHost: svc\r\nContent-Length: 200\r\n\r\n")
        trickle = asyncio.create_task(c.trickle(b"x" * 200))
        status, body = await c.response()
        assert not trickle.done(), "the whole body went in: nothing was cut"
        assert status == 408, (status, body)
        assert await c.closed_by_router()
        trickle.cancel()
        await asyncio.gather(trickle, return_exceptions=True)
    finally:
        c.close()
    assert await settled(recorder, st.port) == ["/after"]

