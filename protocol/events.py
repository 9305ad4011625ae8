"""The event publisher: one queue and one retry policy for every process that records Events.

The coordinator (its runner and its daemon), the agent's service manager and the simulated
agent all record what happens as ``Event`` messages on the events stream, through one
``EventPublisher`` each: a coordinator's on ``fw.<fleet>.evt.<kind>``, an agent's on
``fw.<fleet>.evt.agent.<node>.<kind>`` (``agent=True``), a subject only that node's credentials
may publish on, so that no node can pass its events off as another's (``received`` checks it).
It is bus plumbing, not policy of either package, so it lives beside the wire messages; it needs
only a sink with ``protocol.bus.Bus.js_publish_events`` (``EventSink``), never ``nats`` itself.

What it promises:

- *Producers never wait.* ``put`` queues an Event at once, also before there is a connection.
  The queue is bounded (``EVENT_QUEUE``); a full queue drops its *oldest* event rather than
  block a producer: the node table, the engine and the reconcile loop must not stall behind a
  slow stream. Drops are logged as errors, one line a second at most with their count and
  kinds (50,000 nodes registering at once dropped 40,000 ``node.online``: a line each buried
  the log), and once more when the queue has room again.
- *Batches, in order.* ``run(sink)`` takes everything queued while the last batch was out, up
  to ``EVENT_BATCH``, and publishes it pipelined and in queue order on one connection.
- *One retry policy.* The events of a batch that are not stored are published again, up to
  ``EVENT_ATTEMPTS`` publications in all, waiting ``RETRY_DELAY`` before the first retry and
  twice as long before each next one (0.5 s, 1 s, 2 s, 4 s). A sink that raises ``BusError``
  fails the whole batch. After the last attempt each lost event is logged as an error naming
  it: events are the audit trail, never the truth (the records and the KV buckets are).
- *At most once.* The sink gives every message a ``Nats-Msg-Id`` (a digest of its bytes), so
  JetStream drops a retried copy of an event it already stored within its duplicate window:
  retrying never shows one event twice.
- *Every wait bounded.* One publication waits at most ``timeout`` (the sink bounds its sends
  and acks by it; an outer ``asyncio.timeout`` of twice that is the backstop), so one batch
  takes at most ``EVENT_ATTEMPTS`` timeouts plus 7.5 s of backoff before the next one starts.
  Only the idle wait for the next event is unbounded; the task's owner ends it by cancelling.
- *Acknowledged, told.* ``on_stored`` (if given) hears of the events the stream stored, after
  each attempt: the runner's outbox forgets them then.
- *Packs.* A decision about many nodes (a wave's start: a thousand ``node.updating``) is
  recorded as few messages: the coordinator packs such node events into one Event of kind
  ``PACK`` (``pack``), each pack the events of one decision about nodes whose progress is
  kept on one page of the record (``coordinator.runtime.executor``). Readers expand it
  (``received_all``, ``unpacked``) and see every event as if published alone. At 10,000 nodes
  the four node events of each node-update were a third of the coordinator's CPU and half the
  server's; one message each cost most of it.
- *Shutdown drops.* Cancelling ``run`` loses the batch in flight (some of it may be stored
  already) and leaves what is still queued in the queue (``pending()`` returns it); nothing is
  flushed on the way out. Events live for the life of the process only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import msgspec

from protocol import subjects
from protocol.codec import decode, encode
from protocol.errors import BusError, ProtocolError
from protocol.messages import Event

# ``event_id``: a random prefix for this process, then a counter; 32 hex digits, as uuid4().hex.
_ID_PREFIX = secrets.token_hex(10)
_ID_SERIAL = itertools.count()


def event_id() -> str:
    """A new event's id, unique as a uuid4's (80 random bits a process, then a counter) without
    a read of the OS's random source each (uuid4 was 1.5 % of a coordinator's CPU at 10,000
    nodes, 3.7 events a node)."""
    return f"{_ID_PREFIX}{next(_ID_SERIAL) & 0xFFFF_FFFF_FFFF:012x}"

EVENT_QUEUE = 10_000  # events waiting to be published; then the oldest is dropped
EVENT_ATTEMPTS = 5  # publications of one event before it is logged and lost
EVENT_BATCH = 1024  # events published (pipelined) before their acks are awaited
RETRY_DELAY = 0.5  # the first retry's delay; each next one waits twice as long
PUBLISH_TIMEOUT = 10.0  # one publication's sends and acks (protocol.bus.OP_TIMEOUT)
DROPS_LOGGED_EVERY = 1.0  # seconds between two lines about dropped events
# The kinds an agent reports (``agent/manager``): every other kind is the coordinator's to decide,
# and a reader refuses it on a node's subject (``received``).
AGENT_KINDS = ("slot.", "router.", "release.", "agent.")

log = logging.getLogger("fleetwave.events")


class EventSink(Protocol):
    """What the publisher needs of ``protocol.bus.Bus``: per message None once stored, else
    the error; at most once per message id."""

    async def js_publish_events(
        self, messages: Sequence[tuple[str, bytes]], *, timeout: float = ...,
    ) -> list[BusError | None]: ...


def _source(event: Event) -> str:
    """What an event is about, for log lines: its rollout, else its node."""
    return f"rollout {event.rollout}" if event.rollout else event.node


class EventPublisher:
    """Queues Events and publishes them to the events stream of ``fleet``; see the module."""

    def __init__(self, fleet: str, *, queue: int = EVENT_QUEUE, attempts: int = EVENT_ATTEMPTS,
                 batch: int = EVENT_BATCH, timeout: float = PUBLISH_TIMEOUT,
                 logger: logging.Logger = log,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_stored: Callable[[Sequence[Event]], None] | None = None,
                 on_lost: Callable[[Sequence[Event]], None] | None = None,
                 agent: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self._fleet = fleet
        self._agent = agent  # an agent's: each event on its node's own subject
        self._queue: asyncio.Queue[Event] = asyncio.Queue(queue)
        self._attempts = attempts
        self._batch = batch
        self._timeout = timeout
        self._log = logger
        self._sleep = sleep  # the backoff's wait; tests pass one that moves a fake clock
        self._on_stored = on_stored  # told of the events the stream acknowledged, per attempt
        self._on_lost = on_lost  # told of the events given up on, after the last attempt
        self._clock = clock
        self._dropped: Counter[str] = Counter()  # kinds dropped since the last line said so
        self._last_drop: Event | None = None
        self._drops_logged = -DROPS_LOGGED_EVERY

    def put(self, event: Event) -> None:
        """Queue ``event`` without waiting; a full queue drops (and logs) its oldest."""
        if self._queue.full():
            dropped = self._queue.get_nowait()
            self._dropped[dropped.kind] += 1
            self._last_drop = dropped
            if self._clock() - self._drops_logged >= DROPS_LOGGED_EVERY:
                self._tell_drops()
        self._queue.put_nowait(event)

    def _tell_drops(self) -> None:
        """Log the events dropped since the last such line (one line), if any."""
        if not self._dropped or self._last_drop is None:
            return
        kinds = ", ".join(f"{n} {kind}" for kind, n in self._dropped.most_common())
        self._log.error("event queue full (%d events): dropped %d, oldest first (%s; the last "
                        "%s of %s)", self._queue.maxsize, sum(self._dropped.values()), kinds,
                        self._last_drop.kind, _source(self._last_drop))
        self._dropped.clear()
        self._drops_logged = self._clock()

    def pending(self, *, expand: bool = True) -> list[Event]:
        """Take every event not yet published (tests look at them instead of a stream): packs
        expanded, as a reader sees them, or (``expand=False``) whole, as they are published."""
        out = []
        while not self._queue.empty():
            event = self._queue.get_nowait()
            out += unpacked(event) if expand else [event]
        return out

    async def run(self, sink: EventSink) -> None:
        """Publish queued events through ``sink`` until cancelled."""
        while True:
            if self._queue.empty() or self._clock() - self._drops_logged >= DROPS_LOGGED_EVERY:
                self._tell_drops()  # the rest of a burst's drops
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < self._batch:
                batch.append(self._queue.get_nowait())
            await self.publish(sink, batch)

    def _subject(self, event: Event) -> str:
        if self._agent:
            return subjects.agent_event(self._fleet, event.node, event.kind)
        return subjects.event(self._fleet, event.kind)

    async def publish(self, sink: EventSink, events: Sequence[Event]) -> None:
        """Publish ``events``, retrying those not stored; after the last attempt, log them."""
        pending = [(self._subject(e), encode(e), e) for e in events]
        for attempt in range(self._attempts):
            results: Sequence[BusError | TimeoutError | None]
            try:
                async with asyncio.timeout(2 * self._timeout):
                    results = await sink.js_publish_events([(s, d) for s, d, _ in pending],
                                                           timeout=self._timeout)
            except (BusError, TimeoutError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # a cancel made an error (3.11)
                    raise asyncio.CancelledError from None
                results = [exc] * len(pending)
            failed = [(item, error) for item, error in zip(pending, results, strict=True)
                      if error is not None]
            if self._on_stored is not None:
                self._on_stored([e for (_, _, e), error in zip(pending, results, strict=True)
                                 if error is None])
            if not failed:
                return
            if attempt == self._attempts - 1:
                for (_, _, event), error in failed:
                    self._log.error("event %s of %s not recorded: %s", event.kind,
                                    _source(event), str(error) or "timed out")
                if self._on_lost is not None:
                    self._on_lost([event for (_, _, event), _ in failed])
                return
            pending = [item for item, _ in failed]
            await self._sleep(RETRY_DELAY * 2**attempt)


PACK = "node.pack"  # an Event carrying several node events of one decision (``pack``)


def pack(events: Sequence[Event]) -> Event:
    """One Event carrying ``events`` (node events of one rollout's decision, two or more): the
    fields they share said once, each member's own in ``data["events"]``. The pack's ``node``
    is its first member's (the record keeps it on that node's page)."""
    first = events[0]
    carried: list[dict[str, Any]] = []  # (not "members": the function below)
    for e in events:
        member: dict[str, Any] = {"id": e.id, "kind": e.kind, "node": e.node,
                                  "message": e.message, "data": e.data}
        if e.time != first.time:  # one decision's events share its time and who
            member["time"] = e.time
        if e.who != first.who:
            member["who"] = e.who
        carried.append(member)
    return Event(id=event_id(), time=first.time, fleet=first.fleet, kind=PACK,
                 message=f"{len(events)} node events", node=first.node, service=first.service,
                 rollout=first.rollout, data={"events": carried}, who=first.who)


def members(event: Event) -> list[dict[str, Any]]:
    """A pack's members as stored (``pack``); [] for any other event."""
    if event.kind != PACK:
        return []
    found = event.data.get("events")
    return found if isinstance(found, list) else []


