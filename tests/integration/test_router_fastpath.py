"""agent.router.client and proxy: the fast path and its hand-overs, in-process on real sockets.

A ``Proxy`` listens on a real socket in the test's event loop; upstreams are small scripted asyncio
servers whose misbehaviour each test chooses (close a reused connection, hang, send too much, die
mid-body). The router process as a whole is covered by tests/integration/test_router.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable

import pytest

import agent.router.client as client_mod
import agent.router.exchange as exchange_mod
import agent.router.proxy as proxy_mod
from agent.router.client import HIGH_WATER
from agent.router.control import RouterConfig, Upstream
from agent.router.exchange import BUFFER_LIMIT
from agent.router.routing import build_routing
from tests.unit.agent.router import rig as rig_kit
from tests.unit.agent.router.rig import Handler, Scripted, path_of


def ok(body: bytes, *, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def echo_path(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
    w.write(ok(b"%s conn=%d" % (path_of(head), c)))
    return True


class Rig(rig_kit.Rig):
    """The unit tests' rig (``tests.unit.agent.router.rig``) whose ``upstream`` also routes
    every request to the upstream it starts (one slot, the weight given)."""

    async def upstream(self, handler: Handler, weight: int = 1,  # type: ignore[override]
                       slot: str = "a") -> Scripted:
        up = await super().upstream(handler)
        self.proxy.apply(build_routing(RouterConfig(
            service="svc", listen_host="127.0.0.1", listen_port=self.port,
            upstreams=[Upstream(slot=slot, port=up.port, weight=weight, healthy=True)])))
        return up


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with rig_kit.running(Rig) as r:
        yield r


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one Content-Length response."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
    return int(head.split(b" ")[1]), head, body


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``pred`` until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_pipelined_requests_are_answered_in_order(rig: Rig) -> None:
    """Five requests in one write, one with a body, get five answers in request order."""
    await rig.upstream(echo_path)
    reader, writer = await connect(rig.port)
    post = b"POST /p3 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    writer.write(get("/p1") + get("/p2") + post + get("/p4") + get("/p5"))
    paths = []
    for _ in range(5):
        status, _, body = await read_response(reader)
        assert status == 200
        paths.append(body.split(b" ")[0])
    writer.close()
    assert paths == [b"/p1", b"/p2", b"/p3", b"/p4", b"/p5"]
    assert rig.proxy.slots["a"].requests == 5


async def test_keepalive_requests_reuse_one_upstream_connection(rig: Rig) -> None:
    """After the first request, a keep-alive client's requests ride one pooled connection."""
    up = await rig.upstream(echo_path)
    reader, writer = await connect(rig.port)
    for i in range(20):
        writer.write(get(f"/{i}"))
        status, _, body = await read_response(reader)
        assert (status, body) == (200, f"/{i} conn=1".encode())
    writer.close()
    assert up.conns == 1 and up.requests == 20


