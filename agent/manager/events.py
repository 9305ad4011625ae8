"""The manager's events: this node's Events, stamped here and published by the shared publisher.

Every part of the manager reports what happens (a slot started or failed, a desired state
refused, a release that cannot be fetched) through one ``NodeEvents``: ``emit`` stamps an Event
with this node, the service, a fresh id and the clock, and queues it on a
``protocol.events.EventPublisher`` without waiting (before the bus is attached too: the queue is
bounded). The publisher is the coordinator's too: its queue, its retry policy and its bounds are
documented there; ``run`` is its publishing task, once the manager attached the bus.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from protocol.events import EventPublisher, EventSink
from protocol.messages import Event

log = logging.getLogger("fleetwave.agent.services")


class NodeEvents:
    """This node's events, on their way to the fleet's events stream."""

    def __init__(
        self, bus: EventSink | None, fleet: str, node: str, *,
        clock: Callable[[], float] = time.time, publisher: EventPublisher | None = None,
    ) -> None:
        self.bus = bus  # None until the manager attaches it: events queue meanwhile
        self.fleet = fleet
        self.node = node
        self.clock = clock
        self.publisher = publisher or EventPublisher(fleet, logger=log, agent=True)

    def emit(self, kind: str, service: str, message: str, **data: Any) -> None:
        """Queue one event (``None`` values are left out of its data); never waits."""
        self.publisher.put(Event(
            id=uuid.uuid4().hex,
            time=self.clock(),
            fleet=self.fleet,
            kind=kind,
            message=message,
            node=self.node,
            service=service,
            data={k: v for k, v in data.items() if v is not None},
        ))

    async def run(self) -> None:
        """Publish the queued events, for ever (until cancelled); the bus is attached."""
        assert self.bus is not None, "run() before the bus is attached"
        await self.publisher.run(self.bus)
