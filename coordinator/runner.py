"""The rollout runner: the only part of the rollout machinery that awaits.

Theory of operation: for each live rollout the runner holds a *driver*, which is a
``coordinator.engine.Rollout`` plus the KV revision of its persisted record and a lock that
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

One rollout at a time per service: ``deploy`` creates ``fw-<fleet>-locks/<service>`` (value: the
rollout id) before it creates the record; the lock is deleted once the rollout is terminal. A lock
whose rollout is terminal or missing (a crash in between) is stale and taken over.

Failures: a bus error while carrying out commands is retried with backoff for ``COMMAND_DEADLINE``;
if it persists the driver is dropped and rebuilt from KV by the next resync (exactly the restart
path). Every bus call is bounded by ``OP_TIMEOUT``; every task belongs to ``run``'s TaskGroup.

The runner is built in layers: its state, bounded bus calls and reading of records in
``runner_base``, carrying out commands and publishing events in ``persist``, the per-service
lock in ``locks``; here are the feeds, the operator requests and resuming.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from coordinator.engine import (
    Command,
    EmitEvent,
    EngineEvent,
    IllegalTransition,
    NodeOffline,
    NodeOnline,
    ObservedChanged,
    Persist,
    Rollout,
    Start,
    Tick,
    new_record,
    worst_case_size,
)
from coordinator.errors import RemoteError, UsageError
from coordinator.locks import Locks
from coordinator.persist import EVENT_ATTEMPTS, EVENT_BATCH, WRITE_CONCURRENCY, Commands
from coordinator.runner_base import (
    COMMAND_DEADLINE,
    EVENT_QUEUE,
    OP_TIMEOUT,
    STARTUP_GRACE,
    TICK,
    Driver,
    Foreign,
    Liveness,
    RunnerBus,
)
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode, encode
from protocol.errors import BusError, ProtocolError
from protocol.messages import (
    TERMINAL_STATES,
    ObservedState,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
)
from protocol.signing import generate_seed, load_seed, store_seed

log = logging.getLogger("fleetwave.coordinator.runner")

RESYNC_INTERVAL = 30.0
# How long a record change of node progress only may wait for the next Persist (_coalesce).
HOLD_PERSIST = 0.25
PROGRESS_EVENTS = frozenset({"node.done", "node.rolled_back"})

# Every public name this module had before it was split, wherever it is defined now.
__all__ = [
    "COMMAND_DEADLINE", "EVENT_ATTEMPTS", "EVENT_BATCH", "EVENT_QUEUE", "OP_TIMEOUT",
    "RESYNC_INTERVAL", "STARTUP_GRACE", "TICK", "WRITE_CONCURRENCY", "Driver", "Foreign", "Runner",
    "RunnerBus", "coordinator_seed", "new_rollout_id",
]


class Runner(Commands, Locks):
    """Drives every live rollout of one fleet; see the module docstring."""

    # -- the tasks ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch, tick, resume and publish until cancelled (every task owned here)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_loop(), name="runner-observed")
            tg.create_task(self._observed_loop(), name="runner-observed-feed")
            tg.create_task(self._publish_loop(), name="runner-events")
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
                record.report["skipped_offline"] = skipped
            await self._take_lock(spec.service, rid)
            try:
                revision = await self._bounded(self.bus.kv_create(
                    self._rollouts, rid, encode(record)))
            except BusError:
                # A lost reply may hide a write that happened: keep the lock if the record is
                # there (the resync resumes it), release it if not.
                entry = await self._bounded(self.bus.kv_get(self._rollouts, rid))
                if entry is None or entry.value != encode(record):
                    await self._release_lock(spec.service, rid)
                    raise
                revision = entry.revision
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

    # -- resuming ----------------------------------------------------------------------------------

    async def resync(self) -> None:
        """Drive every non-terminal rollout in KV that is not driven yet; release stale locks."""
        for entry in await self._bounded(self.bus.kv_entries(self._rollouts)):
            record = self._decode_record(entry)
            if record is None or record.id in self.drivers or record.id in self.foreign:
                continue
            if record.state in TERMINAL_STATES:
                if record.id not in self._settled:
                    await self._release_lock(record.spec.service, record.id)
                    self._settled.add(record.id)
                continue
            driver = Driver(Rollout(record, fleet=self.fleet), entry.revision)
            self.drivers[record.id] = driver
            log.info("resuming rollout %s (%s, %s %s, wave %d)", record.id, record.state,
                     record.spec.service, record.release.version, record.current_wave)
            try:
                async with driver.lock:
                    for desired in driver.rollout.intended():
                        await self._retrying(functools.partial(self._write_desired, desired))
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
            commands = self._coalesce(driver, before, commands, now)
            try:
                await self._carry_out_all(driver, commands)
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
                    await self._retrying(lambda: self._release_lock(driver.service, driver.id))
                    self._settled.add(driver.id)
                except BusError as exc:  # the next resync releases it: the record is terminal
                    log.warning("cannot release the lock of %s yet: %s", driver.service, exc)
                    self._resync_wanted.set()
                log.info("rollout %s %s", driver.id, driver.rollout.state)

    def _coalesce(self, driver: Driver, before: RolloutRecord, commands: list[Command],
                  now: float) -> list[Command]:
        """Hold back a step that only records node progress (nodes done or rolled back, health
        and versions seen) for up to HOLD_PERSIST, so that the reports of a big wave, arriving in
        many batches, cost a few record writes instead of one each (the record is megabytes at
        thousands of nodes). What is held is persisted, then its events published, ahead of the
        next step's commands, or by the next step that changes nothing (every tick is one).
        Nothing is lost by holding: a coordinator that dies meanwhile never published those
        events, and its successor derives the same progress again from the observed states.
        """
        fresh = not driver.held or now - driver.held_since < HOLD_PERSIST
        if (fresh and commands and isinstance(commands[0], Persist)
                and _progress_only(before, commands)):
            if not driver.held:
                driver.held_since = now
            driver.held = [commands[0], *driver.held[1:], *commands[1:]]
            return []
        if not driver.held:
            return commands
        held, driver.held = driver.held, []
        if commands and isinstance(commands[0], Persist):  # the newer record includes the held
            return [commands[0], *held[1:], *commands[1:]]
        return [*held, *commands]

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


def _progress_only(before: RolloutRecord, commands: list[Command]) -> bool:
    """Whether a step's commands (Persist first) record node progress and nothing else: no
    desired write, only routine node events, and the rollout's own fields and waves as they
    were (so neither a decision nor a deadline waits behind a held Persist)."""
    after = commands[0].record if isinstance(commands[0], Persist) else before
    if any(not isinstance(c, EmitEvent) or c.kind not in PROGRESS_EVENTS for c in commands[1:]):
        return False
    same_nodes = msgspec.structs.replace(after, nodes=before.nodes, revision=before.revision,
                                         updated=before.updated)
    return same_nodes == before


def new_rollout_id(service: str, now: float) -> str:
    """A readable, sortable, unique id: ``<service>-<UTC yyyymmdd-hhmmss>-<4 hex>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{service}-{stamp}-{secrets.token_hex(2)}"


def coordinator_seed(path: Path) -> bytes:
    """The coordinator's signing seed from ``path``, created (0600, atomically) if missing."""
    path = Path(path)
    if path.exists():
        return load_seed(path)  # refuses a file others can read, or one holding no seed
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        seed = generate_seed()
        store_seed(path, seed)
    except OSError as exc:
        raise ProtocolError(f"{path}: cannot create the signing key: {exc.strerror}; pick "
                            "another place with --key-file") from None
    log.warning("created a new signing key in %s", path)
    return seed
