"""The reverse proxy: one task per client connection, one upstream exchange per request.

Per request: read the head (bounded, under the idle timeout), parse it (garbage gets 400/431 and
the connection closes), read the body into memory when it is small enough (then the request can be
retried and mirrored; larger bodies are streamed), pick a slot from the *current* routing (so a
weight switch takes effect on the next request of a keep-alive connection), and exchange with it:

    attempt 1: the chosen slot, an idle pooled connection if there is one
    attempt 2: the chosen slot, a fresh connection
    attempt 3+: each other serving slot, heaviest first

An attempt fails over to the next when the connect fails, or when the connection breaks before any
response byte and the request is buffered and either the connection was a reused one (a stale
keep-alive the upstream closed) or the method is idempotent; each such failure is counted on its
slot. Anything else answers 502 (504 on a timeout). Once the response head is sent to the client
nothing can be retried: a broken upstream body closes the client connection.

The mirror copy (if this request is picked) is offered after the live response is complete.
"""

from __future__ import annotations

import asyncio
import logging
import time

from agent.router.http11 import (
    HttpError,
    RequestHead,
    client_response_head,
    error_response,
    parse_request,
    parse_response,
    upstream_request_head,
)
from agent.router.mirror import CAPTURE_LIMIT, MIRROR_BODY_LIMIT, Answer, Mirror, MirrorJob
from agent.router.routing import Routing
from agent.router.stats import ROUTER_SLOT, MirrorCounters, SlotCounters
from agent.router.upstream import BodyReader, Broken, Capture, Conn, Pool, close_conn

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 15.0  # a client connection with no request for this long is closed
CONNECT_TIMEOUT = 2.0
RESPONSE_TIMEOUT = 60.0  # from the request sent to the response head
READ_TIMEOUT = 60.0  # per body read, either side
WRITE_TIMEOUT = 60.0  # a client that does not read its response for this long is dropped
BUFFER_LIMIT = 1024 * 1024  # request bodies up to this are buffered (retryable, mirrorable)
HIGH_WATER = 256 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_UPSTREAM_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, Broken)


class ClientGone(Exception):
    """The client closed, stalled or sent a broken body; its connection is dropped."""


