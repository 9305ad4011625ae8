"""Carrying out the engine's commands: persist the record, write desired states, emit events.

Theory of operation: ``_carry_out_all`` takes the commands of one engine step in order. A
``Persist`` is a compare-and-set on the record's last revision (a Conflict whose stored value is
not ours means another coordinator drives the rollout: ``Foreign``); it happens before anything
after it. The desired writes between two Persists go out concurrently (different keys; for one
key only the newest generation counts), each signed and written only if the stored generation is
lower, so re-issuing them is harmless. Events are queued after the writes they announce and
published in order by ``_publish_loop``, several awaiting their acks at once; an event that
cannot be published after ``EVENT_ATTEMPTS`` is logged and lost (the record is the truth).
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
from coordinator.runner_base import OP_TIMEOUT, Driver, Foreign, RunnerBase
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
WRITE_CONCURRENCY = 64  # desired writes in flight at once (each is one KV round trip)
EVENTS_IN_FLIGHT = 128  # event publishes awaiting their JetStream ack at once


class Commands(RunnerBase):
    """The command and event methods of ``coordinator.runner.Runner``."""

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


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
