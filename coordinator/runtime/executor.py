"""Carrying out the engine's commands: persist the record, write desired states, emit events.

Theory of operation: ``carry_out`` takes the commands of one engine step in order. A ``Persist``
is a compare-and-set on the record's last revision (``RolloutStore.persist``; ``Foreign`` when
another coordinator drives the rollout); it happens before anything after it. The desired writes
between two Persists go out together (different keys; for one key only the newest generation
counts) through the ``DesiredWriter``. Events are queued on the ``EventPublisher`` after the
writes they announce, so an event never announces a write before it is done; their time is the
decision's (the engine's ``now``), so the audit trail says when things were decided.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence

from coordinator.core.engine import Command, EmitEvent, Persist, WriteDesired
from coordinator.runtime.calls import Retrying
from coordinator.runtime.desired import DesiredWriter
from coordinator.runtime.driver import Driver
from coordinator.runtime.store import RolloutStore
from protocol import subjects
from protocol.events import EventPublisher
from protocol.messages import DesiredState, Event, RolloutRecord

log = logging.getLogger("fleetwave.coordinator.runner")

# Routine progress of one node: logged at debug level only (a failure is always logged).
QUIET_EVENTS = frozenset({"node.updating", "node.done", "node.rolled_back"})


class Executor:
    """Carries out commands for the drivers of one fleet; see the module docstring."""

    def __init__(self, *, store: RolloutStore, desired: DesiredWriter, events: EventPublisher,
                 retrying: Retrying, clock: Callable[[], float]) -> None:
        self.store = store
        self.desired = desired
        self.events = events
        self._retrying = retrying
        self._clock = clock

    async def carry_out(self, driver: Driver, commands: Sequence[Command]) -> None:
        """Carry out ``commands``: each Persist before anything after it, the desired writes
        between two Persists concurrently, then the events among them."""
        writes: dict[str, DesiredState] = {}
        events: list[EmitEvent] = []

        async def flush() -> None:
            if writes:
                pending = list(writes.values())
                writes.clear()
                await self.desired.write_all(pending)
            for event in events:
                self.emit(driver.rollout.record, event)
            events.clear()

        try:
            for command in commands:
                match command:
                    case Persist(record=record):
                        await flush()
                        await self.persist(driver, record)
                    case WriteDesired(desired=desired):
                        key = subjects.node_service_key(desired.node, desired.service)
                        old = writes.get(key)
                        if old is None or old.generation <= desired.generation:
                            writes[key] = desired
                    case EmitEvent():
                        events.append(command)
            await flush()
        except BaseExceptionGroup as group:  # a failed concurrent write: raise the first cause
            raise _first(group) from None

    async def persist(self, driver: Driver, record: RolloutRecord) -> None:
        """Persist ``record`` on the driver's revision (retried); Foreign if not ours."""
        driver.revision = await self._retrying(
            lambda: self.store.persist(record, driver.revision))

    def emit(self, record: RolloutRecord, command: EmitEvent) -> None:
        """Queue the event of ``command`` about ``record`` for the publisher."""
        kind = command.kind
        event = Event(id=uuid.uuid4().hex,
                      time=self._clock() if command.time is None else command.time,
                      fleet=self.store.fleet, kind=kind, message=command.message,
                      node=command.node, service=record.spec.service, rollout=record.id,
                      data=dict(command.data))
        # Thousands of lines a rollout otherwise: the event stream (``fleetwave events``) has them.
        log.log(logging.DEBUG if kind in QUIET_EVENTS else logging.INFO, "rollout %s: %s %s",
                record.id, kind, command.message)
        self.events.put(event)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
