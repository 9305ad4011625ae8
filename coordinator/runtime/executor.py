"""Carrying out the engine's commands: persist the record, write desired states, emit events.

Theory of operation: ``carry_out`` takes the commands of one engine step in order. A ``Persist``
writes the record through the leader's fence (``RolloutStore.persist``; ``Deposed`` when another
coordinator leads); it happens before anything after it. The desired writes between two Persists
go out together (different keys; for one key only the newest generation counts) through the
``DesiredWriter``. Events are queued on the ``EventPublisher`` after the writes they announce, so
an event never announces a write before it is done; their time is the decision's (the engine's
``now``), so the audit trail says when things were decided.

The outbox: the events that follow a Persist are that decision's, and they are made (with their
ids) before it and written *inside* the record (``RolloutRecord.outbox``), together with every
earlier event of the rollout that the stream has not acknowledged yet (``Driver.outbox``). A
coordinator that dies after the record write and before the publish leaves them there, and the
one that resumes the rollout publishes them again; their message id is a digest of their bytes,
so the stream stores each once. Since an event is made whole before the record that carries it is
written, what it says (its ``who`` among the rest) is what is published again.

Packs: the node events of one decision (a wave's start names a thousand nodes) go out as few
messages: each run of them whose nodes one page of the record keeps, cut where the decision's
first write comes, becomes one pack when it holds two or more (``protocol.events.pack``),
made with the decision, kept in the outbox and on that page as one event, published once, where
its last member would have been (so it never announces a write before it is done), and the same
bytes again after a takeover. Readers expand packs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import msgspec

from coordinator.core.engine import Command, EmitEvent, Persist, WriteDesired
from coordinator.runtime.calls import Retrying
from coordinator.runtime.desired import DesiredWriter
from coordinator.runtime.driver import Driver
from coordinator.runtime.store import RolloutStore
from protocol import subjects
from protocol.events import PACK, EventPublisher, event_id, pack
from protocol.messages import DesiredState, Event, RolloutRecord

log = logging.getLogger("fleetwave.coordinator.runner")

# Routine progress of one node: logged at debug level only (a failure is always logged).
QUIET_EVENTS = frozenset({"node.updating", "node.done", "node.rolled_back", "node.staging",
                          "node.staged", PACK})
NODE_EVENTS = QUIET_EVENTS - {PACK}  # what a pack carries
# Node events of one decision packed together, at most (a pack stays well within a page's room
# for its nodes' events: ``coordinator.core.pages``).
PACK_MAX = 250
# Told of every event of a decision as it is queued, with the record that decided it (None for a
# deploy refused before any record existed): the coordinator's /metrics counts gate decisions and
# times rollouts here, on the one path every rollout event takes.
Observe = Callable[[Event, RolloutRecord | None], None]


class Executor:
    """Carries out commands for the drivers of one fleet; see the module docstring."""

    def __init__(self, *, store: RolloutStore, desired: DesiredWriter, events: EventPublisher,
                 retrying: Retrying, clock: Callable[[], float],
                 observe: Observe | None = None) -> None:
        self.store = store
        self.observe = observe
        self.desired = desired
        self.events = events
        self._retrying = retrying
        self._clock = clock

    async def carry_out(self, driver: Driver, commands: Sequence[Command]) -> None:
        """Carry out ``commands``: each Persist (with its events in the outbox) before anything
        after it, the desired writes between two Persists concurrently, then the events among
        them; an event that comes before every write of its Persist's commands goes out at
        once, before those writes."""
        writes: dict[str, DesiredState] = {}
        events: list[Event] = []

        async def flush() -> None:
            if writes:
                pending = list(writes.values())
                writes.clear()
                await self.desired.write_all(pending)
            for event in events:
                self.publish(event, driver.rollout.record)
            events.clear()

        made = self._events(driver.rollout.record, commands)
        # The events of each Persist's decision: those after it, up to the next Persist.
        decided: dict[int, list[int]] = {}
        last: list[int] | None = None
        for i, command in enumerate(commands):
            if isinstance(command, Persist):
                last = decided[i] = []
            elif i in made and last is not None:
                last.append(i)
        # What goes out at each EmitEvent: its event, its pack (at the pack's last member),
        # or nothing (a member of a pack that goes out later).
        out: dict[int, Event | None] = dict(made)
        page_of = self.store.page_of(driver.id)
        writes_at = [i for i, c in enumerate(commands) if isinstance(c, WriteDesired)]
        for at, indexes in decided.items():
            first_write = next((w for w in writes_at if w > at), len(commands))
            for part in _parts(indexes, made, page_of, first_write):
                out.update(dict.fromkeys(part[:-1]))
                out[part[-1]] = pack([made[j] for j in part])
        for i, command in enumerate(commands):
            match command:
                case Persist(record=record):
                    await flush()
                    for j in decided[i]:
                        if (event := out[j]) is not None:
                            driver.outbox[event.id] = event
                    await self.persist(driver, record)
                case WriteDesired(desired=desired):
                    key = subjects.node_service_key(desired.node, desired.service)
                    old = writes.get(key)
                    if old is None or old.generation <= desired.generation:
                        writes[key] = desired
                case EmitEvent():
                    event = out[i]
                    if event is None:
                        continue  # a pack's member: the pack goes out at its last one
                    if writes:
                        events.append(event)
                    else:
                        # Nothing written since the Persist: it announces no write of this
                        # step, so it need not wait for them (a rollback's switch back is
                        # told before the 10,000 writes that retire the new slots).
                        self.publish(event, driver.rollout.record)
        await flush()

    async def persist(self, driver: Driver, record: RolloutRecord) -> None:
        """Persist ``record`` with the driver's outbox (retried); Deposed if we do not lead."""
        driver.bound_outbox()
        stored = msgspec.structs.replace(record, outbox=list(driver.outbox.values()),
                                         term=self.store.writer.term)
        touched = set(driver.rollout.touched)
        driver.revision = await self._retrying(lambda: self.store.persist(stored, touched))
        driver.rollout.persisted(record)
        driver.outbox_stored = bool(stored.outbox)
        driver.persisted_at = self._clock()

    def _events(self, record: RolloutRecord, commands: Sequence[Command]) -> dict[int, Event]:
        """The Event of every EmitEvent of ``commands``, by its index."""
        out: dict[int, Event] = {}
        for i, command in enumerate(commands):
            if isinstance(command, EmitEvent):
                out[i] = Event(
                    id=event_id(),
                    time=self._clock() if command.time is None else command.time,
                    fleet=self.store.fleet, kind=command.kind, message=command.message,
                    node=command.node, service=record.spec.service, rollout=record.id,
                    data=dict(command.data), who=command.who)
        return out

    def publish(self, event: Event, record: RolloutRecord | None) -> None:
        """Queue ``event`` (decided by ``record``) for the publisher, and tell the observer."""
        # Thousands of lines a rollout otherwise: the event stream (``fleetwave events``) has them.
        log.log(logging.DEBUG if event.kind in QUIET_EVENTS else logging.INFO,
                "rollout %s: %s %s", event.rollout or "-", event.kind, event.message)
        self.events.put(event)
        if self.observe is not None:
            try:
                self.observe(event, record)
            except Exception:  # a metric's bug must never stop a rollout
                log.exception("event observer failed on %s", event.kind)


def _parts(indexes: Sequence[int], made: Mapping[int, Event], page_of: Mapping[str, int],
           first_write: int) -> list[list[int]]:
    """The packs of one decision's events (``indexes`` into ``made``, in order): each run of
    consecutive node events whose nodes' progress one page of the record keeps (``page_of``),
    cut where the decision's first write comes (the events before it go out at once, those
    after it once the writes are done), in parts of two to PACK_MAX; a lone one goes out
    alone. Runs keep the stream in the decision's order (a wave's nodes are on consecutive
    pages, so its events make few runs)."""
    parts: list[list[int]] = []
    run: list[int] = []
    run_page: int | None = None

    def close() -> None:
        parts.extend(run[k:k + PACK_MAX] for k in range(0, len(run), PACK_MAX)
                     if len(run[k:k + PACK_MAX]) > 1)
        run.clear()

    for j in indexes:
        event = made[j]
        page = page_of.get(event.node) if event.kind in NODE_EVENTS else None
        if page is None or page != run_page or (run and run[-1] < first_write < j):
            close()
        run_page = page
        if page is not None:
            run.append(j)
    close()
    return parts
