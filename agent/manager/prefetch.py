"""Releases fetched when they are pushed, before a deploy needs them.

Theory of operation. The leading coordinator says every release pushed to the fleet's store in a
``ReleaseNotice`` on ``subjects.released`` (``coordinator.runtime.released``). An agent that runs
that service here (a desired state with slots: not a removal, not a service it never had) and has
not got that release fetches it into its cache as a deploy would (``fetch``: the manager's, which
checks the bytes against the digest, unpacks them safely and checks the manifest), so that the
deploy finds it at hand: the download and the unpack leave the first wave's path (on a real
fleet, seconds over a slow link; on the project's machine, a tenth of a second of ten agents'
CPU at once).

When. Each node fetches at a random moment within ``prefetch_spread`` of the notice: the
fleet's downloads of one release at ``PREFETCH_BYTES_RATE`` a second in all (the leader's pace
says the fleet's size), at most ``MAX_PREFETCH_SPREAD`` later; one prefetch at a time per agent,
the newest notice of a service replacing one whose turn has not come. A deploy that comes first
fetches as ever, and one that comes during the prefetch waits for it (the cache's lock per
digest): nothing is downloaded twice.

Trust. The notice is a hint: nothing starts, nothing that runs changes, and a signed desired
state uses the release only when it names the same digest. A notice that does not parse is
ignored (debug); one larger than this agent's bundle limit is left to the deploy (which refuses
it in one line); a failed prefetch is logged and forgotten (the deploy fetches again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from agent.errors import ReleaseError
from agent.manager.service import Service, Services
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.errors import BusError, ProtocolError
from protocol.loop import bounded
from protocol.messages import ReleaseNotice, ReleaseRef

log = logging.getLogger("fleetwave.agent.services")

PREFETCH_BYTES_RATE = 50e6  # bytes a second the fleet's prefetches of one release draw, in all
SMALLEST_FETCH = 64 * 1024  # what a fetch costs the broker however small its bundle
MAX_PREFETCH_SPREAD = 600.0


def prefetch_spread(nodes: int, size: int) -> float:
    """Within how many seconds of a notice a node fetches a release of ``size`` bytes in a fleet
    of ``nodes`` (0: not heard yet, at once): ``PREFETCH_BYTES_RATE`` in all, at most
    ``MAX_PREFETCH_SPREAD``. 10 nodes, a small bundle: 13 ms; 50,000: 66 s."""
    return min(MAX_PREFETCH_SPREAD,
               max(0, nodes) * max(size, SMALLEST_FETCH) / PREFETCH_BYTES_RATE)


Fetch = Callable[[Service, ReleaseRef], Awaitable[None]]


class Prefetcher:
    """Hears the notices (``heard``) and fetches what this node will want (``run``)."""

    def __init__(self, fleet: str, services: Services, fetch: Fetch,
                 fleet_nodes: Callable[[], int], *, max_bytes: int) -> None:
        self.fleet = fleet
        self.services = services
        self.fetch = fetch  # into the cache and the service's releases; raises as a fetch does
        self.fleet_nodes = fleet_nodes
        self.max_bytes = max_bytes
        self.fetched = 0  # releases fetched ahead (tests and metrics)
        self.failed = 0
        self.wanted: dict[str, tuple[ReleaseRef, float]] = {}  # service -> (release, when)
        self._changed = asyncio.Event()

    def heard(self, data: bytes) -> None:
        """A notice: wanted (replacing a service's earlier one not fetched yet) if this node runs
        that service and has not got that release."""
        try:
            ref = decode(ReleaseNotice, data).release
        except ProtocolError as exc:
            log.debug("ignored a release notice: %s", exc)
            return
        svc = self.services.get(ref.service)
        if svc is None or svc.desired is None or not svc.desired.slots:
            return  # not run here (never, or removed)
        if ref.digest in svc.releases:
            return
        if ref.size > self.max_bytes:
            log.info("not fetching %s %s ahead: %d bytes, above this agent's bundle limit",
                     ref.service, ref.version, ref.size)
            return
        when = asyncio.get_running_loop().time() + random.uniform(
            0.0, prefetch_spread(self.fleet_nodes(), ref.size))
        self.wanted[ref.service] = (ref, when)
        self._changed.set()

    async def run(self, bus: Bus) -> None:
        """Listen for notices on ``bus`` and fetch what they ask for, until cancelled. A refused
        subscription (a node whose permissions predate the notices) leaves the node as it was:
        its deploys fetch."""
        async def on_notice(subject: str, data: bytes) -> None:
            self.heard(data)

        try:
            sub = await bus.subscribe(subjects.released(self.fleet), on_notice)
        except BusError as exc:
            log.warning("releases are fetched when deployed, not when pushed: %s", exc)
            return
        try:
            await self.work()
        finally:
            await bus.unsubscribe(sub)

    async def work(self) -> None:
        """Fetch each wanted release when its moment comes, one at a time, for ever."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.wanted:
                await self._changed.wait()
            self._changed.clear()
            if not self.wanted:
                continue
            name, (ref, when) = min(self.wanted.items(), key=lambda kv: kv[1][1])
            if (wait := when - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):  # a newer notice: look again
                    await bounded(self._changed.wait(), wait)
                continue
            del self.wanted[name]
            await self._one(name, ref)

    async def _one(self, name: str, ref: ReleaseRef) -> None:
        svc = self.services.get(name)
        if svc is None or ref.digest in svc.releases:
            return  # gone meanwhile, or a deploy fetched it first
        try:
            await self.fetch(svc, ref)
        except (ReleaseError, ProtocolError, OSError) as exc:
            self.failed += 1
            reason = getattr(exc, "reason", None) or str(exc)
            log.warning("cannot fetch %s %s ahead of its deploy (the deploy fetches it): %s",
                        ref.service, ref.version, reason)
        else:
            self.fetched += 1
            log.info("fetched %s %s ahead of its deploy", ref.service, ref.version)
