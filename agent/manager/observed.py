"""The observed states the agent reports, one per service, written without holding the loop.

Theory of operation: after each pass over a service, ``observe`` builds its ``ObservedState``
(the reconciler's ``assess``, each slot, the applied weights, the router's counters) and queues it
only if it changed, ``OBSERVE_EVERY`` seconds passed since the last one, or the bus reconnected
since (the observed bucket is kept in the servers' memory: a restarted server has none). What is
queued goes out only once ``release`` is called, which the reconcile loop does after it has saved
the agent's state file: a state the coordinator acts on (a generation failed, say) is never one
that an agent killed a moment later forgets on restart. ``run`` writes the newest released state
of each service to the observed bucket, each write bounded by ``BUS_TIMEOUT``: a slow or failing
bus never holds the reconcile loop, and a failed write is written again on the next pass (the
failure is logged once until a write succeeds). Before the manager attaches the bus (the agent
still waits for NATS), states are queued as ever, and ``run`` is not running yet: the newest
released state of each service goes out once it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
from msgspec import UNSET

from agent.manager.service import (
    BUS_TIMEOUT,
    OBSERVE_EVERY,
    STATS_EVERY,
    NodeConfig,
    Service,
    Services,
)
from agent.reconcile import assess
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import encode
from protocol.errors import BusError
from protocol.messages import (
    ObservedState,
    SlotStatus,
)

log = logging.getLogger("fleetwave.agent.services")


# A report of counters alone goes out once the pace's interval is within this of having passed:
# reads come every STATS_EVERY, a little early or late, and one that came a moment before the
# interval was up would otherwise wait a whole read more.
READ_SLACK = STATS_EVERY / 2


def report_gaps(paced: float) -> tuple[float, float]:
    """The least time between two reports of a service when the leader paces heartbeats every
    ``paced`` seconds (``messages.Pace.interval``: the fleet's size over the coordinator's
    heartbeat rate; 0 if none heard): when only its router's counters are new, and when nothing
    is. Each is its usual figure (every read; ``OBSERVE_EVERY``) unless the pace is longer."""
    gap = max(0.0, paced)
    return gap, max(OBSERVE_EVERY, gap)


def _without_counters(obs: ObservedState) -> ObservedState:
    """``obs`` without what changes at every read of a busy router: its traffic counters, the
    read's time, the connections held. What is left (slots, weights, phase, the router's
    epoch, its drain phase) is news to report at once."""
    r = obs.router
    if r is None:
        return obs
    return msgspec.structs.replace(obs, router=msgspec.structs.replace(
        r, slots={}, mirror=None, cohort=UNSET, time=0.0, connections=UNSET))


class ObservedWriter:
    """Reports each service's observed state to the fleet's observed bucket."""

    def __init__(
        self, bus: Bus | None, config: NodeConfig, services: Services, *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus  # None until the manager attaches it: states are queued meanwhile
        self.fleet = config.fleet
        self.node = config.node
        self.services = services
        self.clock = clock
        self._dirty = asyncio.Event()  # a state is pending and released
        self._queued = False  # a state is pending, not yet released
        self._bus_failing = False  # the last write failed (logged once until one succeeds)
        self.paced = 0.0  # the interval of the leader's last pace (0: none heard yet)
        # The services whose running rollouts read their routers' counters (the pace says).
        self.reading: frozenset[str] = frozenset()

    def observe(self, svc: Service) -> None:
        """Queue ``svc``'s observed state if it changed or ``OBSERVE_EVERY`` passed."""
        view = svc.view(self.clock())
        a = assess(svc.desired, view)
        svc.observed_generation = a.observed_generation
        slots = {
            s: SlotStatus(
                slot=s,
                status=v.status,
                version=v.version,
                digest=v.digest,
                pid=svc.runners[s].pid if s in svc.runners else None,
                port=svc.runners[s].spec.port if s in svc.runners else None,
                restarts=v.restarts,
                reason=v.reason,
                since=v.since,
                last_exit=v.last_exit,
            )
            for s, v in view.slots.items()
        }
        if svc.desired is not None:
            for s, ref in svc.desired.slots.items():
                if s not in slots and ref.digest in svc.fetching:
                    slots[s] = SlotStatus(
                        slot=s, status="fetching", version=ref.version, digest=ref.digest
                    )
        obs = ObservedState(
            node=self.node,
            service=svc.name,
            generation=svc.desired.generation if svc.desired else 0,
            observed_generation=a.observed_generation,
            slots=slots,
            weights=dict(svc.applied_weights),
            router=svc.router_stats,
            phase=a.phase,
            error=a.error or (f"router: {svc.router_error}" if svc.router_error else ""),
        )
        body = encode(obs)
        state = encode(_without_counters(obs))
        now = self.clock()
        # After a reconnect, at once: the server may have restarted and kept no observed bucket
        # (it lives in memory, ``protocol.bus._storage``), which the coordinator makes again.
        # Before the bus is attached, an epoch of its own: the first pass after reports anew.
        epoch = self.bus.reconnects if self.bus is not None else -1
        if epoch == svc.observed_epoch and state == svc.last_observed_state:
            counters, unchanged = report_gaps(self.paced)
            since = now - svc.last_observed_at
            if body == svc.last_observed:
                if since < unchanged:
                    return
            elif since < counters - READ_SLACK and not (
                    svc.name in self.reading or svc.judged(now)):
                return  # new counters only, in a large fleet: they go out with the next report
        svc.observed_epoch = epoch
        obs.time = now
        svc.last_observed, svc.last_observed_at = body, now
        svc.last_observed_state = state
        svc.pending_observed = obs
        self._queued = True

    def release(self) -> None:
        """Let the states queued so far go out (call it once they are saved locally)."""
        if self._queued:
            self._queued = False
            self._dirty.set()

    async def run(self) -> None:
        """Write the newest observed state of each service; a slow bus never holds the loop.
        The bus is attached."""
        bus = self.bus
        assert bus is not None, "run() before the bus is attached"
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            for svc in list(self.services.values()):
                obs, svc.pending_observed = svc.pending_observed, None
                if obs is None:
                    continue
                try:
                    async with asyncio.timeout(BUS_TIMEOUT):
                        await bus.kv_put(
                            subjects.observed_bucket(self.fleet),
                            subjects.node_service_key(self.node, svc.name),
                            encode(obs),
                        )
                except (BusError, TimeoutError) as exc:
                    if not self._bus_failing:
                        log.warning("cannot write observed state of %s: %s", svc.name,
                                    str(exc) or "timed out")
                    self._bus_failing = True
                    svc.last_observed = svc.last_observed_state = b""  # again next pass
                    continue
                self._bus_failing = False
