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

    Persist       kv_update of ``fw-<fleet>-rollouts/<id>``, compare-and-set on the last revision;
                  a Conflict means another coordinator wrote: the driver is dropped (log: ERROR)
    WriteDesired  signed envelope into ``fw-<fleet>-desired/<node>.<service>``, compare-and-set,
                  skipped when the stored generation is already >= (idempotent by generation)
    EmitEvent     an Event queued for the publisher task (``fw.<fleet>.evt.<kind>``)

Since the record is persisted before the writes it decided, a coordinator killed at any point
resumes correctly (``resync``): every non-terminal record is loaded, its ``intended()`` desired
states re-written where the KV generation is lower, the cached observed states fed again. Ticks
wait until the observed watch has delivered its first full snapshot, so a resumed rollout never
judges a bake without the figures behind it, and offline transitions are held back for
``startup_grace`` seconds after start unless the node beat since (a restarted coordinator knows
no node alive until its first heartbeat).

One rollout at a time per service: ``deploy`` takes the service's lock (``RolloutStore``) before
it creates the record, and the lock is released once the rollout is terminal.

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
import functools
import logging
import secrets
import time
from collections.abc import Callable, Sequence

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
    worst_case_size,
)
from coordinator.errors import RemoteError, UsageError
from coordinator.runtime.calls import COMMAND_DEADLINE, Retrying
from coordinator.runtime.desired import DesiredWriter
from coordinator.runtime.driver import Driver
from coordinator.runtime.executor import Executor
from coordinator.runtime.ports import RunnerBus
from coordinator.runtime.store import Foreign, RolloutStore
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode
from protocol.errors import BusError, ProtocolError
from protocol.events import EventPublisher
from protocol.messages import (
    TERMINAL_STATES,
    DesiredState,
    NodeView,
    ObservedState,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
)

log = logging.getLogger("fleetwave.coordinator.runner")

TICK = 0.2  # how often time passes for the rollouts (and for the daemon's node table)
STARTUP_GRACE = 10.0  # > 3 heartbeats of 2 s: time for every live node to beat once
RESYNC_INTERVAL = 30.0

# What the node table says of one node: (online now, ever heard from). ``Fleet.liveness``.
Liveness = tuple[bool, bool]