def unpacked(event: Event) -> list[Event]:
    """``event``, or the events a pack carries, in order; ProtocolError for a malformed pack."""
    if event.kind != PACK:
        return [event]
    try:
        out = msgspec.convert(event.data.get("events"), list[_Member])
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid event pack {event.id}: {exc}") from None
    if not out or any(m.kind == PACK or not m.kind.startswith("node.") or not m.node
                      for m in out):
        raise ProtocolError(f"invalid event pack {event.id}: it carries no node events, or "
                            "other kinds than node events")
    return [Event(id=m.id, time=event.time if m.time is None else m.time, fleet=event.fleet,
                  kind=m.kind, message=m.message, node=m.node, service=event.service,
                  rollout=event.rollout, data=m.data, who=event.who if m.who is None else m.who)
            for m in out]


class _Member(msgspec.Struct):
    """One event of a pack: what it does not share with the pack (time and who: when they
    differ). Fields a later release adds are ignored here, as an Event's are."""

    id: str
    kind: str
    node: str
    message: str = ""
    data: dict[str, Any] = {}
    time: float | None = None
    who: str | None = None


def received_all(fleet: str, subject: str, data: bytes) -> list[Event]:
    """``received``, a pack expanded (``unpacked``): the events a reader shows. A node may not
    publish packs (its members could name other nodes): one on a node's subject is refused."""
    return unpacked(received(fleet, subject, data))


