"""What the general path (``exchange``) needs of the proxy and of a client connection.

``proxy`` owns the client connections and hands requests to an ``Exchange``; the exchange uses
the proxy's routing, pools, counters and mirror, and writes to the client. Both sides meet here,
in two small Protocols, so that neither module imports the other: ``proxy`` imports ``exchange``,
and ``exchange`` imports only this module. ``Proxy`` and ``ClientConn`` satisfy them
structurally (mypy checks it where the proxy builds its ``Exchange``).
"""

from __future__ import annotations

from typing import Protocol

from agent.router.channel import Readable
from agent.router.mirror import Mirror
from agent.router.routing import Routing
from agent.router.stats import CohortCounters, SlotCounters
from agent.router.upstream import Pool


class Client(Readable, Protocol):
    """A client connection as the exchange uses it: a stream to read the body from, a sink to
    write the response to (``write_paused`` while the transport's buffer is full)."""

    ip: str  # the peer's address, for X-Forwarded-For
    started: float  # perf_counter() when the request's head arrived
    write_paused: bool

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def reset(self) -> None: ...  # drop the connection now with a reset (RST)


class ProxyState(Protocol):
    """The proxy as the exchange uses it: what is in force now, and where to count."""

    routing: Routing | None  # the routing in force now (None: not configured yet)
    pools: dict[tuple[str, int], Pool]  # the live upstreams' idle connections
    mirror: Mirror
    closing: bool  # draining: answer the request in flight, then close
    body_timeout: float  # a whole request body within this of its head
    cohort_counters: CohortCounters | None  # set while a cohort rule is in force

    def pool_for(self, host: str, port: int) -> Pool: ...

    def counters(self, slot: str) -> SlotCounters: ...
