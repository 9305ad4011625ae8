"""Carrying out the engine's commands: persist the record, write desired states, emit events.

Theory of operation: ``_carry_out_all`` takes the commands of one engine step in order. A
``Persist`` is a compare-and-set on the record's last revision (a Conflict whose stored value is
not ours means another coordinator drives the rollout: ``Foreign``); it happens before anything
after it. The desired writes between two Persists go out together (different keys; for one key
only the newest generation counts), each signed and written only if the stored generation is
lower, so re-issuing them is harmless: a key whose revision this runner knows is one pipelined
compare-and-set (``Bus.kv_update_all``), any other, or one that lost its compare-and-set, is read
and compared first (``_write_desired``). Events are queued after the writes they announce and
published in order by ``_publish_loop``, everything queued while a batch is out going in the next
one, pipelined; an event that cannot be published after ``EVENT_ATTEMPTS`` is logged and lost
(the record is the truth).
"""


import asyncio
import logging
import uuid
from collections.abc import Sequence

from coordinator.engine import (
    Command,
    EmitEvent,
    Persist,
    WriteDesired,
)
from coordinator.runner_base import Driver, Foreign, RunnerBase
from protocol import subjects
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.messages import (
    DesiredState,
    Event,
    RolloutRecord,
    SignedEnvelope,
)
from protocol.signing import sign

log = logging.getLogger("fleetwave.coordinator.runner")

EVENT_ATTEMPTS = 5
WRITE_CONCURRENCY = 64  # desired writes read-then-written at once (each is two KV round trips)
EVENT_BATCH = 1024  # events published (pipelined) before their acks are awaited
# Routine progress of one node: logged at debug level only (a failure is always logged).
QUIET_EVENTS = frozenset({"node.updating", "node.done", "node.rolled_back"})


class Commands(RunnerBase):
    """The command and event methods of ``coordinator.runner.Runner``."""

    async def _publish_loop(self) -> None:
        """Publish queued events in batches: everything queued while the last batch was out
        (a wave emits two per node), pipelined, in queue order on the one connection."""
        while True:
            batch = [await self._events.get()]
            while not self._events.empty() and len(batch) < EVENT_BATCH:
                batch.append(self._events.get_nowait())
            await self._publish(batch)

    async def _publish(self, events: list[Event]) -> None:
        """Publish ``events``, retrying those not stored with backoff (the message id makes a
        retry of a stored event harmless); after EVENT_ATTEMPTS an event is logged and lost."""
        pending = [(subjects.event(self.fleet, e.kind), encode(e), e) for e in events]
        for attempt in range(EVENT_ATTEMPTS):
            try:
                results = await self.bus.js_publish_events([(s, d) for s, d, _ in pending])
            except BusError as exc:
                results = [exc] * len(pending)
            failed = [(item, error) for item, error in zip(pending, results, strict=True)
                      if error is not None]
            if not failed:
                return
            if attempt == EVENT_ATTEMPTS - 1:
                for (_, _, event), error in failed:
                    log.error("event %s of rollout %s not recorded: %s", event.kind,
                              event.rollout, error)
                return
            pending = [item for item, _ in failed]
            await asyncio.sleep(0.5 * 2**attempt)

    async def _carry_out_all(self, driver: Driver, commands: Sequence[Command]) -> None:
        """Carry out ``commands``: each Persist before anything after it, the desired writes
        between two Persists concurrently (different keys; for one key only the newest
        generation counts), then the events among them, which thus never announce a write
        before it is done."""
        writes: dict[str, DesiredState] = {}
        events: list[Command] = []

        async def flush() -> None:
            if writes:
                pending = list(writes.values())
                writes.clear()
                await self._write_all(pending)
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
            case EmitEvent(kind=kind, message=message, node=node, data=data, time=when):
                self._emit(driver.rollout.record, kind, message, node, data, when)

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

    async def _write_all(self, pending: Sequence[DesiredState]) -> None:
        """Write ``pending`` (one per key): those whose stored revision this runner knows as one
        pipelined batch of compare-and-sets, the rest (and those that lost theirs) through
        ``_write_desired``, WRITE_CONCURRENCY at a time."""
        known: list[tuple[str, DesiredState, int]] = []
        slow: list[DesiredState] = []
        for desired in pending:
            key = subjects.node_service_key(desired.node, desired.service)
            rev = self._desired_revs.get(key)
            if rev is not None and rev[1] < desired.generation:
                known.append((key, desired, rev[0]))
            else:
                slow.append(desired)
        if known:
            for key, _, _ in known:
                del self._desired_revs[key]  # unknown until this write's ack says otherwise
            try:
                results: list[int | BusError] = await self.bus.kv_update_all(
                    self._desired,
                    [(key, encode(sign(self._seed, d)), rev) for key, d, rev in known])
            except BusError as exc:
                results = [exc] * len(known)
            for (key, desired, _), result in zip(known, results, strict=True):
                if isinstance(result, int):
                    self._desired_revs[key] = (result, desired.generation)
                else:
                    slow.append(desired)  # read it and compare generations, then write
        if slow:
            sem = asyncio.Semaphore(WRITE_CONCURRENCY)

            async def one(desired: DesiredState) -> None:
                async with sem:
                    await self._retrying(lambda: self._write_desired(desired))

            async with asyncio.TaskGroup() as tg:
                for desired in slow:
                    tg.create_task(one(desired))

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
              data: dict[str, object], when: float | None = None) -> None:
        """Queue an event; its time is the decision's (the engine's ``now``) when given, so
        that the audit trail says when things were decided, not when the writes they announce
        were done."""
        event = Event(id=uuid.uuid4().hex, time=self._clock() if when is None else when,
                      fleet=self.fleet, kind=kind,
                      message=message, node=node, service=record.spec.service,
                      rollout=record.id, data=dict(data))
        # Thousands of lines a rollout otherwise: the event stream (``fleetwave events``) has them.
        log.log(logging.DEBUG if kind in QUIET_EVENTS else logging.INFO, "rollout %s: %s %s",
                record.id, kind, message)
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


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