async def test_stale_pooled_connection_is_retried_on_a_fresh_one(rig: Rig) -> None:
    """An upstream closing a reused connection before answering costs the client nothing."""

    async def first_only(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        if r > 1:
            return False  # close without a byte of response
        w.write(ok(b"conn=%d" % c))
        return True

    up = await rig.upstream(first_only)
    reader, writer = await connect(rig.port)
    for _ in range(4):
        writer.write(get("/"))
        status, _, body = await read_response(reader)
        assert status == 200, body
    writer.close()
    assert up.conns == 4  # every reused connection failed once and a fresh one answered
    assert rig.proxy.slots["a"].failures == 3
    assert rig.proxy.slots["a"].requests == 4 and rig.proxy.slots["a"].errors == 0


@pytest.mark.parametrize("post", [
    b"POST /pay HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\namount=10",  # general path
    b"POST /pay?amount=10 HTTP/1.1\r\nHost: x\r\n\r\n",  # no body: the fast path
])
@pytest.mark.parametrize("dies", ["closes", "half a head", "a head too large"])
async def test_a_request_that_is_not_idempotent_is_never_sent_twice(
    rig: Rig, post: bytes, dies: str,
) -> None:
    """A POST on a reused connection whose upstream took it and died (closed, reset after half
    a head, or sent a head past MAX_HEAD) is answered 502: the upstream may have acted on it,
    and a second copy would act twice (a review had the same payment POSTed twice). A stale
    keep-alive is told from it only for idempotent methods (above), as nginx and Go do."""
    seen: list[bytes] = []

    async def dying(c: int, r: int, head: bytes, rd: asyncio.StreamReader,
                    w: asyncio.StreamWriter) -> bool:
        if r == 1 and c == 1:
            w.write(ok(b"warm"))  # the first exchange pools the connection
            return True
        seen.append(head.split(b" ")[1])
        if b"Content-Length: 9" in head:
            await rd.readexactly(9)
        if dies == "half a head":
            w.write(b"HTTP/1.1 200 OK\r\nContent-")
            await w.drain()
            w.transport.abort()
        elif dies == "a head too large":
            w.write(b"HTTP/1.1 200 OK\r\nX: " + b"y" * (70 * 1024) + b"\r\n\r\n")
        return False

    await rig.upstream(dying)
    reader, writer = await connect(rig.port)
    writer.write(get("/warm"))
    assert (await read_response(reader))[2] == b"warm"
    writer.write(post)
    status, _, _ = await read_response(reader)
    writer.close()
    assert status == 502
    assert len(seen) == 1, seen


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_100_continue_goes_to_http_11_clients_only(rig: Rig, version: str) -> None:
    """``Expect: 100-continue`` is answered 100 Continue for an HTTP/1.1 client; an HTTP/1.0
    client's is ignored (RFC 9110 10.1.1), since no 1xx may go to one (15.2): a review's HTTP/1.0
    client got ``HTTP/1.1 100 Continue`` and would take it for the answer."""
    await rig.upstream(echo_path)
    reader, writer = await connect(rig.port)
    writer.write(f"POST /up HTTP/{version}\r\nHost: x\r\nExpect: 100-continue\r\n"
                 "Content-Length: 2\r\n\r\nhi".encode())
    if version == "1.1":
        async with asyncio.timeout(10):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    status, _, body = await read_response(reader)  # (the first response on 1.0)
    writer.close()
    assert (status, body) == (200, b"/up conn=1")


async def test_bytes_past_the_body_keep_a_connection_out_of_the_pool(rig: Rig) -> None:
    """An upstream sending more than its Content-Length has its connection dropped, not reused."""

    async def too_much(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"right") + b"garbage")
        return True

    up = await rig.upstream(too_much)
    reader, writer = await connect(rig.port)
    for _ in range(3):
        writer.write(get("/"))
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"right")
    writer.close()
    await until(lambda: up.conns == 3)
    pool = next(iter(rig.proxy.pools.values()))
    assert pool.idle == 0


async def test_a_small_body_written_after_its_head_reaches_the_client_in_one_write(
    rig: Rig,
) -> None:
    """A head and a small body the upstream writes apart are held, then sent together; the
    upstream connection stays pooled."""
    go = asyncio.Event()

    async def split(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        if r != 2:
            w.write(ok(b"plain"))
            return True
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await w.drain()
        await go.wait()
        w.write(b"split")
        await w.drain()
        w.write(b" body")
        return True

    up = await rig.upstream(split)
    reader, writer = await connect(rig.port)
    writer.write(get("/warm"))
    assert (await read_response(reader))[2] == b"plain"
    writer.write(get("/split"))
    client = next(iter(rig.proxy.clients))
    await until(lambda: client.held is not None)
    assert client.held is not None and client.held[0].startswith(b"HTTP/1.1 200 OK\r\n")
    go.set()
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b"split body")
    writer.write(get("/after"))
    assert (await read_response(reader))[2] == b"plain"
    writer.close()
    assert client.held is None and up.conns == 1 and rig.proxy.slots["a"].requests == 3