class _Client:
    """One client connection, as the drain on shutdown sees it."""

    __slots__ = ("busy", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.busy = False


class Proxy:
    """Serves client connections with the routing in force; counts everything per slot."""

    def __init__(self) -> None:
        self.routing: Routing | None = None
        self.pools: dict[tuple[str, int], Pool] = {}
        self.slots: dict[str, SlotCounters] = {}
        self.mirror_counters = MirrorCounters()
        self.mirror = Mirror(self.mirror_counters, self.pool_for)
        self.clients: dict[asyncio.Task[None], _Client] = {}
        self.closing = False
        self._mirror_acc = 0.0

    # -- state ------------------------------------------------------------------------------------

    def counters(self, slot: str) -> SlotCounters:
        c = self.slots.get(slot)
        if c is None:
            c = self.slots[slot] = SlotCounters()
        return c

    def pool_for(self, host: str, port: int) -> Pool:
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = Pool(host, port)
        return pool

    def apply(self, routing: Routing) -> None:
        """Put ``routing`` in force for the next request; forget pools of vanished upstreams."""
        self.routing = routing
        for up in routing.upstreams.values():
            self.counters(up.slot)
        live = {(up.host, up.port) for up in routing.upstreams.values()}
        for key in [k for k in self.pools if k not in live]:
            self.pools.pop(key).close()

    def idle_clients(self) -> list[asyncio.Task[None]]:
        return [task for task, c in self.clients.items() if not c.busy]

    # -- a client connection ----------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection until it closes, misbehaves or idles out."""
        task = asyncio.current_task()
        assert task is not None  # asyncio.start_server runs us in a task
        client = self.clients[task] = _Client(writer)
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "unknown"
        try:
            await self._serve(reader, writer, client, ip)
        except (ClientGone, ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # the drain on shutdown cancelled us: the connection just closes
        except Exception:  # a bug must cost one connection, never the router
            log.exception("client connection from %s failed", ip)
        finally:
            del self.clients[task]
            writer.close()

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: _Client,
        ip: str,
    ) -> None:
        while not self.closing:
            client.busy = False
            try:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    writer.write(error_response(400, "incomplete request head"))
                return
            except asyncio.LimitOverrunError:
                writer.write(error_response(431, "request head too large"))
                return
            client.busy = True
            started = time.perf_counter()
            try:
                req = parse_request(head)
            except HttpError as exc:
                writer.write(error_response(exc.status, str(exc)))
                return
            if not await self._exchange(req, reader, writer, ip, started):
                return

    # -- one request ------------------------------------------------------------------------------

    async def _exchange(
        self,
        req: RequestHead,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ip: str,
        started: float,
    ) -> bool:
        """Answer one request; True if the client connection stays open for the next one."""
        if req.expect_continue and req.has_body:
            writer.write(CONTINUE)
        source = BodyReader(
            reader, "chunked" if req.chunked else "length", req.content_length or 0, READ_TIMEOUT
        )
        pieces: list[bytes] = []
        size = 0
        try:
            while size <= BUFFER_LIMIT:
                piece = await source.read()
                if not piece:
                    break
                pieces.append(piece)
                size += len(piece)
        except (Broken, TimeoutError, OSError) as exc:
            raise ClientGone(str(exc)) from None
        body = b"".join(pieces)
        buffered = source.done
        routing = self.routing  # the routing in force now: a switch affects the next request
        first = routing.pick() if routing is not None else None
        if routing is None or first is None:
            reason = routing.reasons if routing is not None else "not configured yet"
            service = routing.config.service if routing is not None else "this service"
            keep = req.keep_alive and buffered and not self.closing
            message = f"no healthy upstream for {service} ({reason})"
            writer.write(error_response(503, message, keep_alive=keep))
            self.counters(ROUTER_SLOT).observe(503, (time.perf_counter() - started) * 1000.0)
            return keep
        head = upstream_request_head(req, ip)
        plan = [(first, True), (first, False)] + [(o, True) for o in routing.balancer.others(first)]
        failure = ""
        for slot, allow_idle in plan:
            up = routing.upstreams[slot]
            pool = self.pool_for(up.host, up.port)
            counters = self.counters(slot)
            conn = pool.take_idle() if allow_idle else None
            reused = conn is not None
            if conn is None:
                try:
                    conn = await pool.connect(CONNECT_TIMEOUT)
                except (OSError, TimeoutError) as exc:
                    counters.failures += 1
                    failure = f"slot {slot} refused the connection ({exc.__class__.__name__})"
                    continue
            try:
                async with asyncio.timeout(RESPONSE_TIMEOUT):
                    conn[1].write(head + body)
                    if not buffered:
                        await self._stream_request(source, conn)
                    resp_head = await conn[0].readuntil(b"\r\n\r\n")
            except ClientGone:
                close_conn(conn)
                raise
            except TimeoutError:
                close_conn(conn)
                return self._fail(writer, counters, 504, f"slot {slot} did not answer", started)
            except _UPSTREAM_ERRORS as exc:
                close_conn(conn)
                counters.failures += 1
                failure = f"slot {slot} closed the connection ({exc.__class__.__name__})"
                nothing = not (isinstance(exc, asyncio.IncompleteReadError) and exc.partial)
                if buffered and nothing and (reused or req.method in IDEMPOTENT):
                    continue
                return self._fail(writer, counters, 502, failure, started)
            return await self._respond(
                req, routing, slot, pool, conn, resp_head, writer, head, body, started
            )
        counters = self.counters(first)
        return self._fail(writer, counters, 502, failure or "no upstream answered", started)

    async def _stream_request(self, source: BodyReader, conn: Conn) -> None:
        """Send the rest of a large request body as it arrives from the client."""
        while True:
            try:
                piece = await source.read()
            except (Broken, TimeoutError, OSError) as exc:
                raise ClientGone(str(exc)) from None
            if not piece:
                return
            conn[1].write(piece)
            await conn[1].drain()

    def _fail(
        self,
        writer: asyncio.StreamWriter,
        counters: SlotCounters,
        status: int,
        message: str,
        started: float,
    ) -> bool:
        """Answer an error the router produced itself, count it, and close the connection."""
        writer.write(error_response(status, message))
        counters.observe(status, (time.perf_counter() - started) * 1000.0)
        return False

    async def _respond(
        self,
        req: RequestHead,
        routing: Routing,
        slot: str,
        pool: Pool,
        conn: Conn,
        resp_head: bytes,
        writer: asyncio.StreamWriter,
        head: bytes,
        body: bytes,
        started: float,
    ) -> bool:
        """Relay the upstream's response to the client; then maybe offer a mirror copy."""
        counters = self.counters(slot)
        upstream_reader = conn[0]
        try:
            resp = parse_response(resp_head, req.method)
            while 100 <= resp.status < 200:
                if resp.status == 101:
                    raise HttpError(502, "upgrades are not supported")
                if req.version == b"HTTP/1.1":
                    writer.write(client_response_head(resp, keep_alive=True, http10=False))
                async with asyncio.timeout(RESPONSE_TIMEOUT):
                    resp_head = await upstream_reader.readuntil(b"\r\n\r\n")
                resp = parse_response(resp_head, req.method)
        except HttpError as exc:
            close_conn(conn)
            return self._fail(writer, counters, 502, f"slot {slot}: {exc}", started)
        except (*_UPSTREAM_ERRORS, TimeoutError) as exc:
            close_conn(conn)
            counters.failures += 1
            return self._fail(writer, counters, 502, f"slot {slot} broke: {exc!r}", started)
        capture = self._mirror_capture(req, routing, len(body))
        keep = req.keep_alive and resp.body != "close" and not self.closing
        writer.write(
            client_response_head(resp, keep_alive=keep, http10=req.version == b"HTTP/1.0")
        )
        reader = BodyReader(upstream_reader, resp.body, resp.content_length, READ_TIMEOUT, capture)
        transport = writer.transport
        while True:
            try:
                piece = await reader.read()
            except (*_UPSTREAM_ERRORS, TimeoutError):
                # The head is already with the client: all we can do is cut the connection.
                close_conn(conn)
                counters.failures += 1
                counters.observe(502, (time.perf_counter() - started) * 1000.0)
                return False
            if not piece:
                break
            writer.write(piece)
            if transport.get_write_buffer_size() > HIGH_WATER:
                try:
                    async with asyncio.timeout(WRITE_TIMEOUT):
                        await writer.drain()
                except (OSError, TimeoutError):
                    close_conn(conn)
                    raise ClientGone("client stopped reading") from None
        if resp.keep_alive and self.pools.get((pool.host, pool.port)) is pool:
            pool.give_back(conn)  # (a pool dropped by a reconfigure meanwhile gets nothing back)
        else:
            close_conn(conn)
        latency_ms = (time.perf_counter() - started) * 1000.0
        counters.observe(resp.status, latency_ms)
        if capture is not None and routing.mirror_target is not None:
            target = routing.mirror_target
            self.mirror.offer(
                MirrorJob(
                    host=target.host,
                    port=target.port,
                    method=req.method,
                    target=req.target,
                    head=head,
                    body=body,
                    live=Answer(
                        status=resp.status,
                        headers=resp.headers,
                        digest=capture.digest,
                        body=capture.body,
                        truncated=capture.truncated,
                        latency_ms=latency_ms,
                    ),
                    ignore_headers=routing.ignore_headers,
                    ignore_json_fields=routing.ignore_json_fields,
                )
            )
        return keep

    def _mirror_capture(self, req: RequestHead, routing: Routing, body_size: int) -> Capture | None:
        """A capture for the live body if this request is to be mirrored, else None.

        The choice is deterministic: each eligible request adds ``percent`` to an accumulator and
        is mirrored when it reaches 100, so 10% means exactly every tenth eligible request.
        """
        if (
            routing.mirror_target is None
            or routing.mirror is None
            or req.method not in routing.mirror_methods
            or body_size > MIRROR_BODY_LIMIT
        ):
            return None
        self._mirror_acc += routing.mirror.percent
        if self._mirror_acc < 100.0:
            return None
        self._mirror_acc -= 100.0
        return Capture(CAPTURE_LIMIT)

