"""The general path: one request with awaits, for what the callback fast path does not handle.

Per request: read the body into memory when it is small enough (then the request can be retried
and mirrored; larger bodies are streamed), pick a slot from the *current* routing unless the fast
path already did, and exchange with it (the whole body must arrive within the config's
``body_timeout`` of the head, else 408: a trickle holds no buffer and descriptor for long; the
wait for the response head, ``RESPONSE_TIMEOUT``, starts once the body is sent):

    attempt 1: the chosen slot, an idle pooled connection if there is one
    attempt 2: the chosen slot, a fresh connection
    attempt 3+: each other serving slot, heaviest first

An attempt fails over to the next when the connect fails, or when the connection breaks before any
response byte and the request is buffered and its method idempotent; each such failure is
counted on its slot. Anything else answers 502 (504 on a timeout). A request that is not
idempotent (POST, PATCH) is never sent twice: an upstream that closes a reused connection
before answering may have closed an idle one (a stale keep-alive, which the pool checks for
before it hands one out) or may have acted on the request and died, and only the first is safe
to retry; nginx and Go's client draw the same line. Once the response head is sent to the client
nothing can be retried: a broken upstream body aborts the client connection (a reset). A clean
close (FIN) would tell the client a read-until-close body was whole, truncated as it is; a reset
says it is not, whatever the framing. (The fast path relays Content-Length bodies only, whose
length already tells a client a cut, and closes.) An upstream that answers a streamed body
before its end (413) and closes or stops reading has that answer relayed, and both connections
closed after it (``_stream_request``).

The fast path enters here at attempt 2 when its pooled connection was stale (``skip_idle``), or
with the upstream connection whose response head it left unread (``pending``: interim responses,
chunked and until-close bodies). The mirror copy (if this request is picked) is offered after the
live response is complete. Every await runs under a timeout; a cancelled exchange (its client
gone, or the router stopping) closes the upstream connection it holds.
"""

from __future__ import annotations

import asyncio
import time

from agent.router.errors import Broken, ClientGone, HttpError
from agent.router.http11 import (
    MAX_HEAD,
    RequestHead,
    client_response_head,
    error_response,
    parse_response,
    upstream_request_head,
)
from agent.router.mirror import CAPTURE_LIMIT, MIRROR_BODY_LIMIT, Answer, MirrorJob
from agent.router.ports import Client, ProxyState
from agent.router.routing import Routing
from agent.router.stats import ROUTER_SLOT, SlotCounters
from agent.router.upstream import BodyReader, Capture, Conn, Pool, close_conn

IDLE_TIMEOUT = 15.0  # a client connection with no request for this long is closed
CONNECT_TIMEOUT = 2.0
RESPONSE_TIMEOUT = 60.0  # from the request sent (its body whole) to the response head
READ_TIMEOUT = 60.0  # per body read, either side
WRITE_TIMEOUT = 60.0  # a peer that takes nothing we write for this long is dropped (a client
# not reading its response; an upstream not reading a streamed request body: 504)
BUFFER_LIMIT = 1024 * 1024  # request bodies up to this are buffered (retryable, mirrorable)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"  # added to an until-close answer (``_respond``)

_UPSTREAM_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, Broken)


def _answered(exc: BaseException, conn: Conn) -> bool:
    """Whether any byte of a response came before ``exc`` ended the exchange: part of a head
    (left in the buffer, or in the error), or a head past ``MAX_HEAD``."""
    return bool(conn.buf) or isinstance(exc, asyncio.LimitOverrunError) or bool(
        isinstance(exc, asyncio.IncompleteReadError) and exc.partial)


