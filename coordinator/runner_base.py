"""The runner's state and its store: bounded bus calls and the rollout records as persisted.

Theory of operation: ``RunnerBase`` holds everything a ``coordinator.runner.Runner`` knows (its
drivers, the cached observed states, the event queue, the revisions of the desired keys it wrote)
and the two ways it calls the bus: ``_bounded`` (one call, at most ``OP_TIMEOUT``; a timeout is a
BusError) and ``_retrying`` (BusError retried with backoff for ``command_deadline``; a Conflict
is never retried, it is an answer). On top of it, ``coordinator.persist`` carries out the
engine's commands, ``coordinator.locks`` holds the one-rollout-per-service lock, and
``coordinator.runner`` drives the rollouts. Reading records here never takes a driver's lock: a
live rollout is read from its driver, anything else from KV.
"""


import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from coordinator.engine import Command, Rollout
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.messages import (
    DesiredState,
    Event,
    NodeView,
    ObservedState,
    RolloutRecord,
    SignedEnvelope,
)

log = logging.getLogger("fleetwave.coordinator.runner")

TICK = 0.2
OP_TIMEOUT = 12.0  # one bus call; the Bus has its own 10 s timeouts inside
COMMAND_DEADLINE = 20.0  # how long one command is retried before the driver is rebuilt from KV
STARTUP_GRACE = 10.0  # > 3 heartbeats of 2 s: time for every live node to beat once
EVENT_QUEUE = 10_000

T = TypeVar("T")
_ROLLOUT_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class RunnerBus(Protocol):
    """What the runner needs of ``protocol.bus.Bus`` (a fake stands in for it in unit tests)."""

    fleet: str

    @property
    def max_payload(self) -> int: ...  # the largest message the server takes; 0: unknown

    async def kv_get(self, bucket: str, key: str) -> Entry | None: ...
    async def kv_put(self, bucket: str, key: str, value: bytes) -> int: ...
    async def kv_create(self, bucket: str, key: str, value: bytes) -> int: ...
    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int: ...
    async def kv_delete(self, bucket: str, key: str, last: int | None = None) -> None: ...
    async def kv_entries(self, bucket: str, pattern: str = ">") -> list[Entry]: ...
    def watch(self, bucket: str, pattern: str) -> AsyncIterator[Entry | None]: ...
    async def kv_update_all(
        self, bucket: str, writes: Sequence[tuple[str, bytes, int]], *, timeout: float = ...,
    ) -> list[int | BusError]: ...
    async def js_publish_events(
        self, messages: Sequence[tuple[str, bytes]], *, timeout: float = ...,
    ) -> list[BusError | None]: ...


# What the node table says of one node: (online now, ever heard from). ``Fleet.liveness``.
Liveness = tuple[bool, bool]


class Foreign(Conflict):
    """Another coordinator wrote our rollout record: we stop driving it."""


@dataclass(eq=False)
class Driver:
    """One live rollout: the engine, the revision of its record in KV, and its event lock."""

    rollout: Rollout
    revision: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # A record change of node progress only, and its events, held back for the next Persist
    # (``Runner._coalesce``) since ``held_since``.
    held: list[Command] = field(default_factory=list)
    held_since: float = 0.0

    @property
    def id(self) -> str:
        return self.rollout.record.id

    @property
    def service(self) -> str:
        return self.rollout.record.spec.service



class RunnerBase:
    """The state of a ``Runner``, its buckets, its bounded bus calls and its reading of records."""

    def __init__(
        self, bus: RunnerBus, *, seed: bytes, nodes: Callable[[], Sequence[NodeView]],
        liveness: Callable[[str], Liveness | None] | None = None,
        clock: Callable[[], float] = time.time, tick: float = TICK,
        startup_grace: float = STARTUP_GRACE, command_deadline: float = COMMAND_DEADLINE,
    ) -> None:
        self.bus = bus
        self.fleet = bus.fleet
        self._seed = seed
        self._nodes = nodes
        self._liveness = liveness  # O(1) per node for the tick; else read off nodes()
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