async def test_large_response_pauses_the_upstream_while_the_client_does_not_read(
    rig: Rig,
) -> None:
    """A 64 MiB body to a client that stops reading is held back upstream, then arrives whole."""
    big = os.urandom(64 * 1024 * 1024)

    async def large(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        if r == 1:
            w.write(ok(b"warm"))  # the first exchange pools the connection
        else:
            w.write(ok(big))
        return True

    up = await rig.upstream(large)
    reader, writer = await connect(rig.port)
    writer.write(get("/warm"))
    assert (await read_response(reader))[2] == b"warm"
    writer.write(get("/big"))
    # The client reads nothing: the router must stop reading the upstream rather than buffer
    # the body. Watch for a second that what the router holds stays bounded.
    (client,) = rig.proxy.clients
    held = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert client.transport is not None
        held = max(held, client.transport.get_write_buffer_size())
        await asyncio.sleep(0.01)
    assert held < HIGH_WATER + 2 * 1024 * 1024
    # Socket buffers on loopback take some MiB; the rest is still upstream.
    assert up.writers[0].transport.get_write_buffer_size() > 32 * 1024 * 1024
    status, _, body = await read_response(reader)
    writer.close()
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(big).digest()
    assert rig.proxy.slots["a"].requests == 2


@pytest.mark.parametrize("extra", ["Connection: close\r\n", ""])
async def test_a_client_that_never_reads_its_last_answer_is_dropped(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, extra: str,
) -> None:
    """The answer is whole in the router's buffer, the connection closing (asked, or idle too
    long after it): a closing transport flushes with no bound of its own, so a client that
    reads nothing held its connection and its place under max_connections for ever (a review
    locked a service out with three such clients at a cap of three). It is dropped once
    WRITE_TIMEOUT has passed. (HIGH_WATER is raised here so that the unsent rest of the answer
    never pauses the connection: the case where nothing else would end it.)"""
    monkeypatch.setattr(client_mod, "HIGH_WATER", 1 << 30)
    monkeypatch.setattr(client_mod, "WRITE_TIMEOUT", 0.3)
    monkeypatch.setattr(client_mod, "IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(proxy_mod, "SWEEP_EVERY", 0.05)
    body = b"x" * (16 * 1024 * 1024)  # more than loopback's socket buffers take

    async def large(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"warm") if r == 1 else ok(body))
        return True

    await rig.upstream(large)
    reader, writer = await connect(rig.port)
    writer.write(get("/warm"))
    assert (await read_response(reader))[2] == b"warm"
    writer.write(get("/big", extra))
    await until(lambda: rig.proxy.slots["a"].requests == 2)  # answered, as the router sees it
    (client,) = rig.proxy.clients
    assert client.transport is not None and client.transport.get_write_buffer_size() > 0
    await until(lambda: not rig.proxy.clients)
    writer.close()


async def test_upstream_dying_mid_body_cuts_the_client_and_counts(rig: Rig) -> None:
    """A body cut short upstream closes the client connection; the slot counts a 502."""

    async def cut(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        if r == 1:
            w.write(ok(b"warm"))
            return True
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await w.drain()
        return False

    await rig.upstream(cut)
    reader, writer = await connect(rig.port)
    writer.write(get("/warm"))
    await read_response(reader)
    writer.write(get("/cut"))
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        rest = await reader.read()  # until the router closes the connection
    writer.close()
    assert head.startswith(b"HTTP/1.1 200") and rest == b"only ten b"
    c = rig.proxy.slots["a"]
    assert c.failures == 1 and c.errors == 1 and c.requests == 2


@pytest.mark.parametrize("framing", [b"", b"Transfer-Encoding: chunked\r\n"])
async def test_an_upstream_reset_mid_body_resets_the_client(rig: Rig, framing: bytes) -> None:
    """A body with no Content-Length (read until close, or chunked: the general path) that the
    upstream breaks off with a reset reaches the client as a reset, not as a clean close: a
    review's read-until-close body ``{"balance": 10`` cut short read as whole through the router
    (the FIN that ends such a body), while the upstream's reset said it was not."""
    sent = asyncio.Event()

    async def crash(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n"
                + (b"e\r\n" if framing else b"") + b'{"balance": 10')
        await w.drain()
        async with asyncio.timeout(10):
            await sent.wait()  # the client has the head: the body is being relayed
        w.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        w.transport.abort()
        return False

    await rig.upstream(crash)
    reader, writer = await connect(rig.port)
    writer.write(get("/account"))
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        sent.set()
        with pytest.raises(ConnectionResetError):
            while await reader.read(65536):
                pass  # a clean end of stream (b"") fails the test
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    c = rig.proxy.slots["a"]
    assert c.failures == 1 and c.errors == 1


async def test_client_leaving_mid_response_drops_that_upstream_connection(rig: Rig) -> None:
    """A client gone mid-body costs its upstream connection; the next client is served."""
    big = os.urandom(8 * 1024 * 1024)

    async def large(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        w.write(ok(big if path_of(head) == b"/big" else b"small"))
        return True

    up = await rig.upstream(large)
    reader, writer = await connect(rig.port)
    writer.write(get("/small"))
    await read_response(reader)
    writer.write(get("/big"))
    await reader.readuntil(b"\r\n\r\n")
    writer.transport.abort()
    await until(lambda: not rig.proxy.clients)
    reader, writer = await connect(rig.port)
    writer.write(get("/small"))
    assert (await read_response(reader))[2] == b"small"
    writer.close()
    assert up.conns == 2  # the aborted exchange's connection was not reused


async def test_fast_path_timeout_answers_504(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pooled upstream that never answers gets a 504 after the response timeout."""
    monkeypatch.setattr(client_mod, "RESPONSE_TIMEOUT", 0.3)
    monkeypatch.setattr(proxy_mod, "SWEEP_EVERY", 0.05)

    async def hang(c: int, r: int, head: bytes, reader: object, w: asyncio.StreamWriter) -> bool:
        if r == 1:
            w.write(ok(b"warm"))
            return True
        await asyncio.sleep(30)  # never answers within the test
        return False

    await rig.upstream(hang)
    reader, writer = await connect(rig.port)
    writer.write(get("/warm"))
    await read_response(reader)
    started = time.monotonic()
    writer.write(get("/hang"))
    status, head, body = await read_response(reader)
    writer.close()
    assert status == 504 and b"did not answer" in body and b"Connection: close" in head
    assert time.monotonic() - started < 5
    assert rig.proxy.slots["a"].errors == 1


async def _upload(rig: Rig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  size: int, pause: float = 0.0) -> tuple[int, bytes, bytes]:
    """POST a body of ``size`` bytes (over BUFFER_LIMIT: streamed), ``pause`` seconds in the
    middle, once the upstream has its first part; the answer."""
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    half = size // 2
    writer.write(b"u" * half)
    if pause:
        await until(lambda: rig.upstreams[0].requests == 1)
        await asyncio.sleep(pause)  # a slow client, longer than RESPONSE_TIMEOUT (not a race)
    writer.write(b"u" * (size - half))
    return await read_response(reader)


async def test_a_slow_upload_is_not_cut_by_the_response_timeout(
    rig: Rig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A streamed upload taking longer than RESPONSE_TIMEOUT (but within body_timeout) is
    answered: a review's slow large upload was cut with 504 at 60 s, whatever body_timeout said,
    since the wait for the answer ran from the head sent, over the body. It now starts once the
    body is sent: an upstream that then never answers still gets its 504."""
    monkeypatch.setattr(exchange_mod, "RESPONSE_TIMEOUT", 0.2)
    size = 3 * BUFFER_LIMIT  # (its first half is over the limit: the upload is streamed)

    async def store(c: int, r: int, head: bytes, rd: asyncio.StreamReader,
                    w: asyncio.StreamWriter) -> bool:
        await rd.readexactly(size)
        if r == 1:
            w.write(ok(b"stored"))
            return True
        await asyncio.sleep(30)  # never answers within the test
        return False

    await rig.upstream(store)
    reader, writer = await connect(rig.port)
    status, _, body = await _upload(rig, reader, writer, size, pause=1.0)
    assert (status, body) == (200, b"stored")
    status, _, body = await _upload(rig, reader, writer, size)
    writer.close()
    assert status == 504 and b"did not answer" in body


async def test_an_upstream_that_stops_taking_an_upload_is_dropped(
    rig: Rig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streaming a body outside RESPONSE_TIMEOUT leaves each wait for the upstream to take
    more bounded by WRITE_TIMEOUT: one that reads none of it is answered 504."""
    monkeypatch.setattr(exchange_mod, "WRITE_TIMEOUT", 0.2)
    size = 64 * 1024 * 1024  # more than loopback's socket buffers take

    async def deaf(c: int, r: int, head: bytes, rd: asyncio.StreamReader, _: object) -> bool:
        await asyncio.sleep(30)  # reads no body byte within the test
        return False

    await rig.upstream(deaf)
    _, writer = await connect(rig.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    writer.write(b"u" * size)
    await until(lambda: rig.proxy.slots["a"].errors == 1)
    writer.transport.abort()
    await until(lambda: not rig.proxy.clients)


UPLOAD = 64 * 1024 * 1024  # more than loopback's socket buffers take


async def _upload_answered_early(rig: Rig, monkeypatch: pytest.MonkeyPatch, then: str,
                                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client's UPLOAD on its way (written, not yet sent) to an upstream that answers it
    413 at once and then ``then``: closes, or stops reading."""
    monkeypatch.setattr(exchange_mod, "WRITE_TIMEOUT", 0.2)

    async def refuse(c: int, r: int, head: bytes, rd: asyncio.StreamReader,
                     w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\n\r\ntoo large")
        await w.drain()
        if then == "stops reading":
            await asyncio.sleep(30)  # reads no body byte within the test
        return False  # (closed with the body unread: a reset)

    await rig.upstream(refuse)
    reader, writer = await connect(rig.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % UPLOAD)
    writer.write(b"u" * UPLOAD)
    return reader, writer


@pytest.mark.parametrize("then", ["closes", "stops reading"])
async def test_an_early_answer_to_an_upload_is_relayed(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, then: str,
) -> None:
    """An upstream that answers a streamed upload before its end (413) and closes, or stops
    reading it, has that answer relayed, with Connection: close, and counted as its 4xx: a
    review's upload got the router's 502 instead, charged to the slot as a failure."""
    reader, writer = await _upload_answered_early(rig, monkeypatch, then)
    status, head, body = await read_response(reader)
    writer.transport.abort()
    assert (status, body) == (413, b"too large") and b"Connection: close" in head
    await until(lambda: not rig.proxy.clients)
    c = rig.proxy.slots["a"]
    assert (c.requests, c.errors, c.failures) == (1, 0, 0)


@pytest.mark.parametrize("then", ["closes", "stops reading"])
async def test_a_client_sending_its_whole_upload_before_reading_gets_the_early_answer(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, then: str,
) -> None:
    """Most clients (Python's http.client, requests, many SDKs) send the whole body before
    they read any answer. After an upstream's early 413 the router closed the connection with
    the rest of the body unread, which the kernel turns into a reset: the client's send failed
    (ECONNRESET, EPIPE) and it never saw the 413. The router now closes as nginx does
    (lingering): its answer, then a FIN, then it reads and drops what the client still sends,
    until the client closes."""
    reader, writer = await _upload_answered_early(rig, monkeypatch, then)
    async with asyncio.timeout(20):
        await writer.drain()  # the whole body sent, none of the answer read yet
    status, head, body = await read_response(reader)
    assert (status, body) == (413, b"too large") and b"Connection: close" in head
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # the router's FIN after its answer
    assert rig.proxy.clients  # still reading what the client may send, until it closes
    writer.close()
    await until(lambda: not rig.proxy.clients)


async def test_a_lingering_client_that_never_closes_is_dropped(
    rig: Rig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lingering after an early answer is bounded (``LINGER``): a client that goes on
    sending, or just never closes, is dropped then."""
    monkeypatch.setattr(client_mod, "LINGER", 0.3)
    monkeypatch.setattr(proxy_mod, "SWEEP_EVERY", 0.05)
    await rig.upstream(echo_path)
    reader, writer = await connect(rig.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX: \x00\r\n\r\n")  # a 400: answered, closed
    status, _, _ = await read_response(reader)
    assert status == 400
    writer.write(b"more of whatever it was sending")
    await until(lambda: not rig.proxy.clients)
    writer.close()


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
async def test_an_until_close_answer_is_chunked_for_a_client_that_reads_chunked(
    rig: Rig, version: bytes,
) -> None:
    """An upstream's body read until it closes (no Content-Length, not chunked) reaches an
    HTTP/1.1 client chunked, and that client's connection serves its next request (before, it
    was closed after every such answer); an HTTP/1.0 client, which cannot read chunked, gets it
    until close as before."""
    async def until_close(c: int, r: int, head: bytes, _: object,
                          w: asyncio.StreamWriter) -> bool:
        if b"/old" in head:
            w.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n" + b"legacy " * 3000)
            return False  # (closed: the end of its body)
        w.write(ok(b"next"))
        return True

    await rig.upstream(until_close)
    reader, writer = await connect(rig.port)
    keep = b"Connection: keep-alive\r\n" if version == b"HTTP/1.0" else b""
    writer.write(b"GET /old " + version + b"\r\nHost: x\r\n" + keep + b"\r\n")
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        if version == b"HTTP/1.0":
            assert b"Transfer-Encoding" not in head and b"Connection: close" in head
            assert await reader.read() == b"legacy " * 3000  # until the router closes
            writer.close()
            return
        assert b"Transfer-Encoding: chunked\r\n" in head and b"Connection" not in head
        body = b""
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        assert await reader.readexactly(2) == b"\r\n" and body == b"legacy " * 3000
    writer.write(get("/next"))
    status, _, body = await read_response(reader)
    writer.close()
    assert (status, body) == (200, b"next")
    c = rig.proxy.slots["a"]
    assert (c.requests, c.errors, c.failures) == (2, 0, 0)


async def test_idle_client_is_closed_after_the_idle_timeout(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends nothing (or half a head) is disconnected by the sweeper."""
    monkeypatch.setattr(client_mod, "IDLE_TIMEOUT", 0.2)
    monkeypatch.setattr(proxy_mod, "SWEEP_EVERY", 0.05)
    await rig.upstream(echo_path)
    reader, writer = await connect(rig.port)
    writer.write(b"GET / HTTP/1.1\r\nHo")
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    await until(lambda: not rig.proxy.clients)


async def test_interim_and_chunked_responses_are_handed_over(rig: Rig) -> None:
    """1xx then a chunked response on a pooled connection reach the client intact."""

    async def chunked(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        if r != 2:
            w.write(ok(b"warm"))
        else:
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            w.write(b"3\r\nabc\r\n0\r\n\r\n")
        return True

    up = await rig.upstream(chunked)
    reader, writer = await connect(rig.port)
    writer.write(get("/"))
    await read_response(reader)
    writer.write(get("/"))
    async with asyncio.timeout(10):
        interim = await reader.readuntil(b"\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readuntil(b"0\r\n\r\n")
    writer.write(get("/"))
    again = await read_response(reader)
    writer.close()
    assert interim.startswith(b"HTTP/1.1 103") and head.startswith(b"HTTP/1.1 200")
    assert body == b"3\r\nabc\r\n0\r\n\r\n" and again[0] == 200
    assert up.conns == 1  # the hand-over returned the connection to the pool


async def test_half_closed_client_still_gets_its_answer(rig: Rig) -> None:
    """A client that shuts down its sending side after the request still reads the response."""
    await rig.upstream(echo_path)
    reader, writer = await connect(rig.port)
    writer.write(get("/a"))
    await read_response(reader)  # the next request will be a fast-path one
    writer.write(get("/b"))
    writer.write_eof()
    status, _, body = await read_response(reader)
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # then the router closes
    writer.close()
    assert (status, body) == (200, b"/b conn=1")


async def test_no_request_reaches_a_weight_zero_slot_on_the_fast_path(rig: Rig) -> None:
    """Switching weights between keep-alive requests moves the very next request."""
    a = await rig.upstream(echo_path, slot="a")
    b = await Scripted(echo_path).start()
    rig.upstreams.append(b)

    def weights(wa: int, wb: int) -> None:
        rig.proxy.apply(build_routing(RouterConfig(
            service="svc", listen_host="127.0.0.1", listen_port=rig.port,
            upstreams=[Upstream(slot="a", port=a.port, weight=wa, healthy=True),
                       Upstream(slot="b", port=b.port, weight=wb, healthy=True)],
        )))

    reader, writer = await connect(rig.port)
    for wa, wb in ((1, 0), (0, 1), (1, 0), (0, 1)):
        weights(wa, wb)
        for _ in range(5):
            writer.write(get("/"))
            await read_response(reader)
    writer.close()
    assert (a.requests, b.requests) == (10, 10)
    assert rig.proxy.slots["a"].requests == rig.proxy.slots["b"].requests == 10


async def test_a_head_split_into_tiny_segments_is_reassembled(rig: Rig) -> None:
    """A request head sent a few bytes at a time (even 3) is served once it is whole."""
    await rig.upstream(echo_path)
    reader, writer = await connect(rig.port)
    head = get("/split")
    for i in range(0, len(head), 3):
        writer.write(head[i : i + 3])
        await writer.drain()
        await asyncio.sleep(0.001)  # separate segments; the answer is awaited below, not timed
    status, _, body = await read_response(reader)
    writer.close()
    assert (status, body) == (200, b"/split conn=1")


async def test_drain_lets_a_fast_exchange_finish_and_closes_idle_clients(rig: Rig) -> None:
    """When the proxy starts closing, an in-flight request still completes (with
    Connection: close) and an idle keep-alive client is disconnected."""
    release = asyncio.Event()

    async def slow(c: int, r: int, head: bytes, _: object, w: asyncio.StreamWriter) -> bool:
        if path_of(head) == b"/slow":
            async with asyncio.timeout(10):
                await release.wait()
        w.write(ok(b"done"))
        return True

    await rig.upstream(slow)
    busy_r, busy_w = await connect(rig.port)
    idle_r, idle_w = await connect(rig.port)
    for r, w in ((busy_r, busy_w), (idle_r, idle_w)):
        w.write(get("/warm"))
        await read_response(r)
    busy_w.write(get("/slow"))
    await until(lambda: any(c.busy for c in rig.proxy.clients))
    rig.proxy.closing = True
    rig.proxy.close_idle()
    async with asyncio.timeout(5):
        assert await idle_r.read() == b""  # the idle client is let go at once
    release.set()
    status, head, body = await read_response(busy_r)
    async with asyncio.timeout(5):
        assert await busy_r.read() == b""  # and the busy one after its answer
    busy_w.close()
    idle_w.close()
    assert (status, body) == (200, b"done") and b"Connection: close" in head
    await until(lambda: not rig.proxy.clients)
