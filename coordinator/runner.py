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
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

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
    WriteDesired,
    new_record,
)
from coordinator.errors import RemoteError, UsageError
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.messages import (
    TERMINAL_STATES,
    DesiredState,
    Event,
    NodeView,
    ObservedState,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
    SignedEnvelope,
)
from protocol.signing import generate_seed, load_seed, sign, store_seed

log = logging.getLogger("fleetwave.coordinator.runner")

TICK = 0.2
OP_TIMEOUT = 12.0  # one bus call; the Bus has its own 10 s timeouts inside
COMMAND_DEADLINE = 20.0  # how long one command is retried before the driver is rebuilt from KV
STARTUP_GRACE = 10.0  # > 3 heartbeats of 2 s: time for every live node to beat once
RESYNC_INTERVAL = 30.0
EVENT_QUEUE = 10_000
EVENT_ATTEMPTS = 5
WRITE_CONCURRENCY = 64  # desired writes in flight at once (each is one KV round trip)
EVENTS_IN_FLIGHT = 128  # event publishes awaiting their JetStream ack at once

T = TypeVar("T")
_ROLLOUT_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class RunnerBus(Protocol):
    """What the runner needs of ``protocol.bus.Bus`` (a fake stands in for it in unit tests)."""

    fleet: str

    async def kv_get(self, bucket: str, key: str) -> Entry | None: ...
    async def kv_put(self, bucket: str, key: str, value: bytes) -> int: ...
    async def kv_create(self, bucket: str, key: str, value: bytes) -> int: ...
    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int: ...
    async def kv_delete(self, bucket: str, key: str, last: int | None = None) -> None: ...
    async def kv_entries(self, bucket: str, pattern: str = ">") -> list[Entry]: ...
    def watch(self, bucket: str, pattern: str) -> AsyncIterator[Entry | None]: ...
    async def js_publish(self, subject: str, data: bytes) -> None: ...


class Foreign(Conflict):
    """Another coordinator wrote our rollout record: we stop driving it."""


@dataclass(eq=False)
class Driver:
    """One live rollout: the engine, the revision of its record in KV, and its event lock."""

    rollout: Rollout
    revision: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def id(self) -> str:
        return self.rollout.record.id

    @property
    def service(self) -> str:
        return self.rollout.record.spec.service


