"""The manager's events: queued without awaiting, published in order to the events stream.

Every part of the manager reports what happens (a slot started or failed, a desired state
refused, a release that cannot be fetched) through one ``EventQueue``: ``emit`` never waits and
never fails (a full queue drops the event with a warning), and ``run`` publishes the queue in
order, each publish bounded by ``BUS_TIMEOUT`` and tried three times.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent.manager.service import BUS_TIMEOUT
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import encode
from protocol.errors import BusError
from protocol.messages import Event

log = logging.getLogger("fleetwave.agent.services")

QUEUE = 10_000  # events held while the bus is away; more are dropped
ATTEMPTS = 3


class EventQueue:
    """This node's events, in order, on their way to the fleet's events stream."""

    def __init__(
        self, bus: Bus, fleet: str, node: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        self.node = node
        self.clock = clock
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=QUEUE)

    def emit(self, kind: str, service: str, message: str, **data: Any) -> None:
        """Queue one event (``None`` values are left out of its data); never waits."""
        ev = Event(
            id=uuid.uuid4().hex,
            time=self.clock(),
            fleet=self.fleet,
            kind=kind,
            message=message,
            node=self.node,
            service=service,
            data={k: v for k, v in data.items() if v is not None},
        )
        try:
            self._queue.put_nowait(ev)
        except asyncio.QueueFull:
            log.warning("event queue full; dropped %s %s", kind, message)

    async def run(self) -> None:
        """Publish the queued events in order, for ever (until cancelled)."""
        while True:
            ev = await self._queue.get()
            for attempt in range(ATTEMPTS):
                try:
                    async with asyncio.timeout(BUS_TIMEOUT):
                        await self.bus.js_publish(subjects.event(self.fleet, ev.kind), encode(ev))
                    break
                except (BusError, TimeoutError) as exc:
                    log.warning(
                        "cannot publish event %s (%s); attempt %d", ev.kind, exc, attempt + 1
                    )
                    await asyncio.sleep(0.5 * (attempt + 1))