class Exchange:
    """The await-based exchange of one request; shares the proxy's routing, pools and counters."""

    def __init__(self, proxy: ProxyState) -> None:
        self.proxy = proxy
        self._mirror_acc = 0.0

    async def serve(
        self,
        client: Client,
        req: RequestHead,
        *,
        first: str | None = None,
        skip_idle: bool = False,
        pending: tuple[Pool, Conn] | None = None,
        capture: Capture | None = None,
        set_cookie: bytes = b"",
    ) -> bool:
        """Answer one request; True if the client connection stays open for the next one.

        ``first`` is the slot the fast path already picked (None: pick here); ``capture`` the
        mirror capture it already decided on; ``set_cookie`` a cohort cookie line the answer
        carries (the pick was made by it).
        """
        proxy = self.proxy
        started = client.started
        if req.expect_continue and req.has_body and req.version == b"HTTP/1.1":
            # (RFC 9110 10.1.1, 15.2: an HTTP/1.0 client's expectation is ignored, and no 1xx is
            # ever sent to one: it would take the 100 for the answer.)
            client.write(CONTINUE)
        source = BodyReader(
            client, "chunked" if req.chunked else "length", req.content_length or 0, READ_TIMEOUT,
            deadline=asyncio.get_running_loop().time() + proxy.body_timeout,
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
        except (Broken, TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            raise self._body_failed(client, exc) from None
        body = b"".join(pieces)
        buffered = source.done
        routing = proxy.routing  # the routing in force now: a switch affects the next request
        if routing is not None and (
            first is None or (pending is None and first not in routing.upstreams)
        ):
            # (A slot the fast path picked before a switch that removed it is picked again.)
            if first is None and capture is None:  # (else the fast path has decided already)
                capture = self.mirror_capture(req, routing, len(body))
            if routing.cohort is None:
                first = routing.pick()
            else:
                first, set_cookie = routing.pick_counted(req, client.ip, proxy.cohort_counters)
        if routing is None or first is None:
            reason = routing.reasons if routing is not None else "not configured yet"
            service = routing.config.service if routing is not None else "this service"
            keep = req.keep_alive and buffered and not proxy.closing
            message = f"no healthy upstream for {service} ({reason})"
            client.write(error_response(503, message, keep_alive=keep))
            proxy.counters(ROUTER_SLOT).observe(503, (time.perf_counter() - started) * 1000.0)
            return keep
        trusted = req.forwarded and routing.trusts(client.ip)
        head = upstream_request_head(req, client.ip, trusted_proxy=trusted)
        if pending is not None:
            pool, conn = pending
            return await self._respond(
                client, req, routing, first, pool, conn, None, head, body, capture, started,
                set_cookie,
            )
        plan = [(first, True), (first, False)] + [(o, True) for o in routing.balancer.others(first)]
        if skip_idle:
            plan = plan[1:]
        failure = ""
        for slot, allow_idle in plan:
            up = routing.upstreams[slot]
            pool = proxy.pool_for(up.host, up.port)
            counters = proxy.counters(slot)
            idle = pool.take_idle() if allow_idle else None
            if idle is not None:
                conn = idle
            else:
                try:
                    conn = await pool.connect(CONNECT_TIMEOUT)
                except (OSError, TimeoutError) as exc:
                    counters.failures += 1
                    failure = f"slot {slot} refused the connection ({exc.__class__.__name__})"
                    continue
            whole = True
            try:
                conn.write(head + body)
                if not buffered:
                    whole = await self._stream_request(client, source, conn)
                async with asyncio.timeout(RESPONSE_TIMEOUT):  # (from the last body byte)
                    resp_head = await conn.readuntil(b"\r\n\r\n", MAX_HEAD)
            except (ClientGone, asyncio.CancelledError):  # (cancelled: the client left)
                close_conn(conn)
                raise
            except TimeoutError:
                close_conn(conn)
                return self._fail(client, counters, 504, f"slot {slot} did not answer", started)
            except _UPSTREAM_ERRORS as exc:
                close_conn(conn)
                counters.failures += 1
                failure = f"slot {slot} closed the connection ({exc.__class__.__name__})"
                if buffered and req.method in IDEMPOTENT and not _answered(exc, conn):
                    continue
                return self._fail(client, counters, 502, failure, started)
            return await self._respond(
                client, req, routing, slot, pool, conn, resp_head, head, body, capture, started,
                set_cookie, cut=not whole,
            )
        counters = proxy.counters(first)
        return self._fail(client, counters, 502, failure or "no upstream answered", started)

    async def _stream_request(self, client: Client, source: BodyReader, conn: Conn) -> bool:
        """Send the rest of a large request body as it arrives from the client; False if the
        upstream answered early and the rest is not sent (nor read from the client).

        Not under ``RESPONSE_TIMEOUT``: a large upload takes what its client takes, within the
        body's own bounds (``body_timeout`` for the whole, ``READ_TIMEOUT`` a piece); an upstream
        that stops taking it for ``WRITE_TIMEOUT`` fails the exchange (TimeoutError: 504).

        An upstream may answer before the body is whole (413, 401) and close, or stop reading:
        the body is then stopped once it has closed (FIN), or once sending fails with its whole
        response head already received, and that answer is relayed (by the caller, as the
        next thing in ``conn``), not a 502 charged to the slot. One that answers and reads on
        gets the whole body, its answer relayed after it."""
        while True:
            if conn.eof:  # the upstream will say nothing more: its answer, if any, is here
                return False
            try:
                piece = await source.read()
            except (Broken, TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                raise self._body_failed(client, exc) from None
            if not piece:
                return True
            conn.write(piece)
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await conn.drain()
            except (OSError, TimeoutError):
                if b"\r\n\r\n" in conn.buf:
                    return False
                raise

    def _body_failed(self, client: Client, exc: Exception) -> ClientGone:
        """Tell a client whose body was late (408) or malformed (400) why, and count it; the
        connection is dropped either way. No response can have begun: the body comes first."""
        if isinstance(exc, TimeoutError):
            status, message = 408, "request body not received in time"
        elif isinstance(exc, Broken):
            status, message = 400, f"bad request body: {exc}"
        else:
            return ClientGone(str(exc))  # the connection is gone: nobody to tell
        client.write(error_response(status, message))
        elapsed_ms = (time.perf_counter() - client.started) * 1000.0
        self.proxy.counters(ROUTER_SLOT).observe(status, elapsed_ms)
        return ClientGone(message)

    def _fail(
        self, client: Client, counters: SlotCounters, status: int, message: str, started: float
    ) -> bool:
        """Answer an error the router produced itself, count it, and close the connection."""
        client.write(error_response(status, message))
        counters.observe(status, (time.perf_counter() - started) * 1000.0)
        return False

    async def _respond(
        self,
        client: Client,
        req: RequestHead,
        routing: Routing,
        slot: str,
        pool: Pool,
        conn: Conn,
        resp_head: bytes | None,
        head: bytes,
        body: bytes,
        capture: Capture | None,
        started: float,
        set_cookie: bytes = b"",
        *,
        cut: bool = False,
    ) -> bool:
        """Relay the upstream's response to the client; then maybe offer a mirror copy.

        ``resp_head`` None: the head is still at the front of ``conn``'s buffer. ``cut``: the
        upstream answered before the request body was whole, whose rest neither connection can
        skip: both close after the response.
        """
        proxy = self.proxy
        counters = proxy.counters(slot)
        try:
            try:
                if resp_head is None:
                    async with asyncio.timeout(RESPONSE_TIMEOUT):
                        resp_head = await conn.readuntil(b"\r\n\r\n", MAX_HEAD)
                resp = parse_response(resp_head, req.method)
                while 100 <= resp.status < 200:
                    if resp.status == 101:
                        raise HttpError(502, "upgrades are not supported")
                    if req.version == b"HTTP/1.1":
                        client.write(client_response_head(resp, keep_alive=True, http10=False))
                    async with asyncio.timeout(RESPONSE_TIMEOUT):
                        resp_head = await conn.readuntil(b"\r\n\r\n", MAX_HEAD)
                    resp = parse_response(resp_head, req.method)
            except HttpError as exc:
                close_conn(conn)
                return self._fail(client, counters, 502, f"slot {slot}: {exc}", started)
            except (*_UPSTREAM_ERRORS, TimeoutError) as exc:
                close_conn(conn)
                counters.failures += 1
                return self._fail(client, counters, 502, f"slot {slot} broke: {exc!r}", started)
            keep = req.keep_alive and not proxy.closing and not cut
            # A body read until the upstream closes goes to an HTTP/1.1 client chunked, so that
            # its connection stays open for the next request (nginx does the same); an HTTP/1.0
            # client cannot read chunked and gets it until close.
            rechunk = keep and resp.body == "close" and req.version == b"HTTP/1.1"
            keep = keep and (resp.body != "close" or rechunk)
            client.write(client_response_head(
                resp, keep_alive=keep, http10=req.version == b"HTTP/1.0",
                extra=set_cookie + (CHUNKED if rechunk else b""),
            ))
            reader = BodyReader(conn, resp.body, resp.content_length, READ_TIMEOUT, capture)
            while True:
                try:
                    piece = await reader.read()
                except (*_UPSTREAM_ERRORS, TimeoutError):
                    # The head is already with the client: all we can do is cut the connection,
                    # with a reset (a FIN would end a read-until-close body as if it were whole).
                    close_conn(conn)
                    client.reset()
                    counters.failures += 1
                    counters.observe(502, (time.perf_counter() - started) * 1000.0)
                    return False
                if not piece:
                    if rechunk:
                        client.write(b"0\r\n\r\n")
                    break
                client.write(b"%x\r\n%b\r\n" % (len(piece), piece) if rechunk else piece)
                if client.write_paused:
                    try:
                        async with asyncio.timeout(WRITE_TIMEOUT):
                            await client.drain()
                    except (OSError, TimeoutError):
                        close_conn(conn)
                        raise ClientGone("client stopped reading") from None
        except asyncio.CancelledError:
            close_conn(conn)  # the client left, or the router stops: never pooled nor left open
            raise
        if resp.keep_alive and not cut and proxy.pools.get((pool.host, pool.port)) is pool:
            pool.give_back(conn)  # (a pool dropped by a reconfigure meanwhile gets nothing back)
        else:
            close_conn(conn)
        latency_ms = (time.perf_counter() - started) * 1000.0
        counters.observe(resp.status, latency_ms)
        # (a preview request the shadow itself answered is not copied to it again)
        if capture is not None and routing.mirror_target is not None \
                and slot != routing.mirror_target.slot:
            target = routing.mirror_target
            proxy.mirror.offer(
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
                    keep_headers=routing.mirror_keep_headers,
                )
            )
        return keep

    def mirror_capture(self, req: RequestHead, routing: Routing, body_size: int) -> Capture | None:
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
