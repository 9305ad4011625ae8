"""The event publisher: one queue, one retry policy, for everything the coordinator records.

Theory of operation: producers ``put`` Events and never wait (also before there is a
connection); ``run(sink)`` takes what is queued and
publishes it to the events stream (``fw.<fleet>.evt.<kind>``) in batches: everything queued while
the last batch was out, up to ``EVENT_BATCH``, pipelined and in queue order on one connection.
An event that is not stored is retried with backoff (0.5 s, 1 s, 2 s, ...); JetStream drops a
retried copy of a stored one by its message id, so retrying is harmless. After
``EVENT_ATTEMPTS`` an event is logged and lost: events are the audit trail, never the truth (the
records and the KV buckets are). A full queue drops its oldest event, logged, rather than block
a producer: the node table and the engine must not stall behind a slow stream.

This module needs nothing of the coordinator (only ``protocol`` and a sink that publishes), so
the agent can publish through it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from protocol import subjects
from protocol.codec import encode
from protocol.errors import BusError
from protocol.messages import Event

EVENT_QUEUE = 10_000  # events waiting to be published; then the oldest is dropped
EVENT_ATTEMPTS = 5  # publications of one event before it is logged and lost
EVENT_BATCH = 1024  # events published (pipelined) before their acks are awaited
RETRY_DELAY = 0.5  # the first retry's delay; each next one waits twice as long

log = logging.getLogger("fleetwave.coordinator.events")


class EventSink(Protocol):
    """What the publisher needs of ``protocol.bus.Bus``."""

    async def js_publish_events(
        self, messages: Sequence[tuple[str, bytes]], *, timeout: float = ...,
    ) -> list[BusError | None]: ...


def _source(event: Event) -> str:
    """What an event is about, for log lines: its rollout, else its node."""
    return f"rollout {event.rollout}" if event.rollout else event.node


class EventPublisher:
    """Queues Events and publishes them to the events stream of ``fleet``; see the module."""

    def __init__(self, fleet: str, *, queue: int = EVENT_QUEUE, attempts: int = EVENT_ATTEMPTS,
                 batch: int = EVENT_BATCH, logger: logging.Logger = log) -> None:
        self._fleet = fleet
        self._queue: asyncio.Queue[Event] = asyncio.Queue(queue)
        self._attempts = attempts
        self._batch = batch
        self._log = logger

    def put(self, event: Event) -> None:
        """Queue ``event`` without waiting; a full queue drops (and logs) its oldest."""
        if self._queue.full():
            dropped = self._queue.get_nowait()
            self._log.error("event queue full; dropped %s of %s", dropped.kind, _source(dropped))
        self._queue.put_nowait(event)

    def pending(self) -> list[Event]:
        """Take every event not yet published (tests look at them instead of a stream)."""
        out = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def run(self, sink: EventSink) -> None:
        """Publish queued events through ``sink`` until cancelled."""
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < self._batch:
                batch.append(self._queue.get_nowait())
            await self.publish(sink, batch)

    async def publish(self, sink: EventSink, events: Sequence[Event]) -> None:
        """Publish ``events``, retrying those not stored; after the last attempt, log them."""
        pending = [(subjects.event(self._fleet, e.kind), encode(e), e) for e in events]
        for attempt in range(self._attempts):
            try:
                results = await sink.js_publish_events([(s, d) for s, d, _ in pending])
            except BusError as exc:
                results = [exc] * len(pending)
            failed = [(item, error) for item, error in zip(pending, results, strict=True)
                      if error is not None]
            if not failed:
                return
            if attempt == self._attempts - 1:
                for (_, _, event), error in failed:
                    self._log.error("event %s of %s not recorded: %s", event.kind,
                                    _source(event), error)
                return
            pending = [item for item, _ in failed]
            await asyncio.sleep(RETRY_DELAY * 2**attempt)