def received(fleet: str, subject: str, data: bytes) -> Event:
    """The Event a reader of the stream got on ``subject``; ProtocolError if it is malformed or
    was published on one node's subject but names another (a node forging another's events),
    is of a kind only the coordinator decides (``AGENT_KINDS``: a node's ``gate.failed`` drew
    invented error rates on the dashboard's chart), or says who asked (``who``: only the
    coordinator knows, from the subject the server let an operator's request through)."""
    event = decode(Event, data)
    sender = subjects.agent_event_node(fleet, subject)
    if sender is None:
        if not subjects.is_event(fleet, subject):
            # Stored in the events stream under another subject: delivered onto an events
            # subject by a push consumer someone made (its deliver subject is not
            # permission-checked), e.g. a release-index value an operator wrote, which was
            # shown as the coordinator's own event, ``who`` and all.
            raise ProtocolError(f"a message on {subject[:120]!r} in the events ignored (not an "
                                "events subject: delivered there by a JetStream consumer)")
        return event
    if event.node != sender:
        raise ProtocolError(
            f"event {event.kind} on node {sender!r}'s subject names node {event.node!r}; "
            "ignored (a node may report only its own events)"
        )
    if event.kind == PACK:
        raise ProtocolError(f"event pack on node {event.node!r}'s subject ignored (only the "
                            "coordinator packs events)")
    if not event.kind.startswith(AGENT_KINDS):
        raise ProtocolError(f"event {event.kind} on node {sender!r}'s subject ignored (an agent "
                            f"reports only {', '.join(k + '*' for k in AGENT_KINDS)} events)")
    if event.who:
        raise ProtocolError(f"event {event.kind} on node {sender!r}'s subject says it was asked "
                            f"by {event.who!r}; ignored (only the coordinator says who asked)")
    return event
