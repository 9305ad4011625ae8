"""Desired states: the watch, the periodic re-read, verification and the replay floor.

Theory of operation: ``watch`` watches ``<node>.*`` in the fleet's desired bucket (the watch
survives reconnects; before the coordinator creates the bucket it retries with backoff), and
``reread`` re-reads it every ``REREAD`` seconds as a safety net (less often in a fleet so large
that its nodes' re-reads would load the broker: ``reread_every``, from the leader's pace, spread
by a random share so that a fleet started together does not re-read together). After a reconnect
(the broker restarted) the watch starts again within ``restart_spread`` of the fleet's size, not
at once: a large fleet's consumers made all at once are a load the server does not come out of
(``tests/perf/bench_restart.py``). Each value goes to
``offer``: a signed envelope is accepted only if it verifies against the trusted keys, names this
fleet, node and service, and has a generation above the service's *floor* (the newest generation
this node ever accepted, kept even when the remembered envelope no longer verifies, so that an old
state cannot be replayed), or is a re-signature of the state it runs (same generation and payload,
another trusted key: a rotated coordinator key taking over; nothing moves). Anything else is
refused with one ``agent.refused`` event saying why (once per refused value) and changes nothing.
An accepted state wakes the reconcile loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from agent.manager.events import NodeEvents
from agent.manager.service import (
    BUS_TIMEOUT,
    CROWD_SPREAD,
    FIRST_PACE_WAIT,
    MAX_REREAD,
    MAX_WATCH_HEARTBEAT,
    REREAD,
    REREAD_RATE,
    WATCH_HEARTBEAT_RATE,
    NodeConfig,
    Service,
    Services,
)
from protocol import subjects
from protocol.bus import WATCH_HEARTBEAT, Bus, restart_spread, retry_delay
from protocol.codec import decode
from protocol.errors import BusError, ProtocolError
from protocol.messages import SignedEnvelope
from protocol.signing import resigns, verify

log = logging.getLogger("fleetwave.agent.services")


def size_step(nodes: int) -> int:
    """``nodes`` rounded up to 1,000 times a power of two: the fleet sizes the re-reads and the
    watch's heartbeat follow, so that they move when the fleet doubles, not with every pace of
    a cold start (a new log line and a renewed watch each time)."""
    step = 1000
    while step < nodes:
        step *= 2
    return step


def reread_every(nodes: int) -> float:
    """The mean time between two full re-reads of one node's desired states in a fleet of
    ``nodes`` (as the leader's pace says; 0: not heard): ``REREAD``, or as long as keeps the
    fleet (``size_step``) at ``REREAD_RATE`` re-reads a second, at most ``MAX_REREAD``."""
    return min(MAX_REREAD, max(REREAD, size_step(nodes) / REREAD_RATE))


def watch_heartbeat(nodes: int) -> float:
    """The idle heartbeat a node's watch asks for in a fleet of ``nodes``: ``WATCH_HEARTBEAT``,
    or as long as keeps the fleet's at ``WATCH_HEARTBEAT_RATE`` a second, at most
    ``MAX_WATCH_HEARTBEAT`` (the fleet's size by ``size_step``)."""
    return min(MAX_WATCH_HEARTBEAT,
               max(WATCH_HEARTBEAT, size_step(nodes) / WATCH_HEARTBEAT_RATE))


class DesiredWatch:
    """Accepts this node's desired states into ``services`` and wakes the reconcile loop."""

    def __init__(
        self, bus: Bus | None, config: NodeConfig, services: Services, events: NodeEvents,
        wake: asyncio.Event,
    ) -> None:
        self.bus = bus  # None until the manager attaches it: ``watch`` and ``reread`` need it
        self.fleet = config.fleet
        self.node = config.node
        self.trusted_keys = config.trusted_keys
        self.services = services
        self.events = events
        self.wake = wake
        self.refused = 0  # desired states refused so far
        self.fleet_nodes = 0  # the fleet's size in the leader's last pace (0: none heard yet)
        self.rereads = 0
        self.renewals = 0  # watches renewed for another heartbeat
        self.heartbeat = 0.0  # the idle heartbeat the running watch asked for (0: none yet)
        self._renew = asyncio.Event()
        self._refused_values: dict[str, bytes] = {}
        self._paced = asyncio.Event()  # a pace was heard (``heard``)
        self.burst = False  # the last pace said many agents register at once (``Pace.burst``)

    def heard(self, burst: bool) -> None:
        """The leader's pace came (its fleet's size is ``fleet_nodes`` already), with its word
        on a burst of registrations."""
        self.burst = burst
        self._paced.set()

    async def _before_first_watch(self) -> None:
        """In a fleet remembered large (a restart spread over ``CROWD_SPREAD``), wait up to
        ``FIRST_PACE_WAIT`` for the leader's pace: when it says many agents register at once (a
        fleet-wide restart with the broker up, where no reconnect spreads them), the first
        watch starts within the spread (``Bus.crowded``), not with 20,000 others. A lone
        restart hears no burst and starts at once; without a leader, after the wait. An agent
        whose first connect waited for its server (``Bus.waited``) starts its first watch
        within the spread already: no pace can add to that."""
        bus = self.bus
        assert bus is not None, "a watch before the bus is attached"
        if self._spread() <= CROWD_SPREAD:
            return  # a small fleet: every one is remembered as 1,000 nodes (``size_step``)
        if bus.waited:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_PACE_WAIT):
                await self._paced.wait()
        if self.burst:
            bus.crowded = True
            log.info("many of the fleet's agents are registering at once (the leader's pace): "
                     "this one's watch of desired states starts within %.0fs (%d nodes)",
                     self._spread(), self.fleet_nodes)

    async def watch(self) -> None:
        """Offer every value of the watch, for ever; wait for the bucket while there is none."""
        bus = self.bus
        assert bus is not None, "watch() before the bus is attached"
        bucket = subjects.desired_bucket(self.fleet)
        attempt = 0
        await self._before_first_watch()
        while True:
            try:
                async for entry in bus.watch(bucket, subjects.node_keys(self.node),
                                             heartbeat=self._heartbeat, renew=self._renew,
                                             spread=self._spread):
                    attempt = 0
                    if entry is None or entry.value is None:
                        continue  # end of the initial contents, or a deletion: nothing to accept
                    await self.offer(entry.key, entry.value)
            except BusError as exc:
                # Typically: no coordinator has created the fleet's buckets yet. Wait for it,
                # the fleet's agents at jittered moments (``retry_delay``), not in step.
                if attempt == 0:
                    log.warning("cannot watch desired states yet (%s); retrying", exc)
                attempt += 1
                await asyncio.sleep(retry_delay(attempt, self._spread()))

    def _heartbeat(self) -> float:
        """What a new watch asks for (``watch_heartbeat``), remembered."""
        self.heartbeat = watch_heartbeat(self.fleet_nodes)
        return self.heartbeat

    def remembered_size(self) -> int:
        """The fleet's size for the state file: rounded up as its paces are (``size_step``), so
        that the file changes when the fleet doubles, not with every node that comes or goes."""
        return size_step(self.fleet_nodes) if self.fleet_nodes > 0 else 0

    def _spread(self) -> float:
        """After a reconnect, the new watch's start within this (``restart_spread``)."""
        return restart_spread(self.fleet_nodes)

    async def reread(self) -> None:
        """Offer every value again every ``reread_every`` seconds on average (each wait drawn
        from half to one and a half of it): the safety net under the watch. When the fleet's
        size calls for another heartbeat than the watch's, the watch is renewed instead (its
        full read is the re-read): spread so, a fleet that hears a new size does not make its
        consumers again all at once."""
        bus = self.bus
        assert bus is not None, "reread() before the bus is attached"
        bucket = subjects.desired_bucket(self.fleet)
        while True:
            await asyncio.sleep(random.uniform(0.5, 1.5) * reread_every(self.fleet_nodes))
            if self.heartbeat and watch_heartbeat(self.fleet_nodes) != self.heartbeat:
                log.info("renewing the watch of desired states: idle heartbeats every %gs "
                         "(%d nodes), not %gs", watch_heartbeat(self.fleet_nodes),
                         self.fleet_nodes, self.heartbeat)
                self.renewals += 1
                self._renew.set()
                continue
            self.rereads += 1
            try:
                async with asyncio.timeout(BUS_TIMEOUT):
                    entries = await bus.kv_entries(bucket, subjects.node_keys(self.node))
            except (BusError, TimeoutError) as exc:
                log.warning("cannot re-read desired states: %s", str(exc) or "timed out")
                continue
            for e in entries:
                if e.value is not None:
                    await self.offer(e.key, e.value)

    async def offer(self, key: str, value: bytes) -> None:
        """Accept a desired state if it is genuine, meant for us and newer; else refuse it."""
        service = key.split(".", 1)[1] if "." in key else key
        if self._refused_values.get(key) == value:
            return  # refused already (the re-read sees it again): one event is enough
        svc = self.services.get(service)
        try:
            env = decode(SignedEnvelope, value)
        except ProtocolError as exc:
            self._refused_values[key] = value
            await self._refuse(service, f"malformed desired state at {key}: {exc}")
            return
        if svc is not None and svc.desired is not None and env == svc.envelope:
            return  # the one we already run (a re-read or a restarted watch): not a replay
        current = 0
        if svc is not None:
            current = max(svc.floor, svc.desired.generation if svc.desired else 0)
        try:
            desired = verify(
                env,
                self.trusted_keys,
                fleet=self.fleet,
                node=self.node,
                service=service,
                min_generation=current,
                min_term=svc.envelope.term if svc is not None and svc.envelope else 0,
                running=svc.envelope if svc is not None else None,
            )
        except ProtocolError as exc:
            self._refused_values[key] = value
            await self._refuse(service, str(exc), generation=env.generation)
            return
        if svc is None:
            svc = self.services[service] = Service(name=service)
        if resigns(env, svc.envelope):
            log.info("accepted desired state of %s generation %d signed again by key %s...: "
                     "the same state", service, desired.generation, env.key[:12])
        else:
            log.info("accepted desired state of %s generation %d", service, desired.generation)
        svc.envelope, svc.desired = env, desired
        self.wake.set()  # also for a re-signature: the pass saves it to the state file

    async def _refuse(self, service: str, reason: str, generation: int = 0) -> None:
        self.refused += 1
        log.warning("refused desired state for %s: %s", service, reason)
        self.events.emit("agent.refused", service, reason, generation=generation)
