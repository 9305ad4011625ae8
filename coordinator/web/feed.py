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

import msgspec

from protocol import subjects
from protocol.codec import encode
from protocol.errors import BusError, ProtocolError
from protocol.events import received_all
from protocol.messages import Event

if TYPE_CHECKING:
    from coordinator.runtime.daemon import Coordinator

log = logging.getLogger("fleetwave.coordinator.http")

KEEP = 5000  # events kept for the page; a rollout's own story is far shorter
KEEP_BYTES = 16 * 1024**2  # ...and at most this much of them (oldest dropped first)
# What the page keeps of one event: a node may publish any size on its own subject (up to the
# server's max_payload), and each page's snapshot carries the last events of its rollout twice a
# second: 100 events of 200 KB made every snapshot 20 MB and the leader 700 MB with six pages.
MESSAGE_CHARS = 2000
DATA_BYTES = 8 * 1024
BACKFILL = 2000  # events read back from the stream when the surface starts
BACKFILL_TIMEOUT = 15.0


class Feed:
    """Recent events of the fleet, by id, and a condition that is notified on each new one."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coord = coordinator
        self._events: OrderedDict[str, Event] = OrderedDict()
        self._sizes: dict[str, int] = {}  # each kept event's encoded size
        self._bytes = 0
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
        # One entry per id, its size counted once: a pack whose members shared an id (open bus)
        # counted each member's size against one kept entry, and the eviction below then emptied
        # the list and failed on an empty dict at every new event, for good (a review).
        new = {e.id: e for e in events if e.id not in self._events}
        if not new:
            return
        for event, size in map(_lean, new.values()):
            self._events[event.id] = event
            self._sizes[event.id] = size
            self._bytes += size
        while self._events and (len(self._events) > KEEP or self._bytes > KEEP_BYTES):
            gone, _ = self._events.popitem(last=False)
            self._bytes -= self._sizes.pop(gone)
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


def _lean(event: Event) -> tuple[Event, int]:
    """``event`` as the page keeps it (its message cut at MESSAGE_CHARS, its data dropped past
    DATA_BYTES, both said), and its encoded size."""
    size = len(encode(event))
    if size <= DATA_BYTES:
        return event, size
    message, data = event.message, event.data
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS] + f"... ({len(event.message)} characters in all)"
    if len(encode(data)) > DATA_BYTES:
        data = {"dropped": f"data over {DATA_BYTES // 1024} KB (see 'fleetwave events')"}
    lean = msgspec.structs.replace(event, message=message, data=data)
    return lean, len(encode(lean))


async def feed_context(app: Any, feed: Feed) -> AsyncIterator[None]:
    """The task of ``feed`` for as long as ``app`` runs (an aiohttp cleanup context)."""
    task = asyncio.create_task(feed.run(), name="dashboard-feed")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
