"""The rollout runner: the only part of the rollout machinery that awaits.

Theory of operation: for each live rollout the runner holds a *driver*, which is a
``coordinator.core.engine.Rollout`` plus the KV revision of its persisted record and a lock that
serialises its events. Events come from four feeds:

- one watch over the observed bucket (all nodes, all services), dispatched by service to the
  drivers of that service as ``ObservedChanged``; the latest value of every key is cached, so a
  new or resumed rollout is fed the current observed states at once;
- the daemon's node table (``nodes()``), compared on every tick with what each record believes,
  giving ``NodeOffline`` / ``NodeOnline``;
- a ``Tick`` every ``tick`` seconds;
- operator requests from the API (``request``).

Each event goes through ``Rollout.handle`` and its commands are carried out in order, under the
driver's lock, before the next event of that rollout is handled:

    Persist       the record into ``fw-<fleet>-rollouts/<id>``, with the step's events (the
                  outbox), fenced by the leader's term: ``Deposed`` means another coordinator
                  leads, and this runner stops (``run`` returns; log: ERROR)
    WriteDesired  signed envelope (with the term) into ``fw-<fleet>-desired/<node>.<service>``,
                  fenced, skipped when the stored generation is already >= (idempotent)
    EmitEvent     an Event queued for the publisher task (``fw.<fleet>.evt.<kind>``)

A runner lives for one leadership (``coordinator.runtime.lease``): the daemon starts one with the
term's ``Fenced`` writer when it takes the lease and cancels it when it loses it.

Since the record is persisted before the writes it decided, a coordinator killed at any point
resumes correctly (``resync``): every non-terminal record is loaded, its ``intended()`` desired
states re-written where the KV generation is lower, the cached observed states fed again. Ticks
wait until the observed watch has delivered its first full snapshot, so a resumed rollout never
judges a bake without the figures behind it, and offline transitions are held back while the
node table cannot know yet (a restarted coordinator knows no node alive until its first
heartbeat): for the daemon, the table's *not heard yet* window (``Fleet.listen``: from when it
began hearing the fleet, and again after a time it could not); read off views,
``startup_grace`` seconds after ``started`` unless the node beat since.

One rollout at a time per service: ``deploy`` creates the record, then takes the service's lock
(``RolloutStore``: why in that order) before it starts it, and the lock is released once the
rollout is terminal; a never-started record found by the resync starts only with the lock.

Failures: a bus error while carrying out commands is retried with backoff for ``COMMAND_DEADLINE``;
if it persists the driver is dropped and rebuilt from KV by the next resync (exactly the restart
path). Every bus call is bounded by ``OP_TIMEOUT``; every task belongs to ``run``'s TaskGroup.

The runner is composed of one object per concern: the ``RolloutStore`` (records and locks), the
``DesiredWriter``, the ``EventPublisher``, and the ``Executor`` that carries out an engine step
through them; each ``Driver`` holds one live rollout. Here are the feeds, the operator requests
and resuming, in one module (past 400 lines) because all three share the drivers and the rule
that a driver's events are handled one at a time under its lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import msgspec

from coordinator.core.engine import (
    EngineEvent,
    IllegalTransition,
    NodeOffline,
    NodeOnline,
    ObservedChanged,
    Rollout,
    Start,
    Tick,
    new_record,
    worst_case_sizes,
)
from coordinator.core.fleet import matches
from coordinator.core.history import Retention, newest, summarise
from coordinator.core.pages import Layout, fit
from coordinator.core.reconnects import Reconnects
from coordinator.errors import RemoteError, UsageError
from coordinator.runtime.calls import COMMAND_DEADLINE, Retrying, cancelled_meanwhile, stop_all
from coordinator.runtime.cordons import Cordons, read_cordons
from coordinator.runtime.desired import DesiredWriter
from coordinator.runtime.driver import EVENT_BYTES, NODE_OUTBOX_MAX, OUTBOX_MAX, Driver
from coordinator.runtime.executor import Executor, Observe
from coordinator.runtime.lease import Deposed, Fenced
from coordinator.runtime.ports import RunnerBus
from coordinator.runtime.store import RolloutStore
from protocol import subjects
from protocol.bus import RECONNECT_CAP, Entry, restart_spread
from protocol.codec import decode, shared
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.events import EventPublisher
from protocol.history import RolloutSummary, SummarisedRollout
from protocol.messages import (
    TERMINAL_STATES,
    DesiredState,
    Event,
    NodeView,
    ObservedState,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
)

# The rollout events waiting for the events stream. Each is also in its rollout's outbox until
# stored (a dropped one goes out again from there), which holds NODE_OUTBOX_MAX a node: room for
# what 50,000 nodes' rollouts may have waiting, where a 5,000-node wave's start alone decides
# 10,000 (the default 10,000 dropped thousands a wave, a wave.started among them).
EVENT_QUEUE = NODE_OUTBOX_MAX * 50_000 + 10 * OUTBOX_MAX
# How often the observed watch's consumer is checked on the server (``Bus.watch``): every
# rollout waits on what it delivers, so a lost one must not go unnoticed.
WATCH_VERIFY = 5.0
# A node's observed state is a few KB (two slots, the router's counters, cohort sketches): one
# larger is not decoded nor kept. A review's node wrote 8 MB ones under keys of its own, each
# ~90 MiB of the coordinator's memory once decoded.
OBSERVED_MAX = 256 * 1024
COMPLAINED_MOST = 1_000  # sources of malformed input named one by one (observed states here,
# heartbeats and registrations in the daemon); past it, counted

log = logging.getLogger("fleetwave.coordinator.runner")

TICK = 0.2  # how often time passes for the rollouts (and for the daemon's node table)
# > 3 heartbeats of 2 s: time for every live node to beat once. The floor: the daemon gives
# three paced intervals when the fleet is paced longer (``coordinator.core.pace.startup_grace``).
STARTUP_GRACE = 10.0
# A deploy waits this long at most for the nodes it targets that a coordinator just started has
# not heard yet (``Runner._hear_from``): within the handler's 30 s and the CLI's, and one paced
# interval up to 40,000 nodes (nodes / 2,000 a second).
UNHEARD_WAIT = 20.0
UNHEARD_POLL = 0.25  # a look at 50,000 nodes not heard yet: a few ms
RESYNC_INTERVAL = 30.0
OUTBOX_CLEAR_AFTER = 2.0  # a record whose outbox was all acknowledged is rewritten empty then
OUTBOX_RETRY = 30.0  # events still unacknowledged this long after their decision are sent again

# What the node table says of one node: (online now, known: ever heard from, or the table's
# startup grace for it is over). ``Fleet.liveness``.
Liveness = tuple[bool, bool]


class Runner:
    """Drives every live rollout of one fleet; see the module docstring."""

    def __init__(
        self, bus: RunnerBus, *, seed: bytes, fenced: Fenced,
        nodes: Callable[[], Sequence[NodeView]],
        liveness: Callable[[str], Liveness | None] | None = None,
        liveness_changes: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time, tick: float = TICK,
        startup_grace: float = STARTUP_GRACE, command_deadline: float = COMMAND_DEADLINE,
        started: float | None = None, observe: Observe | None = None,
        retention: Retention | None = None,
        batchable: Callable[[str], bool] | None = None,
        unheard: Callable[[Mapping[str, str]], Sequence[str]] | None = None,
        size: Callable[[], int] | None = None,
        reconnects: Reconnects | None = None,
    ) -> None:
        self.bus = bus
        # The fleet's size, for how long its agents' watches take to start again after a
        # reconnect (``excused_until``); else counted off nodes()
        self._size = size or (lambda: len(nodes()))
        self._logged_back: float | None = None  # the reconnect whose excuse was logged
        # Bursts of the agents' registrations (fed by the daemon): their reconnects, where this
        # coordinator's connection stayed up (``excused_until``)
        self.reconnects = reconnects or Reconnects()
        self._logged_burst: float | None = None  # the burst whose excuse was logged
        self.fleet = bus.fleet
        self._nodes = nodes
        self._liveness = liveness  # O(1) per node for the tick; else read off nodes()
        # How often the table's answers changed (``Fleet.changes``): a tick after the startup
        # grace looks at a rollout's nodes again only once it moved since they all agreed
        self._liveness_changes = liveness_changes
        # The nodes a selector matches that are not heard yet (``Fleet.unheard``); else read
        # off nodes()
        self._unheard = unheard or (lambda selector: [
            v.id for v in nodes() if v.unheard and matches(selector, v.labels)])
        self._clock = clock
        self._tick = tick
        self._grace = startup_grace
        self._retrying = Retrying(command_deadline)
        # When the coordinator started (its node table began hearing heartbeats): the grace for
        # nodes never heard from counts from then, not from this leadership's start.
        self.started = clock() if started is None else started
        self.fenced = fenced
        self.drivers: dict[str, Driver] = {}
        self.closing: dict[str, Driver] = {}  # terminal rollouts whose outbox is not cleared yet
        self.observed: dict[tuple[str, str], ObservedState] = {}
        self.deposed: Deposed | None = None
        self.lost = asyncio.Event()  # set once a write met a later leader's fence
        self.store = RolloutStore(bus, fenced=fenced, live=self._live_record,
                                  running=self._running, retention=retention)
        self.desired = DesiredWriter(bus, seed=seed, fenced=fenced, retrying=self._retrying,
                                     batchable=batchable)
        self.events = EventPublisher(self.fleet, queue=EVENT_QUEUE, logger=log,
                                     on_stored=self._stored, on_lost=self._lost_events)
        # Events the publisher gave up on (the stream away past its retries): sent again from
        # their outboxes as soon as the stream stores anything again (``_stored``), once each
        # (``_resent``): one the stream refuses for good waits for ``_retry_outbox``.
        self._given_up: set[str] = set()
        self._resent: set[str] = set()
        self._executor = Executor(store=self.store, desired=self.desired, events=self.events,
                                  retrying=self._retrying, clock=clock, observe=observe)
        self.cordons = Cordons(bus, fenced=fenced, desired=self.desired, events=self.events,
                               retrying=self._retrying, clock=clock, targeted=self._targeted)
        self._settled: set[str] = set()  # terminal rollouts whose lock is known released
        self._deploying = asyncio.Lock()
        self._unreadable: set[str] = set()  # open records a resync could not read (logged)
        self._crashed: set[str] = set()  # rollouts whose resume crashed (logged once)
        self.synced = asyncio.Event()  # the observed watch delivered its first snapshot
        self.ready = asyncio.Event()  # ... and every live rollout was resumed
        self._resync_wanted = asyncio.Event()
        self._complained: set[str] = set()
        self._inbox: list[Entry | None] = []
        self._inbox_ready = asyncio.Event()

    # -- the tasks ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch, tick, resume and publish until cancelled, or until a write meets a later
        leader's fence (then return: this coordinator no longer leads). Every task owned here."""
        # Not a TaskGroup: it cancels its tasks once, and Python 3.11 can lose a cancel
        # (``calls.stop_all``); a task that ends by an error ends them all, raised here.
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._watch_loop(), name="runner-observed"),
            loop.create_task(self._observed_loop(), name="runner-observed-feed"),
            loop.create_task(self.events.run(self.bus), name="runner-events"),
            loop.create_task(self._resync_loop(), name="runner-resync"),
            loop.create_task(self._tick_loop(), name="runner-tick"),
        ]
        lost = loop.create_task(self.lost.wait(), name="runner-lost")
        try:
            done, _ = await asyncio.wait([lost, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await stop_all([lost, *tasks], what="the runner's tasks")
        for task in tasks:
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _watch_loop(self) -> None:
        """Queue what the observed watch delivers; ``_observed_loop`` takes it in batches."""
        async for entry in self.bus.watch(subjects.observed_bucket(self.fleet), ">",
                                          verify=WATCH_VERIFY,
                                          on_missing=self.bus.ensure_observed):
            self._inbox.append(entry)
            self._inbox_ready.set()

    async def _observed_loop(self) -> None:
        """Feed everything that arrived while the last batch was carried out, as one batch.

        A wave of N nodes reports N observed states within moments; handling them one by one
        costs N engine steps, N record writes and N round trips. A ``None`` (the watch delivered
        the full contents) is honoured only after the entries before it are fed.
        """
        while True:
            cancelled_meanwhile()
            await self._inbox_ready.wait()
            self._inbox_ready.clear()
            items, self._inbox = self._inbox, []
            batch: list[Entry] = []
            for item in items:
                if item is not None:
                    batch.append(item)
                    continue
                await self.on_observed_batch(batch)
                batch = []
                self.synced.set()
            await self.on_observed_batch(batch)

    async def _tick_loop(self) -> None:
        await self.synced.wait()
        while True:
            await self.step()
            await asyncio.sleep(self._tick)

    async def _resync_loop(self) -> None:
        await self.synced.wait()
        delay = 0.5
        gap = 0.0  # before a pass the last one asked for: 0.5 s, doubling to 5 s while asked
        while True:
            # Cleared before the pass, not after it: a driver dropped during the pass (or a
            # record it could not read yet) asks for the next at once, not in RESYNC_INTERVAL.
            self._resync_wanted.clear()
            try:
                await self.resync()
            except Deposed as exc:
                self._lose(exc)
                return
            except BusError as exc:
                cancelled_meanwhile()
                log.warning("cannot load rollouts yet (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception:  # our bug: it must not end the leadership (every resync again)
                cancelled_meanwhile()
                log.exception("resuming the rollouts failed; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            self.ready.set()
            # A pass that asked for the next itself (something it could not do yet) waits a
            # moment that grows while it keeps asking, not none: no busy loop over a record
            # that stays unreadable.
            gap = min(max(2 * gap, 0.5), 5.0) if self._resync_wanted.is_set() else 0.0
            if gap:
                await asyncio.sleep(gap)
            try:
                async with asyncio.timeout(RESYNC_INTERVAL):
                    await self._resync_wanted.wait()
            except TimeoutError:
                pass

    # -- feeds -------------------------------------------------------------------------------------

    async def on_observed(self, entry: Entry) -> None:
        """One change in the observed bucket: cache it and feed the drivers of its service."""
        await self.on_observed_batch([entry])

    async def on_observed_batch(self, entries: Sequence[Entry]) -> None:
        """Changes in the observed bucket, in order: cache them, then feed each driver the
        changes of its target nodes as one batch (the latest per node)."""
        changed: dict[tuple[str, str], ObservedState] = {}
        for entry in entries:
            node, _, service = entry.key.partition(".")
            if entry.value is None:
                self.observed.pop((node, service), None)
                changed.pop((node, service), None)
                continue
            try:
                if len(entry.value) > OBSERVED_MAX:
                    raise ProtocolError(f"{len(entry.value)} bytes (at most {OBSERVED_MAX})")
                seen = shared(decode(ObservedState, entry.value))  # kept per node
                if (seen.node, seen.service) != (node, service):
                    raise ProtocolError(f"it claims to be {seen.node}.{seen.service}")
            except ProtocolError as exc:
                # Once per node, for a bounded number of nodes: the keys are a node's to name (a
                # review's node wrote junk under 2,000 keys of its own: 2,000 lines).
                if node not in self._complained and len(self._complained) < COMPLAINED_MOST:
                    self._complained.add(node)
                    log.warning("ignoring observed state %s: %s", entry.key, exc)
                self.observed.pop((node, service), None)  # (what it said before is void too)
                continue
            self.observed[(node, service)] = seen
            changed[(node, service)] = seen
        if not changed:
            return
        for driver in list(self.drivers.values()):
            targets = driver.rollout.record.nodes
            events: list[EngineEvent] = [
                ObservedChanged(node, seen) for (node, service), seen in changed.items()
                if service == driver.service and node in targets
            ]
            if events:
                await self._feed_quietly(driver, *events)

    async def step(self) -> None:
        """One tick: tell every rollout which target nodes went offline or came back, then Tick
        (one engine step per rollout: the changes and the Tick as one batch)."""
        now = self._clock()
        if not self.drivers:
            await self._clear_outboxes(now)
            return
        excused = self.excused_until(now)
        liveness = self._liveness or self._liveness_from_views()
        # After the grace, what a node's liveness says depends on the table alone (``_online``),
        # and a record's nodes change their ``online`` only by the events sent here: once every
        # node agreed with the table at one count of its changes, they agree while it stays.
        changes = (self._liveness_changes() if self._liveness_changes is not None
                   and self._liveness is not None and now - self.started >= self._grace
                   else None)
        for driver in list(self.drivers.values()):
            driver.rollout.excuse(excused)
            events: list[EngineEvent] = []
            if changes is None or driver.agreed != changes:
                for node, progress in driver.rollout.record.nodes.items():
                    online = self._online(liveness(node), now)
                    if online is not None and online != progress.online:
                        events.append(NodeOnline(node) if online else NodeOffline(node))
                driver.agreed = None if events else changes
            await self._feed_quietly(driver, *events, Tick())
        await self._clear_outboxes(now)

    def excused_until(self, now: float) -> float:
        """Until when the fleet's nodes may not have heard the bus (``Rollout.excuse``; 0:
        no excuse): while this coordinator's connection is down, and after it is back for as
        long as agents take to reconnect (their backoff, at most ``RECONNECT_CAP``) and to
        start their watches again (``restart_spread`` of the fleet's size: 100 s at 50,000
        nodes). Without it a wave whose progress deadline passed while the broker restarted
        failed its nodes for the bus's silence (the ticks go on), and a large fleet's nodes,
        told within their spread, could come back after the deadline: a rollback for
        nothing. Counted from the bus's last reconnect, so a leader that takes over (or
        resumes) after one excuses its rollouts as long; and as long from the end of a burst
        of the agents' registrations (``core.reconnects``: their own reconnects, a server of
        the cluster gone while this coordinator's connection held; churn past a window from
        its first registration extends nothing)."""
        down, back = not self.bus.connected, self.bus.reconnected_at
        burst = self.reconnects.end  # a burst's last registration, within a window of its first
        if back is None and not down and burst is None:
            return 0.0
        lag = RECONNECT_CAP + restart_spread(self._size())
        until = 0.0
        if down or back is not None:
            until = (now if down or back is None else back) + lag
            if not down and back != self._logged_back and until > now:
                self._logged_back = back
                log.info("the bus is back: no rollout's progress deadline passes before %s UTC "
                         "plus its --progress-deadline (agents reconnect and start their "
                         "watches again within %.0fs)", _utc(until), lag)
        if burst is not None and burst + lag > until:
            # The agents' reconnects, heard as a burst of registrations while this
            # coordinator's own connection held (a server of the cluster went away):
            # from the burst's end, as from a reconnect of its own.
            until = burst + lag
            began = self.reconnects.began
            if began != self._logged_burst and until > now:
                self._logged_burst = began
                log.info("%d nodes registered again at once (their agents reconnected: a "
                         "server of the cluster went away?): no rollout's progress deadline "
                         "passes before %s UTC plus its --progress-deadline, or later while "
                         "more come", self.reconnects.counted, _utc(until))
        return until

    # -- the outbox --------------------------------------------------------------------------------

    def _stored(self, events: Sequence[Event]) -> None:
        """The stream acknowledged ``events``: they leave their rollouts' outboxes. The stream
        answers again, so what the publisher gave up on meanwhile is sent again now: a cluster
        electing the events stream's leader (its broker killed) answered no one for ~8 s, and
        a decision's events waited OUTBOX_RETRY (30 s) in its outbox, the rollout's success
        published before them."""
        for event in events:
            driver = self.drivers.get(event.rollout) or self.closing.get(event.rollout)
            if driver is not None:
                driver.outbox.pop(event.id, None)
            self._resent.discard(event.id)
        if events and self._given_up:
            given_up, self._given_up = self._given_up, set()
            for driver in [*self.drivers.values(), *self.closing.values()]:
                for eid, event in list(driver.outbox.items()):
                    if eid in given_up:
                        self._resent.add(eid)
                        self.events.put(event)

    def _lost_events(self, events: Sequence[Event]) -> None:
        """The publisher gave up on ``events``: those still in an outbox and not sent again
        this way before go again at the next store (``_stored``)."""
        for event in events:
            driver = self.drivers.get(event.rollout) or self.closing.get(event.rollout)
            if driver is None or event.id not in driver.outbox:
                continue
            if event.id in self._resent:  # refused again: left to _retry_outbox
                self._resent.discard(event.id)
            else:
                self._given_up.add(event.id)

    async def _clear_outboxes(self, now: float) -> None:
        """Rewrite with an empty outbox each record whose stored outbox was all acknowledged a
        while ago (so that a coordinator resuming it long after, past the stream's duplicate
        window, has nothing to publish twice); a finished rollout's last events included."""
        for driver in [*self.drivers.values(), *self.closing.values()]:
            self._retry_outbox(driver, now)
            if (not driver.outbox_stored or driver.outbox or driver.held
                    or now - driver.persisted_at < OUTBOX_CLEAR_AFTER):
                continue
            try:
                async with driver.lock:
                    await self._executor.persist(driver, driver.rollout.record)
            except Deposed as exc:
                self._lose(exc)
                return
            except BusError as exc:
                cancelled_meanwhile()
                log.debug("rollout %s: cannot clear its outbox yet: %s", driver.id, exc)
                continue
            if driver.rollout.done:
                self.closing.pop(driver.id, None)

    async def _hear_from(self, selector: Mapping[str, str]) -> None:
        """Wait, ``UNHEARD_WAIT`` at most, for the nodes ``selector`` matches that this
        coordinator, just started, has not heard yet (``Fleet.listen``): they beat at the
        leader's pace, up to 25 s apart at 50,000 nodes, and a deploy planned before would
        leave every live one of them out as offline. Those still silent after it are."""
        waiting = self._unheard(selector)
        if not waiting:
            return
        loop = asyncio.get_running_loop()
        give_up = loop.time() + UNHEARD_WAIT
        log.info("waiting up to %gs for %d targeted nodes this coordinator has not heard from "
                 "yet (it has just started)", UNHEARD_WAIT, len(waiting))
        while waiting and loop.time() < give_up:
            await asyncio.sleep(UNHEARD_POLL)
            still = set(self._unheard({}))  # the selector's labels read once, above: 80 ms
            waiting = [n for n in waiting if n in still]  # at 50,000 nodes; this, a few
        if waiting:
            log.warning("%d targeted nodes still not heard from after %gs: left out as offline "
                        "(e.g. %s)", len(waiting), UNHEARD_WAIT, ", ".join(sorted(waiting)[:5]))

    def _liveness_from_views(self) -> Callable[[str], Liveness | None]:
        """``liveness`` read off the node table's views (when the runner was given no lookup)."""
        table = {v.id: (v.online, v.last_seen is not None) for v in self._nodes()}
        return table.get

    def _online(self, seen: Liveness | None, now: float) -> bool | None:
        """What the node table says of a node, or None while it cannot know yet: a table given
        as ``liveness`` keeps the startup grace itself (``Fleet.listen``, extended by a time
        the coordinator could not hear); read off views, ``startup_grace`` from ``started``."""
        if seen is not None and seen[0]:
            return True
        if seen is not None and seen[1]:
            return False
        if seen is not None and self._liveness is not None:
            return None
        return False if now - self.started >= self._grace else None

    def _retry_outbox(self, driver: Driver, now: float) -> None:
        """Send again what the publisher gave up on (the stream was away): every OUTBOX_RETRY,
        the events older than that (the stream drops a copy it has, by message id). An outbox
        past its bound loses its oldest, logged: the record must stay writable."""
        driver.bound_outbox()
        if now - driver.outbox_retried < OUTBOX_RETRY:
            return
        driver.outbox_retried = now
        for event in list(driver.outbox.values()):
            if now - event.time >= OUTBOX_RETRY:
                self.events.put(event)

    # -- operator requests -------------------------------------------------------------------------

    async def deploy(self, spec: RolloutSpec, release: ReleaseRef, who: str = "", *,
                     undo: bool = False) -> RolloutRecord:
        """Plan, lock, persist and start a rollout for ``who`` (the API caller, kept in the
        record and on every event of its start); ``undo``: asked by ``rollback SERVICE``.
        UsageError, Conflict (locked) or BusError."""
        async with self._deploying:
            # What the last rollout of the service left is settled before it is read: the lock
            # decided first (Conflict while one runs), then the last step of one that just
            # ended waited for, and the last writes of one whose leader died before making
            # them made (a stale lock names it). Planned from the states those writes replace,
            # this rollout's writes would carry their generations, and whichever is stored
            # second would be skipped as already there.
            try:
                stale = await self.store.check_lock(spec.service)
                await self._finishing(spec.service)
                if stale is not None and stale.id not in self.drivers:
                    await self._write_intended(Rollout(stale, fleet=self.fleet))
                await self._hear_from(spec.selector)
                now = self._clock()
                views = list(self._nodes())
                live = [v for v in views if v.online]
                current = await self.current_desired(spec.service)
                cordoned = await read_cordons(self.bus)
                rid = new_rollout_id(spec.service, now)
                try:
                    record = new_record(id=rid, spec=spec, release=release, nodes=live,
                                        current=current, now=now, who=who, cordoned=cordoned,
                                        undo=undo, observed={
                                            node: seen for (node, service), seen
                                            in self.observed.items() if service == spec.service})
                except UsageError as exc:
                    if live != views and "no node matches" in str(exc):
                        raise UsageError(f"{exc} (offline nodes are not targeted)") from None
                    raise
                layout = await self._layout(record)
                skipped = sorted(v.id for v in views if not v.online
                                 and all(v.labels.get(k) == x for k, x in spec.selector.items()))
                if skipped:
                    record.report.skipped_offline = skipped
                # The record first, then the lock that names it (the store's docstring: a lock
                # never names a record still to come, so "missing" means stale); taking it
                # checks it again.
                revision = await self.store.create(record, layout)
                try:
                    await self.store.take_lock(spec.service, rid)
                except Deposed as exc:
                    # The record is stored: the leader after us takes its lock and starts it
                    # (``_own_lock``). "No rollout was started" would be untrue, and the CLI's
                    # retry of it a second deploy (found by a review).
                    self._lose(exc)
                    raise _accepted(rid, exc) from None
                except Conflict:  # another coordinator's rollout took it meanwhile
                    await self.store.discard(record)
                    raise
                except BusError as exc:  # the resync takes the lock and starts it
                    raise _accepted(rid, exc) from None
            except Deposed as exc:
                self._lose(exc)
                raise RemoteError("this coordinator lost the lead while creating the rollout "
                                  "(no rollout was started); try again", "unavailable") from None
            driver = Driver(Rollout(record, fleet=self.fleet), revision)
            self.drivers[rid] = driver
            log.info("rollout %s created: %s %s on %d nodes (by %s)", rid, spec.service,
                     spec.version, len(record.nodes), who or "?")
            events: list[EngineEvent] = [
                ObservedChanged(node, seen) for (node, svc), seen in self.observed.items()
                if svc == spec.service and node in record.nodes
            ]
            try:
                if events:  # one batch: one engine step, not one per node
                    await self.feed(driver, *events)
                await self.feed(driver, Start())
            except (BusError, RemoteError) as exc:
                # Record and lock are stored: whoever leads at the next resync starts it.
                raise _accepted(rid, exc) from None
            return driver.rollout.record

    def refused(self, verb: str, spec: RolloutSpec, who: str, reason: str, code: str) -> None:
        """Record that a ``verb`` (deploy, rollback) for ``who`` was refused before any wave
        ran (``coordinator.api.rollouts``): a ``rollout.refused`` event on the same path as
        every rollout event, so that notifications and metrics hear of it too."""
        event = Event(
            id=uuid.uuid4().hex, time=self._clock(), fleet=self.fleet, kind="rollout.refused",
            message=f"{verb} of {spec.service} {spec.version} refused: {reason}",
            service=spec.service, who=who,
            data={"verb": verb, "version": spec.version, "strategy": spec.strategy,
                  "selector": dict(spec.selector), "reason": reason, "code": code})
        self._executor.publish(event, None)

    async def _layout(self, record: RolloutRecord) -> Layout:
        """How the record of a new rollout is cut into pages (``coordinator.core.pages``), its
        worst-case size judged against what the NATS server takes in one message: a rollout
        that could not be stored is refused now rather than stuck mid-way. The sizes are
        measured in a thread (0.19 s at 50,000 nodes: the loop keeps renewing the lease)."""
        routers = {node: seen.router for (node, service), seen in self.observed.items()
                   if service == record.spec.service and seen.router is not None}
        head, sizes = await asyncio.to_thread(worst_case_sizes, record, routers)
        return fit(record, head, sizes, max_payload=self.bus.max_payload,
                   reserve=OUTBOX_MAX * EVENT_BYTES, node_reserve=NODE_OUTBOX_MAX * EVENT_BYTES)

    async def request(self, rollout_id: str, event: EngineEvent) -> RolloutRecord:
        """Feed an operator request to a live rollout; RemoteError says why it cannot be."""
        driver = self.drivers.get(rollout_id)
        if driver is None:
            found = await self.find(rollout_id)
            if found is None:
                raise RemoteError(f"no rollout {rollout_id!r} in fleet {self.fleet!r}; list them "
                                  "with 'fleetwave rollouts'", "not_found")
            record = found.summary if isinstance(found, SummarisedRollout) else found
            if record.state in TERMINAL_STATES:
                state = record.state.replace("_", " ")
                raise RemoteError(f"rollout {rollout_id} is already {state}"
                                  + (f" ({record.reason})" if record.reason else ""), "conflict")
            why = ("another coordinator leads now" if self.deposed is not None
                   else "this coordinator is reloading it")
            raise RemoteError(f"rollout {rollout_id} cannot take requests now: {why}; try again",
                              "conflict")
        try:
            await self.feed(driver, event)
        except IllegalTransition as exc:
            raise RemoteError(str(exc), "conflict") from None
        return driver.rollout.record

    async def cordon(self, nodes: list[str], *, drain: bool, grace: float,
                     who: str) -> list[dict[str, Any]]:
        """Cordon (and drain) ``nodes`` for ``who`` (``coordinator.runtime.cordons``), under the
        deploys' lock: no rollout starts on a node between the check and the writes."""
        async with self._deploying, self._leading("cordon"):
            return await self.cordons.cordon(nodes, drain=drain, grace=grace, who=who)

    async def uncordon(self, nodes: list[str], *, who: str) -> list[dict[str, Any]]:
        """Return ``nodes`` to new rollouts (and undrain them), under the deploys' lock."""
        async with self._deploying, self._leading("uncordon"):
            return await self.cordons.uncordon(nodes, who=who)

    @contextlib.asynccontextmanager
    async def _leading(self, verb: str) -> AsyncIterator[None]:
        """A fenced write of ``verb`` met a later leader's fence: stop leading (``_lose``)
        and say so, with what may have been written before it."""
        try:
            yield
        except Deposed as exc:
            self._lose(exc)
            raise RemoteError(f"this coordinator lost the lead during the {verb} (the nodes "
                              "before the one it stopped at were done); see 'fleetwave nodes' "
                              "and try again", "unavailable") from None

    async def forget(self, nodes: list[str], *, who: str) -> list[dict[str, Any]]:
        """Drop offline ``nodes`` from the fleet (``coordinator.runtime.cordons``), under the
        deploys' lock: no rollout starts on one between the check and the writes."""
        async with self._deploying:
            # Looked at again under the lock: its agent may have come back since the API's look.
            lookup = self._liveness or (lambda node: None)  # (views: the API's look only)
            back = [n for n in nodes if (seen := lookup(n)) is not None and seen[0]]
            if back:
                raise UsageError(f"node {back[0]} is online again: stop its agent first (a "
                                 "node that beats registers again); nothing forgotten")
            async with self._leading("forget"):
                out = await self.cordons.forget(nodes, who=who)
        gone = set(nodes)
        for key in [k for k in self.observed if k[0] in gone]:
            del self.observed[key]
        return out

    def _targeted(self, node: str) -> str | None:
        return next((d.id for d in self.drivers.values() if node in d.rollout.record.nodes), None)

    def active(self, service: str) -> Driver | None:
        """The live rollout of ``service`` driven here, if any."""
        return next((d for d in self.drivers.values() if d.service == service), None)

    # -- reading ----------------------------------------------------------------------------------

    async def _finishing(self, service: str) -> None:
        """Wait (bounded) for a rollout of ``service`` that ended but whose last step is still
        being carried out. Its record already says it ended, so a deploy takes its lock as
        stale, but its last writes (10,000 old slots retired after a success) are in flight: a
        rollout planned from the states they replace wrote the same generations, and the one
        stored second was skipped as already there. Conflict if it does not end in time."""
        for driver in [d for d in self.drivers.values()
                       if d.service == service and d.rollout.done]:
            try:
                async with asyncio.timeout(self._retrying.deadline):
                    async with driver.lock:  # ``feed`` holds it while carrying the step out
                        pass
            except TimeoutError:
                raise Conflict(f"rollout {driver.id} of {service} is still writing its last "
                               "desired states; try again in a moment") from None

    def _live_record(self, rollout_id: str) -> RolloutRecord | None:
        driver = self.drivers.get(rollout_id)
        return driver.rollout.record if driver is not None else None

    def _running(self, service: str) -> RolloutRecord | None:
        """A rollout of ``service`` driven here that has not ended, if any."""
        for driver in self.drivers.values():
            record = driver.rollout.record
            if record.spec.service == service and record.state not in TERMINAL_STATES:
                return record
        return None

    async def get(self, rollout_id: str) -> RolloutRecord | None:
        """A rollout's record: the live one if driven here, else as persisted."""
        return self._live_record(rollout_id) or await self.store.load(rollout_id)

    async def find(self, rollout_id: str, *, whole: bool = True,
                   seen: bool = False) -> RolloutRecord | SummarisedRollout | None:
        """``get``, or what retention left of the rollout (``whole=False``: a stored split
        record's head only; ``seen``: its nodes without their desired states, for showing;
        ``RolloutStore.find``)."""
        live = self._live_record(rollout_id)
        if live is not None:
            return live
        found = await self.store.find(rollout_id, whole=whole, seen=seen)
        return found[0] if found is not None else None

    async def latest(self, *, seen: bool = False) -> RolloutRecord | SummarisedRollout | None:
        """The rollout created last in the fleet (``_latest``), as ``find`` has it."""
        rid = await self.store.latest()
        return await self.find(rid, seen=seen) if rid else None

    async def history(self, service: str = "", limit: int = 50) -> list[RolloutSummary]:
        """The ``limit`` newest rollouts (of ``service``, or of the fleet), from the indexes,
        live ones as they are now."""
        if service:
            indexes = {service: await self.store.index(service)}
        else:
            indexes = await self.store.indexes()
        for driver in self.drivers.values():
            if service and driver.service != service:
                continue
            entries = [s for s in indexes.get(driver.service, []) if s.id != driver.id]
            entries.append(summarise(driver.rollout.record))
            indexes[driver.service] = sorted(entries, key=lambda s: (s.created, s.id),
                                             reverse=True)
        return newest(indexes.values(), limit)

    async def records(self) -> list[RolloutRecord]:
        """Every rollout of the fleet kept whole, newest first (live ones as they are now): a
        scan of every record, for tools; the API reads ``history``."""
        out = {rec.id: rec for rec in await self.store.records()}
        for rid, driver in self.drivers.items():
            out[rid] = driver.rollout.record
        return sorted(out.values(), key=lambda r: (r.created, r.id), reverse=True)

    async def current_desired(self, service: str) -> dict[str, DesiredState]:
        """Every node's current desired state of ``service``: as this leadership's writer
        knows them, else from the desired bucket."""
        return await self.desired.current(service,
                                          functools.partial(self.store.current_desired, service))

    # -- resuming ----------------------------------------------------------------------------------

    async def resync(self) -> None:
        """Drive every non-terminal rollout in KV that is not driven yet; release stale locks.
        Which ones may need it the indexes and the locks say (``RolloutStore.open_ids``): the
        cost does not grow with the rollouts of the past."""
        for rid in await self.store.open_ids():
            if rid in self.drivers or rid in self.closing:
                continue
            try:
                found = await self.store.load_entry(rid)
            except Deposed:
                raise
            except BusError as exc:
                # One record that cannot be read (a page missing or unreadable) must not keep
                # the others from being resumed: they come after it in every pass (a review
                # found a new leader resuming none of them, for ever).
                cancelled_meanwhile()
                if rid not in self._unreadable:  # once, until it is read again
                    self._unreadable.add(rid)
                    log.warning("cannot resume rollout %s yet (trying again): %s", rid, exc)
                self._resync_wanted.set()
                continue
            self._unreadable.discard(rid)
            if found is None:
                continue
            record, revision = found
            if record.id in self.drivers or record.id in self.closing:
                continue
            outbox = record.outbox
            record = msgspec.structs.replace(record, outbox=[])
            if record.state in TERMINAL_STATES:
                if outbox:  # its last step may not have been carried out: its writes, its events
                    try:
                        # Under the deploys' lock: a deploy of the service (which finds this
                        # record's lock stale and makes the same writes) must not run between
                        # this check of the stored generations and these writes, or they could
                        # land over its newer ones (a review found generations going back).
                        async with self._deploying:
                            await self._write_intended(Rollout(record, fleet=self.fleet))
                    except Deposed:
                        raise
                    except BusError as exc:  # the next resync makes them
                        cancelled_meanwhile()
                        log.warning("cannot finish rollout %s's last writes yet: %s", record.id,
                                    exc)
                        self._resync_wanted.set()
                        continue
                    self._publish(self._republish(self.closing, record, revision, outbox))
                if record.id not in self._settled:
                    await self.store.release_lock(record.spec.service, record.id)
                    self._settled.add(record.id)
                continue
            if record.state == "pending" and not await self._own_lock(record):
                continue
            driver = self._republish(self.drivers, record, revision, outbox)
            log.info("resuming rollout %s (%s, %s %s, wave %d)", record.id, record.state,
                     record.spec.service, record.release.version, record.current_wave + 1)
            try:
                async with driver.lock:
                    await self._write_intended(driver.rollout)
                    # Its events announce those writes: never before them (``carry_out``).
                    self._publish(driver)
                events: list[EngineEvent] = [
                    ObservedChanged(node, seen) for (node, svc), seen in self.observed.items()
                    if svc == record.spec.service and node in record.nodes
                ]
                if events:  # one batch: one engine step, not one per node
                    await self.feed(driver, *events)
                if record.state == "pending":  # killed between creating and starting it
                    await self.feed(driver, Start())
            except Deposed:
                raise
            except BusError as exc:
                cancelled_meanwhile()
                self._drop(driver, f"cannot resume it yet: {exc}")
            except RemoteError as exc:  # no longer ours: feed() logged it
                log.debug("%s", exc)
            except Exception as exc:
                # Our bug (or a figure we failed to bound): this rollout is dropped and tried
                # again at the next resync, the others resumed, the leadership kept. A review
                # had one node's report crash every resync, so the leader lost its lease every
                # second and no rollout of the fleet moved.
                cancelled_meanwhile()
                if record.id not in self._crashed:  # the traceback once, until it resumes
                    self._crashed.add(record.id)
                    log.exception("rollout %s: crashed resuming it", record.id)
                self._drop(driver, f"crashed resuming it ({type(exc).__name__})")
            else:
                self._crashed.discard(record.id)

    async def _own_lock(self, record: RolloutRecord) -> bool:
        """Whether a never-started record holds (or now takes) its service's lock; one that
        cannot, because another live rollout holds it, is deleted: it was never started, so
        nothing on the nodes is its doing."""
        try:
            await self.store.take_lock(record.spec.service, record.id)
            return True
        except Deposed:
            raise
        except Conflict as exc:
            log.warning("dropping rollout %s, recorded but never started: %s", record.id, exc)
            await self.store.discard(record)
            return False
        except BusError as exc:
            cancelled_meanwhile()
            log.warning("cannot lock rollout %s yet: %s", record.id, exc)
            return False

    async def _write_intended(self, rollout: Rollout) -> None:
        """Write (again) every desired state ``rollout``'s record decided on, in batches (one
        scan, not a read each; those already stored are skipped by generation), retried."""
        await self._retrying(functools.partial(self.desired.write_all, rollout.intended()))

    def _republish(self, into: dict[str, Driver], record: RolloutRecord, revision: int,
                   outbox: list[Event]) -> Driver:
        """A driver for ``record`` in ``into`` whose outbox is as found in KV: ``_publish``
        sends it again once the writes its events announce are made again."""
        driver = Driver(Rollout(record, fleet=self.fleet), revision)
        driver.outbox = {e.id: e for e in outbox}
        driver.outbox_stored = bool(outbox)
        driver.persisted_at = self._clock()
        into[record.id] = driver
        return driver

    def _publish(self, driver: Driver) -> None:
        """Publish ``driver``'s outbox again: the stream drops what it stored already (same
        bytes, same message id)."""
        if driver.outbox:
            log.info("rollout %s: publishing %d events its last leader may not have", driver.id,
                     len(driver.outbox))
        for event in driver.outbox.values():
            self.events.put(event)

    # -- carrying out commands ---------------------------------------------------------------------

    async def feed(self, driver: Driver, event: EngineEvent, *more: EngineEvent) -> None:
        """Handle one event (or a batch of feed events, ``Rollout.handle_all``) and carry out
        the commands; the driver is dropped on a bus failure (rebuilt by the next resync) or
        when another coordinator owns the record."""
        async with driver.lock:
            if self.drivers.get(driver.id) is not driver:
                raise RemoteError(f"rollout {driver.id} is being reloaded; try again", "conflict")
            now = self._clock()
            before = driver.rollout.record
            commands = (driver.rollout.handle_all([event, *more], now) if more
                        else driver.rollout.handle(event, now))
            commands = driver.coalesce(before, commands, now)
            try:
                await self._executor.carry_out(driver, commands)
            except Deposed as exc:
                self._lose(exc)
                raise RemoteError(str(exc), "conflict") from None
            except BusError as exc:
                self._drop(driver, str(exc))
                raise
            if driver.rollout.done:
                self.drivers.pop(driver.id, None)
                if driver.outbox_stored:
                    self.closing[driver.id] = driver
                try:
                    await self._retrying(lambda: self.store.release_lock(driver.service, driver.id))
                    self._settled.add(driver.id)
                except BusError as exc:  # the next resync releases it: the record is terminal
                    log.warning("cannot release the lock of %s yet: %s", driver.service, exc)
                    self._resync_wanted.set()
                log.info("rollout %s %s", driver.id, driver.rollout.state)

    async def _feed_quietly(self, driver: Driver, event: EngineEvent, *more: EngineEvent) -> None:
        """``feed`` for the watch and the ticker, whose failures are logged, never raised."""
        try:
            await self.feed(driver, event, *more)
        except IllegalTransition as exc:
            log.debug("%s", exc)
        except (RemoteError, BusError) as exc:
            cancelled_meanwhile()
            log.debug("rollout %s: %s", driver.id, exc)
        except Exception:  # our bug: keep the other rollouts going, rebuild this one
            cancelled_meanwhile()
            log.exception("rollout %s: crashed handling %s", driver.id, type(event).__name__)
            self._drop(driver, "crashed")

    def _drop(self, driver: Driver, why: str, *, level: int = logging.WARNING) -> None:
        if self.drivers.get(driver.id) is driver:
            del self.drivers[driver.id]
        if self.deposed is None:
            log.log(level, "rollout %s dropped until the next resync: %s", driver.id, why)
            self._resync_wanted.set()

    def _lose(self, exc: Deposed) -> None:
        """A write met a later leader's fence: stop driving everything (``run`` returns)."""
        if self.deposed is None:
            self.deposed = exc
            log.error("STOPPED DRIVING every rollout: %s", exc)
        self.drivers.clear()
        self.lost.set()


def _accepted(rid: str, exc: Exception) -> RemoteError:
    """The answer to a deploy whose record is stored but whose start failed: a plain error
    would tell the operator that nothing happened, and the next resync starts it."""
    return RemoteError(
        f"rollout {rid} is recorded but its start failed ({exc}); the coordinator starts it on "
        f"its next resync (within {RESYNC_INTERVAL:g}s): check with 'fleetwave status {rid}'",
        "accepted", {"id": rid})


def _utc(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def new_rollout_id(service: str, now: float) -> str:
    """A readable, sortable, unique id: ``<service>-<UTC yyyymmdd-hhmmss>-<4 hex>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{service}-{stamp}-{secrets.token_hex(2)}"
