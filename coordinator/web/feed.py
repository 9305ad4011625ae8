"""The dashboard's view of the events stream: the recent events, and a signal when one arrives.

Theory of operation: one task per HTTP surface (owned by the aiohttp app's ``cleanup_ctx``, so
it ends when the surface stops) waits until the coordinator is set up, subscribes to the
fleet's event subjects on the coordinator's own connection (a JetStream publish is delivered to
plain subscribers too), and then reads the stream's last ``BACKFILL`` events, so that a page
opened in the middle of a rollout shows its story from the start. Events are kept by id
(a retried publication delivered twice is one event) in arrival order, at most ``KEEP``; each
new one wakes the open streams (``changed``), which then read the records again.

What it shows is what ``fleetwave events`` shows: the same stream, decoded by the same
``protocol.events.received_all`` (packs expanded; an event a node published on another
node's subject is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from protocol import subjects
from protocol.errors import BusError, ProtocolError
from protocol.events import received_all
from protocol.messages import Event

if TYPE_CHECKING:
    from coordinator.runtime.daemon import Coordinator

log = logging.getLogger("fleetwave.coordinator.http")

KEEP = 5000  # events kept for the page; a rollout's own story is far shorter
BACKFILL = 2000  # events read back from the stream when the surface starts
BACKFILL_TIMEOUT = 15.0


class Feed:
    """Recent events of the fleet, by id, and a condition that is notified on each new one."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coord = coordinator
        self._events: OrderedDict[str, Event] = OrderedDict()
        self.changed = asyncio.Condition()
        self.serial = 0  # grows with every new event: a stream compares it to what it sent

    def of(self, rollout: str, last: int = 200) -> list[Event]:
        """The last ``last`` events of ``rollout``, oldest first."""
        mine = [e for e in self._events.values() if e.rollout == rollout]
        return sorted(mine, key=lambda e: e.time)[-last:]

    def recent(self, last: int = 50) -> list[Event]:
        return sorted(self._events.values(), key=lambda e: e.time)[-last:]

    async def _add(self, subject: str, data: bytes) -> None:
        try:
            events = received_all(self._coord.fleet_name, subject, data)
        except ProtocolError:
            return  # junk, or a node forging another's events: not shown (the daemon logs nodes)
        await self._keep(events)

    async def _keep(self, events: list[Event]) -> None:
        new = [e for e in events if e.id not in self._events]
        if not new:
            return
        for event in new:
            self._events[event.id] = event
        while len(self._events) > KEEP:
            self._events.popitem(last=False)
        self.serial += 1
        async with self.changed:
            self.changed.notify_all()

    async def run(self) -> None:
        """Follow the events until cancelled (see the module docstring)."""
        await self._coord.ready.wait()
        bus = self._coord.bus
        if bus is None:
            return
        fleet = self._coord.fleet_name
        try:
            await bus.subscribe(subjects.events(fleet), self._add)
        except Exception as exc:  # nats-py's own errors: the page then shows no events, says so
            log.error("http: the dashboard cannot follow the events (%s); it shows the records "
                      "only", exc)
            return
        raw: list[tuple[str, bytes]] = []
        try:
            async with asyncio.timeout(BACKFILL_TIMEOUT):
                stream = bus.stream_records(subjects.events_stream(fleet), subjects.events(fleet),
                                            last=BACKFILL)
                async for subject, data in stream:
                    raw.append((subject, data))
        except (BusError, TimeoutError) as exc:
            log.warning("http: the dashboard shows %s: cannot read the events stream back (%s)",
                        "what it read back" if raw else "only events from now on", exc)
        # The last BACKFILL messages hold BACKFILL events or many more (a pack holds up to
        # 250): decoded newest first until BACKFILL events are in hand.
        held: list[list[Event]] = []
        count = 0
        for subject, data in reversed(raw):
            with contextlib.suppress(ProtocolError):  # junk: not shown
                held.append(received_all(fleet, subject, data))
                count += len(held[-1])
            if count >= BACKFILL:
                break
        for events in reversed(held):
            await self._keep(events)


async def feed_context(app: Any, feed: Feed) -> AsyncIterator[None]:
    """The task of ``feed`` for as long as ``app`` runs (an aiohttp cleanup context)."""
    task = asyncio.create_task(feed.run(), name="dashboard-feed")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