class Runner:
    """Drives every live rollout of one fleet; see the module docstring."""

    def __init__(
        self, bus: RunnerBus, *, seed: bytes, nodes: Callable[[], Sequence[NodeView]],
        clock: Callable[[], float] = time.time, tick: float = TICK,
        startup_grace: float = STARTUP_GRACE, command_deadline: float = COMMAND_DEADLINE,
    ) -> None:
        self.bus = bus
        self.fleet = bus.fleet
        self._seed = seed
        self._nodes = nodes
        self._clock = clock
        self._tick = tick
        self._grace = startup_grace
        self._command_deadline = command_deadline
        self.started = clock()
        self.drivers: dict[str, Driver] = {}
        self.observed: dict[tuple[str, str], ObservedState] = {}
        self.foreign: set[str] = set()
        self._settled: set[str] = set()  # terminal rollouts whose lock is known released
        self._deploying = asyncio.Lock()
        self._events: asyncio.Queue[Event] = asyncio.Queue(EVENT_QUEUE)
        self.synced = asyncio.Event()  # the observed watch delivered its first snapshot
        self.ready = asyncio.Event()  # ... and every live rollout was resumed
        self._resync_wanted = asyncio.Event()
        self._complained: set[str] = set()
        self._inbox: list[Entry | None] = []
        self._inbox_ready = asyncio.Event()
        # (revision, generation) of every desired key this runner wrote: the next write of the
        # key is then one compare-and-set instead of a read and a write (a miss reads first).
        self._desired_revs: dict[str, tuple[int, int]] = {}

    # -- buckets -----------------------------------------------------------------------------------

    @property
    def _rollouts(self) -> str:
        return subjects.rollouts_bucket(self.fleet)

    @property
    def _desired(self) -> str:
        return subjects.desired_bucket(self.fleet)

    @property
    def _locks(self) -> str:
        return subjects.locks_bucket(self.fleet)

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

    async def _publish_loop(self) -> None:
        """Publish queued events, up to EVENTS_IN_FLIGHT awaiting their acks at once (a wave
        emits two per node; one ack at a time would trail the rollout by seconds). They leave
        in queue order on the one connection, so the stream keeps that order unless a publish
        has to be retried."""
        slots = asyncio.Semaphore(EVENTS_IN_FLIGHT)
        async with asyncio.TaskGroup() as tg:
            while True:
                event = await self._events.get()
                await slots.acquire()
                task = tg.create_task(self._publish(event))
                task.add_done_callback(lambda _: slots.release())

    async def _publish(self, event: Event) -> None:
        data = encode(event)
        subject = subjects.event(self.fleet, event.kind)
        for attempt in range(EVENT_ATTEMPTS):
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    await self.bus.js_publish(subject, data)
                break
            except (BusError, TimeoutError) as exc:
                if attempt == EVENT_ATTEMPTS - 1:
                    log.error("event %s of rollout %s not recorded: %s", event.kind,
                              event.rollout, exc)
                else:
                    await asyncio.sleep(0.5 * 2**attempt)

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
        """One tick: tell every rollout which target nodes went offline or came back, then Tick."""
        if not self.drivers:
            return  # the node table costs O(fleet) to build: not when nothing needs it
        now = self._clock()
        views = {v.id: v for v in self._nodes()}
        for driver in list(self.drivers.values()):
            for node, progress in driver.rollout.record.nodes.items():
                online = self._online(views.get(node), now)
                if online is not None and online != progress.online:
                    event = NodeOnline(node) if online else NodeOffline(node)
                    await self._feed_quietly(driver, event)
            await self._feed_quietly(driver, Tick())

    def _online(self, view: NodeView | None, now: float) -> bool | None:
        """What the node table says of a node, or None while it cannot know yet."""
        if view is not None and view.online:
            return True
        heard = view is not None and view.last_seen is not None
        if heard or now - self.started >= self._grace:
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

    # -- reading -----------------------------------------------------------------------------------

    async def get(self, rollout_id: str) -> RolloutRecord | None:
        """A rollout's record: the live one if driven here, else as persisted."""
        if (driver := self.drivers.get(rollout_id)) is not None:
            return driver.rollout.record
        if not _ROLLOUT_ID.match(rollout_id):
            return None
        entry = await self._bounded(self.bus.kv_get(self._rollouts, rollout_id))
        if entry is None or entry.value is None:
            return None
        return self._decode_record(entry)

    async def records(self) -> list[RolloutRecord]:
        """Every rollout of the fleet, newest first (live ones as they are now)."""
        entries = await self._bounded(self.bus.kv_entries(self._rollouts))
        out = {}
        for entry in entries:
            if (rec := self._decode_record(entry)) is not None:
                out[rec.id] = rec
        for rid, driver in self.drivers.items():
            out[rid] = driver.rollout.record
        return sorted(out.values(), key=lambda r: (r.created, r.id), reverse=True)

    async def current_desired(self, service: str) -> dict[str, DesiredState]:
        """Every node's current desired state of ``service``, from the desired bucket."""
        entries = await self._bounded(self.bus.kv_entries(self._desired, f"*.{service}"))
        out: dict[str, DesiredState] = {}
        for entry in entries:
            try:
                env = decode(SignedEnvelope, entry.value or b"")
                desired = decode(DesiredState, env.payload)
            except ProtocolError as exc:
                raise BusError(f"desired state {entry.key} is unreadable ({exc}); was it written "
                               "by another tool? delete the key to start that node afresh"
                               ) from None
            out[desired.node] = desired
        return out

    def _decode_record(self, entry: Entry) -> RolloutRecord | None:
        try:
            return decode(RolloutRecord, entry.value or b"")
        except ProtocolError as exc:
            if entry.key not in self._complained:
                self._complained.add(entry.key)
                log.error("ignoring unreadable rollout record %s: %s", entry.key, exc)
            return None

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
            commands = (driver.rollout.handle_all([event, *more], now) if more
                        else driver.rollout.handle(event, now))
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

    async def _carry_out_all(self, driver: Driver, commands: Sequence[Command]) -> None:
        """Carry out ``commands``: each Persist before anything after it, the desired writes
        between two Persists concurrently (different keys; for one key only the newest
        generation counts), then the events among them, which thus never announce a write
        before it is done."""
        writes: dict[str, DesiredState] = {}
        events: list[Command] = []

        async def flush() -> None:
            if writes:
                sem = asyncio.Semaphore(WRITE_CONCURRENCY)

                async def one(desired: DesiredState) -> None:
                    async with sem:
                        await self._retrying(lambda: self._write_desired(desired))

                pending = list(writes.values())
                writes.clear()
                async with asyncio.TaskGroup() as tg:
                    for desired in pending:
                        tg.create_task(one(desired))
            for event in events:
                await self._carry_out(driver, event)
            events.clear()

        try:
            for command in commands:
                if isinstance(command, Persist):
                    await flush()
                    await self._carry_out(driver, command)
                elif isinstance(command, WriteDesired):
                    key = subjects.node_service_key(command.desired.node, command.desired.service)
                    old = writes.get(key)
                    if old is None or old.generation <= command.desired.generation:
                        writes[key] = command.desired
                else:
                    events.append(command)
            await flush()
        except BaseExceptionGroup as group:  # a failed concurrent write: raise the first cause
            raise _first(group) from None

    async def _carry_out(self, driver: Driver, command: Command) -> None:
        match command:
            case Persist(record=record):
                await self._retrying(lambda: self._persist(driver, record))
            case WriteDesired(desired=desired):
                await self._retrying(lambda: self._write_desired(desired))
            case EmitEvent(kind=kind, message=message, node=node, data=data):
                self._emit(driver.rollout.record, kind, message, node, data)

    async def _persist(self, driver: Driver, record: RolloutRecord) -> None:
        data = encode(record)
        try:
            driver.revision = await self._bounded(
                self.bus.kv_update(self._rollouts, record.id, data, driver.revision))
        except Conflict:
            entry = await self._bounded(self.bus.kv_get(self._rollouts, record.id))
            if entry is not None and entry.value == data:  # ours: the reply was lost, not the write
                driver.revision = entry.revision
                return
            raise Foreign(f"rollout {record.id} was changed by another coordinator (revision "
                          f"{entry.revision if entry else 'deleted'}, ours {driver.revision}); "
                          "this one stops driving it") from None

    async def _write_desired(self, desired: DesiredState) -> bool:
        """Sign and store ``desired`` unless the stored generation is >=; True if written."""
        key = subjects.node_service_key(desired.node, desired.service)
        known = self._desired_revs.pop(key, None)
        if known is not None and known[1] < desired.generation:
            data = encode(sign(self._seed, desired))
            try:
                rev = await self._bounded(self.bus.kv_update(self._desired, key, data, known[0]))
                self._desired_revs[key] = (rev, desired.generation)
                return True
            except Conflict:
                pass  # written by someone else since: read it and compare generations
        for _ in range(5):
            entry = await self._bounded(self.bus.kv_get(self._desired, key))
            if entry is not None and entry.value is not None:
                try:
                    stored = decode(SignedEnvelope, entry.value).generation
                except ProtocolError:
                    stored = 0  # unreadable: replace it with a valid state
                if stored >= desired.generation:
                    return False
            data = encode(sign(self._seed, desired))
            try:
                if entry is None:
                    rev = await self._bounded(self.bus.kv_create(self._desired, key, data))
                else:
                    rev = await self._bounded(self.bus.kv_update(self._desired, key, data,
                                                                 entry.revision))
                self._desired_revs[key] = (rev, desired.generation)
                return True
            except Conflict:
                continue  # written in between: read again and compare generations
        raise BusError(f"desired state {key} keeps changing under us; is a second coordinator "
                       "writing it?")

    def _emit(self, record: RolloutRecord, kind: str, message: str, node: str,
              data: dict[str, object]) -> None:
        event = Event(id=uuid.uuid4().hex, time=self._clock(), fleet=self.fleet, kind=kind,
                      message=message, node=node, service=record.spec.service,
                      rollout=record.id, data=dict(data))
        log.info("rollout %s: %s %s", record.id, kind, message)
        if self._events.full():
            dropped = self._events.get_nowait()
            log.error("event queue full; dropped %s of %s", dropped.kind, dropped.rollout)
        self._events.put_nowait(event)

    def pending_events(self) -> list[Event]:
        """Events not yet published (tests look at them; the publisher drains them)."""
        out = []
        while not self._events.empty():
            out.append(self._events.get_nowait())
        return out

    # -- the per-service lock ----------------------------------------------------------------------

    async def _take_lock(self, service: str, rollout_id: str) -> None:
        for _ in range(2):
            try:
                await self._bounded(self.bus.kv_create(self._locks, service, rollout_id.encode()))
                return
            except Conflict:
                entry = await self._bounded(self.bus.kv_get(self._locks, service))
                if entry is None or entry.value is None:
                    continue  # released in between
                holder = entry.value.decode(errors="replace")
                record = await self.get(holder)
                if record is not None and record.state not in TERMINAL_STATES:
                    raise Conflict(
                        f"service {service} already has rollout {holder} {record.state}; wait "
                        f"for it ('fleetwave status {holder}') or stop it with 'fleetwave abort "
                        f"{holder}'") from None
                log.warning("taking over the stale lock of %s from %s rollout %s", service,
                            record.state if record else "missing", holder)
                try:
                    await self._bounded(self.bus.kv_delete(self._locks, service, entry.revision))
                except Conflict:
                    continue
        raise Conflict(f"the lock of service {service} keeps changing; try again")

    async def _release_lock(self, service: str, rollout_id: str) -> None:
        entry = await self._bounded(self.bus.kv_get(self._locks, service))
        if entry is None or entry.value != rollout_id.encode():
            return  # not ours (anymore)
        try:
            await self._bounded(self.bus.kv_delete(self._locks, service, entry.revision))
        except Conflict:
            return  # someone changed it in between: no longer ours to release

    # -- bounding and retrying ---------------------------------------------------------------------

    async def _bounded(self, work: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                return await work
        except TimeoutError:
            raise BusError(f"NATS did not answer within {OP_TIMEOUT:g}s") from None

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` until it succeeds; BusError is retried with backoff up to the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._command_deadline
        delay = 0.1
        while True:
            try:
                return await op()
            except Conflict:
                raise
            except BusError as exc:
                if loop.time() + delay > deadline:
                    raise
                log.warning("retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


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
