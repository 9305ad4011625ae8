"""The reverse proxy: the routing in force, its pools and counters, and its client connections.

Theory of operation. ``Proxy`` is what the router's server configures and listens with: ``apply``
puts a new routing in force for the next request (and forgets the pools of upstreams it no longer
names), ``protocol`` makes a ``ClientConn`` (``client``: the fast path and the hand-over to the
general path, ``exchange``) for each accepted connection, and one sweeper task per proxy enforces
the connections' deadlines every ``SWEEP_EVERY`` seconds. Every exchange is counted on its slot
(``ROUTER_SLOT`` for what the router answers itself).

Limits at the edge: at most ``max_connections`` client connections at once (within the open-file
budget the server sets); one more is answered 503 and closed at once (``refuse``, counted on
``ROUTER_SLOT``, logged at most every ``REFUSAL_LOG_EVERY`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

from agent.edge import BODY_TIMEOUT, MAX_CONNECTIONS
from agent.router.client import ClientConn
from agent.router.exchange import (
    Exchange,
)
from agent.router.http11 import (
    error_response,
)
from agent.router.mirror import Mirror
from agent.router.routing import Routing
from agent.router.stats import ROUTER_SLOT, CohortCounters, MirrorCounters, SlotCounters
from agent.router.upstream import Pool

log = logging.getLogger(__name__)

FRESH_GRACE = 1.0  # seconds a new connection may take to send its first byte when we stop


SWEEP_EVERY = 0.25  # seconds between deadline checks (timeouts are this coarse)
REFUSAL_LOG_EVERY = 10.0  # seconds between log lines about connections over the cap


class Proxy:
    """Serves client connections with the routing in force; counts everything per slot."""

    def __init__(self) -> None:
        self.routing: Routing | None = None
        self.pools: dict[tuple[str, int], Pool] = {}
        self.slots: dict[str, SlotCounters] = {}
        self.mirror_counters = MirrorCounters()
        # The cohort rule's counters, kept per rule salt (a rollout): its users sketch holds
        # that rollout's hashes only.
        self.cohort_counters: CohortCounters | None = None
        self._cohort_salt = ""
        self.mirror = Mirror(self.mirror_counters, self.pool_for)
        self.clients: set[ClientConn] = set()
        self.closing = False
        self.drained = False  # out of service for maintenance: the readiness path says 503
        self.exchange = Exchange(self)
        self._sweeper: asyncio.Task[None] | None = None
        # Client connections the open-file limit allows (the server sets it); the config's cap
        # applies within it.
        self.fd_budget = sys.maxsize
        self.max_connections = MAX_CONNECTIONS
        self.body_timeout = BODY_TIMEOUT
        self.refused = 0  # connections refused over the cap
        self._refusal_logged = -REFUSAL_LOG_EVERY

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
        spec = routing.config.cohort
        if spec is None:
            self.cohort_counters = None
        elif self.cohort_counters is None or spec.salt != self._cohort_salt:
            self.cohort_counters, self._cohort_salt = CohortCounters(), spec.salt
        if self.cohort_counters is not None and self.cohort_counters.share != routing.share:
            # The users sketches tell who is on each side *at this weight*: a new weight (a
            # step, or the first split once the new slot is healthy) starts them afresh; the
            # counts stay cumulative, as every counter is.
            self.cohort_counters.users = {}
            self.cohort_counters.share = routing.share
        self.max_connections = min(routing.config.max_connections, self.fd_budget)
        self.body_timeout = routing.config.body_timeout
        target = routing.mirror_target
        self.mirror.discard_stale(None if target is None else (target.host, target.port))
        for up in routing.upstreams.values():
            self.counters(up.slot)
        live = {(up.host, up.port) for up in routing.upstreams.values()}
        for key in [k for k in self.pools if k not in live]:
            self.pools.pop(key).close()

    def unready(self) -> str:
        """Why the readiness path answers 503 (``agent.router.health``); "" when ready."""
        if self.drained:
            return "drained for maintenance"
        if self.closing:
            return "shutting down"
        routing = self.routing
        if routing is None:
            return "not configured yet"
        if not routing.balancer.names:
            return f"no healthy upstream for {routing.config.service} ({routing.reasons})"
        return ""

    def protocol(self) -> ClientConn:
        """The protocol factory for the listening socket."""
        return ClientConn(self)

    def refuse(self, client: ClientConn) -> None:
        """Answer a connection over the cap with 503 and close it; count it."""
        client.busy = True  # (whatever it sends before the close takes effect is not served)
        client.write(error_response(503, "too many connections; try again later"))
        client.close()
        self.refused += 1
        self.counters(ROUTER_SLOT).observe(503, 0.0)
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_EVERY:
            self._refusal_logged = now
            log.warning(
                "%d client connections open (the cap): refusing more (%d so far)",
                len(self.clients), self.refused,
            )

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the deadline sweeper (the proxy owns it; ``close`` ends it)."""
        self._sweeper = asyncio.create_task(self._sweep(), name="router-sweeper")

    def close_idle(self) -> None:
        """Close every client connection that has no request in flight.

        A connection that has received nothing since it was accepted is not idle for its first
        ``FRESH_GRACE`` seconds: its client has just connected and its request is on its way
        (closing it then would reset a request the router took). Nor is one holding part of a
        request head."""
        now = asyncio.get_running_loop().time()
        for client in list(self.clients):
            if client.busy or client.buf or (client.fresh and now - client.opened < FRESH_GRACE):
                continue
            client.close()

    async def drop_clients(self) -> None:
        """Drop every client connection, cancelling the general-path tasks serving them."""
        tasks = [c.task for c in self.clients if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in list(self.clients):
            client.abort_exchange()
            client.abort()

    async def close(self) -> None:
        """Drop every client connection and stop the sweeper and the general-path tasks."""
        await self.drop_clients()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_EVERY)  # the sweeper's period, not a wait for anything
            now = loop.time()
            for client in [c for c in self.clients if c.task is None and c.deadline < now]:
                try:
                    client.expire()
                except Exception:  # a bug must cost one connection, never the sweeper
                    log.exception("expiring a client connection failed")
                    client.abort()
