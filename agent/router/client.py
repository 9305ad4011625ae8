"""One client connection of the proxy: a Protocol with a callback fast path and a general path.

Theory of operation. Each client connection is a ``ClientConn`` (a ``Channel``). Its bytes
accumulate in its buffer; when a whole request head is there it is parsed (garbage gets
400/431/501/505 and the connection closes) and, the routing in force *now* having picked a slot
(so a weight switch takes effect on the next request of a keep-alive connection), it takes one of
two paths:

- **fast path** (no request body, an idle pooled upstream connection, not picked for mirroring):
  the head is written upstream and everything else happens in callbacks (``on_data``,
  ``on_closed``: the ``ClientConn`` is the upstream channel's sink): the response head is parsed
  as it arrives, rewritten, and sent to the client with whatever body came with it in one write;
  the rest of a Content-Length body is relayed piece by piece, reading the upstream paused while
  the client's write buffer is above ``HIGH_WATER``. A small response (a body up to
  ``SINGLE_WRITE``) whose body comes in later segments than its head (an upstream that writes
  them separately, as Python's http.server does) is held until complete and sent in one write:
  one send and one client wake-up per response instead of two or more. No task, no future, no
  timer per request: one sweeper per proxy enforces the deadlines (``expire``; so they are
  ``proxy.SWEEP_EVERY`` coarse).
- **general path** (everything else): one task for this request runs ``exchange``, the
  await-based exchange with bodies, retries and mirroring described there. The fast path hands
  over to it when the pooled connection turns out stale before any response byte (the retry), or
  when the response is not one it relays (1xx, chunked, until-close).

Either way, once the response is complete the next request already buffered (pipelined) is
served, in order: at once, or once the client has read enough of its answers that its write
buffer is back under ``HIGH_WATER`` (else a client that never reads would have the router hold
every answer). Every exchange is counted on its slot (``ROUTER_SLOT`` for the 503 the router
answers when no slot may serve).

Limits at the edge: at most ``max_connections`` client connections at once (one more is handed
to the proxy's ``refuse``: 503 and closed at once); a request head must be whole within
``IDLE_TIMEOUT`` of the connection opening or of the previous response (bytes arriving do not
extend it); a request body within the config's ``body_timeout`` of its head (see ``exchange``).

The connection sees its proxy through ``Owner`` (below), so that this module does not import
``proxy``, which builds the connections. It is one module (about 500 lines) on purpose: the fast
path is one state machine over one connection's fields (``phase``, ``deadline``, ``held``, ...),
driven from five callbacks, and it reads correctly only as a whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from agent.router.channel import Channel
from agent.router.errors import ClientGone, HttpError
from agent.router.exchange import (
    IDEMPOTENT,
    IDLE_TIMEOUT,
    READ_TIMEOUT,
    RESPONSE_TIMEOUT,
    WRITE_TIMEOUT,
    Exchange,
)
from agent.router.health import is_ready_probe, ready_response
from agent.router.http11 import (
    MAX_HEAD,
    RequestHead,
    bare_line_end,
    client_response_head,
    error_response,
    parse_request,
    parse_response,
    upstream_request_head,
)
from agent.router.ports import ProxyState
from agent.router.stats import ROUTER_SLOT, SlotCounters
from agent.router.upstream import Pool

log = logging.getLogger("agent.router.proxy")  # one logger for the proxy and its connections

HIGH_WATER = 256 * 1024  # client write buffer above which the upstream is paused
# After an answer that leaves the client's request unread (an upstream's early 413, a malformed
# request), how long the router goes on reading and dropping what the client sends, once the
# answer is flushed (nginx's lingering_timeout; see ``ClientConn.close``).
LINGER = 5.0
PIPELINE_LIMIT = 2 * MAX_HEAD  # buffered bytes of later requests before we stop reading a client
SINGLE_WRITE = 64 * 1024  # bodies up to this go out joined to the head in one write
_HEAD_END = b"\r\n\r\n"

# What an in-flight fast exchange is waiting for, for the sweeper.
_IDLE, _HEAD, _BODY = 0, 1, 2


class Owner(ProxyState, Protocol):
    """The proxy as its client connections use it (``proxy.Proxy`` is one)."""

    clients: set[ClientConn]  # the open client connections
    max_connections: int  # more than this many are refused
    exchange: Exchange  # the general path

    def refuse(self, client: ClientConn) -> None: ...
    def unready(self) -> str: ...  # why the readiness path says 503; "" when ready


class ClientConn(Channel):
    """One client connection: parses requests from its buffer and serves them in order."""

    __slots__ = (
        "_loop",
        "body_left",
        "busy",
        "deadline",
        "fresh",
        "held",
        "ip",
        "keep",
        "lingering",
        "opened",
        "phase",
        "pool",
        "proxy",
        "req",
        "resp_status",
        "reusable",
        "scanned",
        "slot",
        "started",
        "task",
        "up",
    )

    def __init__(self, proxy: Owner) -> None:
        super().__init__(PIPELINE_LIMIT)
        self.proxy = proxy
        self._loop = asyncio.get_running_loop()
        self.ip = "unknown"
        self.busy = False  # a request is in flight (the drain waits for it)
        self.task: asyncio.Task[None] | None = None  # the general path serving the request
        self.deadline = 0.0
        self.opened = 0.0  # when the connection was accepted (loop time)
        self.fresh = True  # nothing received yet: its first request may be on its way
        # The fast exchange in flight, if any:
        self.phase = _IDLE
        self.up: Channel | None = None
        self.req: RequestHead | None = None
        self.slot = ""
        self.pool: Pool | None = None
        self.started = 0.0
        self.resp_status = 0
        self.body_left = 0
        self.held: list[bytes] | None = None  # a small response held until its body is whole
        self.keep = False  # the client connection stays open after this response
        self.reusable = False  # the upstream connection may go back to its pool
        self.scanned = 0  # bytes of an incomplete head already looked at for a bare CR or LF
        self.lingering = False  # answered and half-closed: reading and dropping until the client
        # closes (``close(linger=True)``)

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        if len(self.proxy.clients) >= self.proxy.max_connections:
            self.proxy.refuse(self)
            return
        peer = self.transport.get_extra_info("peername")
        self.ip = peer[0] if isinstance(peer, tuple) else "unknown"
        self.opened = self._loop.time()
        self.deadline = self.opened + IDLE_TIMEOUT
        self.proxy.clients.add(self)

    def data_received(self, data: bytes) -> None:
        self.fresh = False
        if self.lingering:
            return  # the rest of a request already answered: dropped
        if self.task is not None:  # the general path reads through awaits
            super().data_received(data)
            return
        if (
            not self.busy
            and not self.write_paused
            and not self.buf
            and data.endswith(_HEAD_END)
            and data.find(_HEAD_END) == len(data) - 4
        ):
            # The common case: the segment is exactly one request head. Serve it uncopied.
            self._serve_head(data)
            if not self.busy:
                self.next_request()  # (the router answered it itself: go on as usual)
            return
        self.buf += data
        if self.busy or self.write_paused:  # a later (pipelined) request waits its turn
            if len(self.buf) > PIPELINE_LIMIT and not self._read_paused:
                assert self.transport is not None
                self._read_paused = True
                self.transport.pause_reading()
            return
        self.next_request()

    def eof_received(self) -> bool:
        self.eof = True
        if self.lingering:
            super().close()  # the client has closed its side, having read the answer
            return True
        if self.task is not None:
            self._wake()
        elif not self.busy:
            self.next_request()  # answers a partial head with 400, or just closes
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.proxy.clients.discard(self)
        self.abort_exchange()
        if self.task is not None:  # nobody to answer: free the upstream (and the cap) now
            self.task.cancel()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.deadline = self._loop.time() + WRITE_TIMEOUT
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.lingering:  # its answer flushed at last: LINGER from now
            self.deadline = self._loop.time() + LINGER
            return
        if self.up is not None and self.up.transport is not None:
            self.deadline = self._loop.time() + READ_TIMEOUT
            self.up.transport.resume_reading()
        elif not self.busy and self.task is None:
            # The requests that waited for the client to read its answers are served now (on
            # the next turn of the loop: not from inside the transport's write callback).
            self.deadline = self._loop.time() + IDLE_TIMEOUT
            self._loop.call_soon(self.next_request)

    # -- requests ---------------------------------------------------------------------------------

    def next_request(self) -> None:
        """Serve the requests whose heads are buffered, until one needs to wait for something.

        None starts while the client's write buffer is over ``HIGH_WATER``: a client that does
        not read its answers would have them all piled up here (``resume_writing`` goes on)."""
        while (not self.busy and self.task is None and not self.closed and not self.write_paused
               and not self.lingering):
            buf = self.buf
            i = buf.find(_HEAD_END)
            if i < 0 or i + 4 > MAX_HEAD:
                if i >= 0 or len(buf) > MAX_HEAD:
                    self._answer_and_close(error_response(431, "request head too large"))
                elif bare_line_end(buf, self.scanned):
                    # The blank CRLF line may never come: answer now, not at the idle deadline.
                    self._answer_and_close(
                        error_response(400, "bare CR or LF in the request head (use CRLF)")
                    )
                elif self.eof:
                    if buf.strip():
                        self._answer_and_close(error_response(400, "incomplete request head"))
                    else:
                        self.close()
                elif self._read_paused and self.transport is not None:
                    self._read_paused = False
                    self.transport.resume_reading()
                self.scanned = max(0, len(buf) - 1)  # (a final CR is looked at again)
                return
            head = bytes(buf[: i + 4])
            del buf[: i + 4]
            self._serve_head(head)

    def _serve_head(self, head: bytes) -> None:
        self.busy = True
        self.scanned = 0  # the next head starts after this one's body
        self.started = time.perf_counter()
        if len(head) > MAX_HEAD:
            self._answer_and_close(error_response(431, "request head too large"))
            return
        try:
            req = parse_request(head)
        except HttpError as exc:
            self._answer_and_close(error_response(exc.status, str(exc)))
            return
        self._dispatch(req)

    def _dispatch(self, req: RequestHead) -> None:
        proxy = self.proxy
        if is_ready_probe(req):  # the load balancer's question, answered here (agent.router.health)
            keep = req.keep_alive and not proxy.closing
            self.write(ready_response(proxy.unready(), head_only=req.method == "HEAD",
                                      keep_alive=keep))
            self._next(keep)
            return
        routing = proxy.routing
        if req.has_body or req.expect_continue or routing is None:
            self._general(req)
            return
        capture = proxy.exchange.mirror_capture(req, routing, 0)
        if capture is not None:
            self._general(req, capture=capture)
            return
        if routing.cohort is None:
            slot = routing.pick()
        else:
            slot, cookie = routing.pick_counted(req, self.ip, proxy.cohort_counters)
            if cookie:  # the answer carries an assigned cookie: the general path adds it
                self._general(req, first=slot, set_cookie=cookie)
                return
        if slot is None:
            keep = req.keep_alive and not proxy.closing
            message = f"no healthy upstream for {routing.config.service} ({routing.reasons})"
            self.write(error_response(503, message, keep_alive=keep))
            self._done(proxy.counters(ROUTER_SLOT), 503, keep)
            return
        up = routing.upstreams[slot]
        pool = proxy.pool_for(up.host, up.port)
        conn = pool.take_idle()
        if conn is None:
            self._general(req, first=slot)
            return
        # The fast path: attempt 1 of the plan, an idle pooled connection.
        self.req, self.slot, self.pool, self.up = req, slot, pool, conn
        self.phase = _HEAD
        self.deadline = self._loop.time() + RESPONSE_TIMEOUT
        conn.sink = self
        trusted = req.forwarded and routing.trusts(self.ip)
        conn.write(upstream_request_head(req, self.ip, trusted_proxy=trusted))

    def _general(self, req: RequestHead, **kwargs: object) -> None:
        """Serve ``req`` on the general path, in a task this connection owns."""
        self.task = self._loop.create_task(self._run_general(req, kwargs))

    async def _run_general(self, req: RequestHead, kwargs: dict[str, object]) -> None:
        keep = False
        try:
            keep = await self.proxy.exchange.serve(self, req, **kwargs)  # type: ignore[arg-type]
        except (ClientGone, ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # the drain on shutdown cancelled us: the connection just closes
        except Exception:  # a bug must cost one connection, never the router
            log.exception("request from %s failed", self.ip)
        finally:
            self.task = None
        if keep and not self.closed:
            self.busy = False
            self.deadline = self._loop.time() + IDLE_TIMEOUT
            self.next_request()
        else:
            # A request with a body may have been answered before its end (an upstream's
            # early 413, the router's 408 or 400): the client may still be sending it.
            self.close(linger=req.has_body)

    def _answer_and_close(self, data: bytes) -> None:
        """Answer a request the router refuses (a malformed head) and close, lingering: its
        client may be sending a body after it."""
        self.write(data)
        self.close(linger=True)

    def _done(self, counters: SlotCounters, status: int, keep: bool) -> None:
        """Count the request just answered, then serve the next one or close."""
        counters.observe(status, (time.perf_counter() - self.started) * 1000.0)
        self._next(keep)

    def _next(self, keep: bool) -> None:
        """After a response: wait for the next request on this connection, or close it."""
        if keep and not self.closed:
            self.busy = False
            self.deadline = self._loop.time() + IDLE_TIMEOUT
            if self.write_paused:
                self.deadline = self._loop.time() + WRITE_TIMEOUT
        else:
            self.close()

    # -- the fast exchange: the upstream channel's sink --------------------------------------------

    def on_data(self, channel: Channel, data: bytes) -> None:
        """Response bytes from the upstream of the fast exchange in flight."""
        if channel is not self.up:
            channel.abort()  # a connection we gave up on: nothing it says matters
            return
        if self.phase == _HEAD:
            if channel.buf:  # the head came in pieces
                channel.buf += data
                data = bytes(channel.buf)
                channel.buf.clear()
            i = data.find(_HEAD_END)
            if i < 0:
                channel.buf += data
                if len(data) > MAX_HEAD:
                    self._fast_fail(502, f"slot {self.slot}: upstream response head too large")
                return
            if not self._start_response(channel, data, i + 4):
                return
        elif self.held is not None:
            self._hold(data)
        else:
            self._relay(data, 0)
        if self.body_left == 0 and self.phase == _BODY:
            self._fast_done()
        else:
            self.deadline = self._loop.time() + READ_TIMEOUT

    def _start_response(self, channel: Channel, data: bytes, end: int) -> bool:
        """Parse the response head in ``data[:end]`` and send it on; False if handed over."""
        req = self.req
        assert req is not None
        try:
            resp = parse_response(data[:end], req.method)
        except HttpError as exc:
            self._fast_fail(502, f"slot {self.slot}: {exc}")
            return False
        if resp.status < 200 or resp.body not in ("length", "none"):
            # Interim responses, chunked and until-close bodies: the general path relays those.
            channel.buf += data
            self._handover(resp_pending=True)
            return False
        self.phase = _BODY
        self.resp_status = resp.status
        self.reusable = resp.keep_alive
        self.keep = req.keep_alive and not self.proxy.closing
        head = client_response_head(resp, keep_alive=self.keep, http10=req.version == b"HTTP/1.0")
        self.body_left = left = resp.content_length if resp.body == "length" else 0
        rest = len(data) - end
        if rest < left <= SINGLE_WRITE:
            # The rest of a small body is on its way: send the response whole once it is here.
            self.held = [head, data[end:]] if rest else [head]
            self.body_left = left - rest
        elif rest == 0:
            self.write(head)
        elif rest <= SINGLE_WRITE:
            take = min(rest, self.body_left)
            self.write(head + data[end : end + take])
            self.body_left -= take
            if rest > take:
                self.reusable = False  # bytes past the body: the connection is out of step
        else:
            self.write(head)
            self._relay(data, end)
        return True

    def _hold(self, data: bytes) -> None:
        """Add a piece of a held response's body; send the response once it is complete."""
        held = self.held
        assert held is not None
        left = self.body_left
        if len(data) < left:
            held.append(data)
            self.body_left = left - len(data)
            return
        held.append(data if len(data) == left else data[:left])
        if len(data) > left:
            self.reusable = False  # bytes past the body: the connection is out of step
        self.body_left = 0
        self.held = None
        self.write(b"".join(held))

    def _relay(self, data: bytes, start: int) -> None:
        left = self.body_left
        size = len(data) - start
        if size <= left and start == 0:
            self.write(data)
            self.body_left = left - size
            return
        take = min(size, left)
        if take:
            assert self.transport is not None
            if not self.closed:
                self.transport.write(memoryview(data)[start : start + take])
        self.body_left = left - take
        if size > take:
            self.reusable = False

    def _fast_done(self) -> None:
        up, pool = self.up, self.pool
        assert up is not None and pool is not None
        self._detach()
        proxy = self.proxy
        if self.reusable and proxy.pools.get((pool.host, pool.port)) is pool:
            pool.give_back(up)  # (a pool dropped by a reconfigure meanwhile gets nothing back)
        else:
            up.close()
        self._done(proxy.counters(self.slot), self.resp_status, self.keep)
        self.next_request()

    def _detach(self) -> Channel | None:
        up = self.up
        if up is not None:
            up.sink = None
            if up.transport is not None and self.write_paused:
                up.transport.resume_reading()
        self.up = None
        self.phase = _IDLE
        self.held = None
        return up

    def on_closed(self, channel: Channel) -> None:
        """The upstream of the fast exchange closed (FIN or reset)."""
        if channel is not self.up:
            return
        counters = self.proxy.counters(self.slot)
        counters.failures += 1
        req = self.req
        if self.phase == _HEAD and not channel.buf and req is not None \
                and req.method in IDEMPOTENT:
            # A stale keep-alive the upstream closed, before any response byte: retry (only an
            # idempotent request: one the upstream took and died on must not be sent twice).
            self._handover(resp_pending=False)
        elif self.phase == _HEAD:
            when = "mid-head" if channel.buf else "before answering"
            self._fast_fail(502, f"slot {self.slot} closed the connection {when}", count=False)
        else:
            # The head is with the client (or is sent now, with what came of the body): all we
            # can do is cut the connection.
            if self.held is not None:
                self.write(b"".join(self.held))
            self._detach()
            channel.abort()
            counters.observe(502, (time.perf_counter() - self.started) * 1000.0)
            self.close()

    def _handover(self, *, resp_pending: bool) -> None:
        """Let the general path finish this request (a retry, or a response it relays)."""
        req, slot, pool = self.req, self.slot, self.pool
        assert req is not None and pool is not None
        up = self._detach()
        assert up is not None
        if resp_pending:
            self._general(req, first=slot, pending=(pool, up))
        else:
            up.abort()
            self._general(req, first=slot, skip_idle=True)

    def _fast_fail(self, status: int, message: str, *, count: bool = True) -> None:
        """Answer an error the router produced itself and close both connections."""
        up = self._detach()
        if up is not None:
            up.abort()
        counters = self.proxy.counters(self.slot)
        if count:
            counters.failures += 1
        self.write(error_response(status, message))
        counters.observe(status, (time.perf_counter() - self.started) * 1000.0)
        self.close()

    def close(self, *, linger: bool = False) -> None:
        """Close once what is queued for the client is sent: within ``WRITE_TIMEOUT``, else the
        sweeper aborts it (``expire``). A closing transport flushes with no bound of its own: a
        client that reads nothing held its connection, and its place under
        ``max_connections``, for ever (a few thousand such clients lock a service out).

        ``linger``: the client may still be sending a request this answer ends (its body's
        rest). Closing a socket with bytes unread makes the kernel reset the connection, and a
        client that sends its whole body before it reads (most do) then fails its send and
        never reads the answer. So, as nginx's lingering close: the answer, then a FIN
        (``write_eof``), then what the client sends is read and dropped until it closes its
        side, for at most ``LINGER`` seconds once the answer is flushed (``expire``). Not for
        a client that has closed its side, nor one over the cap (``Owner.refuse``: it holds no
        place to linger in)."""
        if self.lingering:
            return
        transport = self.transport
        if (linger and not self.eof and not self.closed and transport is not None
                and not transport.is_closing() and transport.can_write_eof()
                and self in self.proxy.clients):
            self.lingering = True
            self.buf.clear()
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            transport.write_eof()
            self.deadline = self._loop.time() + (WRITE_TIMEOUT if self.write_paused else LINGER)
            return
        super().close()
        self.deadline = self._loop.time() + WRITE_TIMEOUT

    def expire(self) -> None:
        """A deadline passed: an idle connection closes, a stuck exchange fails, a connection
        closed with answers its client never read is dropped, a lingering one too once its
        answer is flushed and ``LINGER`` is over."""
        if self.lingering:
            self.abort()
            return
        if self.transport is not None and self.transport.is_closing():
            self.abort()
            return
        if self.phase == _HEAD:
            self._fast_fail(504, f"slot {self.slot} did not answer", count=False)
        elif self.phase == _BODY:
            up = self._detach()
            if up is not None:
                up.abort()
            if not self.write_paused:  # the upstream stalled mid-body (not the client)
                counters = self.proxy.counters(self.slot)
                counters.failures += 1
                counters.observe(502, (time.perf_counter() - self.started) * 1000.0)
            self.abort()
        elif self.write_paused:
            self.abort()  # a client that stopped reading its answers would never let us flush
        else:
            self.close()

    def abort_exchange(self) -> None:
        """The client is gone: drop the upstream connection of a fast exchange mid-way."""
        up = self._detach()
        if up is not None:
            up.abort()