class Runner:
    """Drives every live rollout of one fleet; see the module docstring."""

    def __init__(
        self, bus: RunnerBus, *, seed: bytes, nodes: Callable[[], Sequence[NodeView]],
        liveness: Callable[[str], Liveness | None] | None = None,
        clock: Callable[[], float] = time.time, tick: float = TICK,
        startup_grace: float = STARTUP_GRACE, command_deadline: float = COMMAND_DEADLINE,
    ) -> None:
        self.bus = bus
        self.fleet = bus.fleet
        self._nodes = nodes
        self._liveness = liveness  # O(1) per node for the tick; else read off nodes()
        self._clock = clock
        self._tick = tick
        self._grace = startup_grace
        self._retrying = Retrying(command_deadline)
        self.started = clock()
        self.drivers: dict[str, Driver] = {}
        self.observed: dict[tuple[str, str], ObservedState] = {}
        self.foreign: set[str] = set()
        self.store = RolloutStore(bus, live=self._live_record)
        self.desired = DesiredWriter(bus, seed=seed, retrying=self._retrying)
        self.events = EventPublisher(self.fleet, logger=log)
        self._executor = Executor(store=self.store, desired=self.desired, events=self.events,
                                  retrying=self._retrying, clock=clock)
        self._settled: set[str] = set()  # terminal rollouts whose lock is known released
        self._deploying = asyncio.Lock()
        self.synced = asyncio.Event()  # the observed watch delivered its first snapshot
        self.ready = asyncio.Event()  # ... and every live rollout was resumed
        self._resync_wanted = asyncio.Event()
        self._complained: set[str] = set()
        self._inbox: list[Entry | None] = []
        self._inbox_ready = asyncio.Event()

    # -- the tasks ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch, tick, resume and publish until cancelled (every task owned here)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_loop(), name="runner-observed")
            tg.create_task(self._observed_loop(), name="runner-observed-feed")
            tg.create_task(self.events.run(self.bus), name="runner-events")
            tg.create_task(self._resync_loop(), name="runner-resync")
            tg.create_task(self._tick_loop(), name="runner-tick")

    async def _watch_loop(self) -> None:
        """Queue what the observed watch delivers; ``_observed_loop`` takes it in batches."""
        async for entry in self.bus.watch(subjects.observed_bucket(self.fleet), ">"):
            self._inbox.append(entry)
            self._inbox_ready.set()

    async def _observed_loop(self) -> None:
        """Feed everything that arrived while the last batch was carried out, as one batch.

        A wave of N nodes reports N observed states within moments; handling them one by one
        costs N engine steps, N record writes and N round trips. A ``None`` (the watch delivered
        the full contents) is honoured only after the entries before it are fed.
        """
        while True:
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
        while True:
            try:
                await self.resync()
            except BusError as exc:
                log.warning("cannot load rollouts yet (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            self.ready.set()
            self._resync_wanted.clear()
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
                seen = decode(ObservedState, entry.value)
                if (seen.node, seen.service) != (node, service):
                    raise ProtocolError(f"it claims to be {seen.node}.{seen.service}")
            except ProtocolError as exc:
                if entry.key not in self._complained:  # once per key: a flood must not fill log
                    self._complained.add(entry.key)
                    log.warning("ignoring observed state %s: %s", entry.key, exc)
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
        if not self.drivers:
            return
        now = self._clock()
        liveness = self._liveness or self._liveness_from_views()
        for driver in list(self.drivers.values()):
            events: list[EngineEvent] = []
            for node, progress in driver.rollout.record.nodes.items():
                online = self._online(liveness(node), now)
                if online is not None and online != progress.online:
                    events.append(NodeOnline(node) if online else NodeOffline(node))
            await self._feed_quietly(driver, *events, Tick())

    def _liveness_from_views(self) -> Callable[[str], Liveness | None]:
        """``liveness`` read off the node table's views (when the runner was given no lookup)."""
        table = {v.id: (v.online, v.last_seen is not None) for v in self._nodes()}
        return table.get

    def _online(self, seen: Liveness | None, now: float) -> bool | None:
        """What the node table says of a node, or None while it cannot know yet."""
        if seen is not None and seen[0]:
            return True
        if (seen is not None and seen[1]) or now - self.started >= self._grace:
            return False
        return None

    # -- operator requests -------------------------------------------------------------------------

    async def deploy(self, spec: RolloutSpec, release: ReleaseRef) -> RolloutRecord:
        """Plan, lock, persist and start a rollout; UsageError, Conflict (locked) or BusError."""
        async with self._deploying:
            now = self._clock()
            views = list(self._nodes())
            live = [v for v in views if v.online]
            current = await self.current_desired(spec.service)
            rid = new_rollout_id(spec.service, now)
            try:
                record = new_record(id=rid, spec=spec, release=release, nodes=live,
                                    current=current, now=now)
            except UsageError as exc:
                if live != views and "no node matches" in str(exc):
                    raise UsageError(f"{exc} (offline nodes are not targeted)") from None
                raise
            self._check_size(record)
            skipped = sorted(v.id for v in views if not v.online
                             and all(v.labels.get(k) == x for k, x in spec.selector.items()))
            if skipped:
                record.report.skipped_offline = skipped
            await self.store.take_lock(spec.service, rid)
            # A lost reply may hide a write that happened: the store keeps the lock if the
            # record is there (the resync resumes it) and releases it if not.
            revision = await self.store.create(record)
            driver = Driver(Rollout(record, fleet=self.fleet), revision)
            self.drivers[rid] = driver
            log.info("rollout %s created: %s %s on %d nodes", rid, spec.service, spec.version,
                     len(record.nodes))
            events: list[EngineEvent] = [
                ObservedChanged(node, seen) for (node, svc), seen in self.observed.items()
                if svc == spec.service and node in record.nodes
            ]
            if events:  # one batch: one engine step, not one per node
                await self.feed(driver, *events)
            await self.feed(driver, Start())
            return driver.rollout.record

    def _check_size(self, record: RolloutRecord) -> None:
        """Refuse a rollout whose record could outgrow what the NATS server takes in one
        message (it is persisted whole): better a clear no now than a rollout stuck mid-way."""
        limit = self.bus.max_payload
        if not limit:
            return
        routers = {node: seen.router for (node, service), seen in self.observed.items()
                   if service == record.spec.service and seen.router is not None}
        size = worst_case_size(record, routers)
        if size > limit:
            raise UsageError(
                f"a rollout of {len(record.nodes)} nodes needs a record of up to "
                f"{size / 2**20:.1f} MiB, more than the NATS server takes in one message "
                f"(max_payload {limit / 2**20:.1f} MiB); raise max_payload in the server's "
                "configuration (deploy/nats/*.conf set 8MB, at most 64MB) or roll the fleet "
                "out in parts with --selector")

    async def request(self, rollout_id: str, event: EngineEvent) -> RolloutRecord:
        """Feed an operator request to a live rollout; RemoteError says why it cannot be."""
        driver = self.drivers.get(rollout_id)
        if driver is None:
            record = await self.get(rollout_id)
            if record is None:
                raise RemoteError(f"no rollout {rollout_id!r} in fleet {self.fleet!r}; list them "
                                  "with 'fleetwave rollouts'", "not_found")
            if record.state in TERMINAL_STATES:
                state = record.state.replace("_", " ")
                raise RemoteError(f"rollout {rollout_id} is already {state}"
                                  + (f" ({record.reason})" if record.reason else ""), "conflict")
            why = ("another coordinator drives it" if rollout_id in self.foreign
                   else "this coordinator is reloading it")
            raise RemoteError(f"rollout {rollout_id} cannot take requests now: {why}; try again",
                              "conflict")
        try:
            await self.feed(driver, event)
        except IllegalTransition as exc:
            raise RemoteError(str(exc), "conflict") from None
        return driver.rollout.record

    def active(self, service: str) -> Driver | None:
        """The live rollout of ``service`` driven here, if any."""
        return next((d for d in self.drivers.values() if d.service == service), None)

    # -- reading ----------------------------------------------------------------------------------

    def _live_record(self, rollout_id: str) -> RolloutRecord | None:
        driver = self.drivers.get(rollout_id)
        return driver.rollout.record if driver is not None else None

    async def get(self, rollout_id: str) -> RolloutRecord | None:
        """A rollout's record: the live one if driven here, else as persisted."""
        return self._live_record(rollout_id) or await self.store.load(rollout_id)

    async def records(self) -> list[RolloutRecord]:
        """Every rollout of the fleet, newest first (live ones as they are now)."""
        out = {}
        for entry in await self.store.entries():
            if (rec := self.store.decode(entry)) is not None:
                out[rec.id] = rec
        for rid, driver in self.drivers.items():
            out[rid] = driver.rollout.record
        return sorted(out.values(), key=lambda r: (r.created, r.id), reverse=True)

    async def current_desired(self, service: str) -> dict[str, DesiredState]:
        """Every node's current desired state of ``service``, from the desired bucket."""
        return await self.store.current_desired(service)

    # -- resuming ----------------------------------------------------------------------------------

    async def resync(self) -> None:
        """Drive every non-terminal rollout in KV that is not driven yet; release stale locks."""
        for entry in await self.store.entries():
            record = self.store.decode(entry)
            if record is None or record.id in self.drivers or record.id in self.foreign:
                continue
            if record.state in TERMINAL_STATES:
                if record.id not in self._settled:
                    await self.store.release_lock(record.spec.service, record.id)
                    self._settled.add(record.id)
                continue
            driver = Driver(Rollout(record, fleet=self.fleet), entry.revision)
            self.drivers[record.id] = driver
            log.info("resuming rollout %s (%s, %s %s, wave %d)", record.id, record.state,
                     record.spec.service, record.release.version, record.current_wave)
            try:
                async with driver.lock:
                    for desired in driver.rollout.intended():
                        await self._retrying(functools.partial(self.desired.write, desired))
                events: list[EngineEvent] = [
                    ObservedChanged(node, seen) for (node, svc), seen in self.observed.items()
                    if svc == record.spec.service and node in record.nodes
                ]
                if events:  # one batch: one engine step, not one per node
                    await self.feed(driver, *events)
                if record.state == "pending":  # killed between creating and starting it
                    await self.feed(driver, Start())
            except BusError as exc:
                self._drop(driver, f"cannot resume it yet: {exc}")
            except RemoteError as exc:  # another coordinator owns it: feed() logged and dropped
                log.debug("%s", exc)

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
            except Foreign as exc:
                self.foreign.add(driver.id)
                self._drop(driver, str(exc), level=logging.ERROR)
                raise RemoteError(str(exc), "conflict") from None
            except BusError as exc:
                self._drop(driver, str(exc))
                raise
            if driver.rollout.done:
                self.drivers.pop(driver.id, None)
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
            log.debug("rollout %s: %s", driver.id, exc)
        except Exception:  # our bug: keep the other rollouts going, rebuild this one
            log.exception("rollout %s: crashed handling %s", driver.id, type(event).__name__)
            self._drop(driver, "crashed")

    def _drop(self, driver: Driver, why: str, *, level: int = logging.WARNING) -> None:
        if self.drivers.get(driver.id) is driver:
            del self.drivers[driver.id]
        if driver.id in self.foreign:
            log.log(level, "STOPPED DRIVING rollout %s: %s", driver.id, why)
        else:
            log.log(level, "rollout %s dropped until the next resync: %s", driver.id, why)
            self._resync_wanted.set()


def new_rollout_id(service: str, now: float) -> str:
    """A readable, sortable, unique id: ``<service>-<UTC yyyymmdd-hhmmss>-<4 hex>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{service}-{stamp}-{secrets.token_hex(2)}"
