"""Notifications: the leader POSTs a document for every notable rollout event to each target.

Theory of operation: ``Notifier.lead(bus)`` runs while this coordinator leads (the daemon runs
it beside the runner, and cancels it with the leadership). For each target (``--notify URL``)
it reads the fleet's events stream through that target's own *durable consumer*
(``Target.consumer``), one event at a time in stream order: a notable event
(``notify_doc.NOTABLE``) is POSTed (``deliver``), then acknowledged; any other is acknowledged
at once. The consumer's position is the server's, so:

- a restarted coordinator, or a standby that takes over, goes on from the first event not yet
  acknowledged: nothing is sent twice and nothing is lost. The one window left is a POST that
  succeeded right before this process died unacknowledged: its event comes again, with the same
  ``id`` (receivers de-duplicate on it). A consumer made for the first time starts when
  this leadership did, so turning notifications on never replays a fleet's history. Give every
  coordinator of a fleet the same URLs: a standby's are the ones used once it leads;
- each target keeps its own pace: a receiver that is down holds back its own notifications
  only. The queue between the rollout and a receiver is the events stream itself (bounded by
  its limits), read one unacknowledged event at a time; the rollout never waits for it: the
  engine publishes events and goes on (``protocol.events``).

A delivery is ``ATTEMPTS`` POSTs at most with exponential backoff (``notify_doc``), each bounded
by ``POST_TIMEOUT``; while it lasts the event's ack wait is renewed (``Pulled.working``), so the
server does not hand it to anyone else. Then it is acknowledged, delivered or given up: a
receiver down for longer than a delivery misses that notification, said in an error line. Every
attempt is one log line: the target (``Target.shown``: no secrets), the event, the attempt and
its answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote, urlsplit

import msgspec

from coordinator.runtime import notify_doc as doc
from coordinator.runtime.calls import cancelled_meanwhile
from coordinator.runtime.notify_doc import Facts, Target
from coordinator.runtime.store import RolloutStore
from protocol import subjects
from protocol.bus import Bus, Pulled
from protocol.errors import BusError, ProtocolError
from protocol.events import received
from protocol.loop import bounded
from protocol.messages import Event

log = logging.getLogger("fleetwave.notify")

ACK_WAIT = 30.0  # the server hands an unacknowledged event on after this; renewed while we try
KEEPALIVE = 10.0
PULL_WAIT = 5.0  # one long pull; a new event ends it at once
RESTART_DELAY = 2.0  # after the events stream failed us
USER_AGENT = "fleetwave-notify/1"
FACTS_KEPT = 256  # rollouts whose versions are remembered

Post = Callable[[str, bytes, dict[str, str], float], Awaitable[int]]


async def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST ``body`` to ``url`` (HTTP/1.1, one connection per request); the answer's status.
    OSError or TimeoutError when there is none within ``timeout``."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc.rsplit('@', 1)[-1]}",
            f"User-Agent: {USER_AGENT}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items())]
    if parts.username is not None:  # https://user:password@host/...: basic authentication
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        head.append(f"Authorization: Basic {base64.b64encode(pair).decode()}")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl.create_default_context() if tls else None)
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
            try:
                status_line = await reader.readline()
            except ValueError:  # a line longer than the reader's limit: not HTTP
                status_line = b"(an endless line)"
    finally:
        # Closed outside the answer's timeout: over TLS the close waits for the peer's
        # close_notify, and a receiver that answered 200 and held the connection had its answer
        # thrown away as "no answer" (found by a review: six POSTs, six 200s, NOT delivered).
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await bounded(writer.wait_closed(), 1.0)
    words = status_line.split(None, 2)  # "HTTP/1.1 200 OK", or "HTTP/1.1 200" with no reason
    code = words[1] if len(words) > 1 else b""
    if len(code) != 3 or not code.isdigit():  # int() would take "2_00" or " 200"
        raise OSError(f"not an HTTP answer: {status_line[:60]!r}")
    return int(code)


class Notifier:
    """Notifies ``targets`` of the fleet's notable rollout events; see the module."""

    def __init__(self, targets: list[Target], *, secret: bytes | None = None,
                 post: Post = post, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 attempts: int = doc.ATTEMPTS, first_delay: float = doc.FIRST_DELAY,
                 timeout: float = doc.POST_TIMEOUT) -> None:
        self.targets = targets
        self._secret = secret
        self._post = post
        self._clock = clock
        self._sleep = sleep
        self._attempts = attempts
        self._first_delay = first_delay
        self._timeout = timeout
        self._facts: dict[str, Facts] = {}

    async def lead(self, bus: Bus, start: float) -> None:
        """Follow every target's consumer until cancelled (never returns by itself)."""
        async with asyncio.TaskGroup() as tg:
            for target in self.targets:
                tg.create_task(self._keep_following(bus, target, start),
                               name=f"notify {target.shown}")
        await asyncio.Event().wait()  # no targets: nothing to do until the leadership ends

    async def _keep_following(self, bus: Bus, target: Target, start: float) -> None:
        store = RolloutStore(bus)
        while True:
            try:
                await self._follow(bus, store, target, start)
            except BusError as exc:
                cancelled_meanwhile()
                log.warning("notify %s: %s; again in %.0fs", target.shown, exc, RESTART_DELAY)
            except Exception:  # our bug: logged with its traceback; never ends the leadership
                cancelled_meanwhile()
                log.exception("notify %s: failed; again in %.0fs", target.shown, RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)

    async def _follow(self, bus: Bus, store: RolloutStore, target: Target, start: float) -> None:
        durable = await bus.durable_events(
            target.consumer, [subjects.event(bus.fleet, k) for k in doc.FILTERS],
            start=start, ack_wait=ACK_WAIT)
        log.info("notify %s: following the events stream (consumer %s)", target.shown,
                 target.consumer)
        try:
            while True:
                pulled = await durable.next(PULL_WAIT)
                if pulled is not None:
                    await self._handle(store, target, pulled)
        finally:
            await durable.close()

    async def _handle(self, store: RolloutStore, target: Target, pulled: Pulled) -> None:
        try:
            event = received(store.fleet, pulled.subject, pulled.data)
        except ProtocolError as exc:
            log.warning("notify %s: skipping a malformed event: %s", target.shown, exc)
            await pulled.ack()
            return
        if not doc.notable(event):
            await pulled.ack()
            return
        keepalive = asyncio.create_task(_renew(pulled))
        try:
            await self.deliver(target, event, await self._facts_of(store, event))
        except Exception:  # our bug: skip this event (logged) rather than retry it forever
            cancelled_meanwhile()
            log.exception("notify %s: cannot notify event %s; skipped", target.shown, event.id)
        except asyncio.CancelledError:
            # The leadership ended mid-delivery: hand the event to the next leader now rather
            # than after the ack wait (it may get it twice if this attempt had reached it).
            with contextlib.suppress(TimeoutError):
                await bounded(pulled.nak(), 1.0)
            raise
        finally:
            keepalive.cancel()
        await pulled.ack()

    async def _facts_of(self, store: RolloutStore, event: Event) -> Facts:
        """The versions and strategy of the event's rollout (its record; cached)."""
        if not event.rollout:  # a refused deploy: no record, the event says what it was
            return doc.facts_of_refusal(event)
        facts = self._facts.get(event.rollout)
        if facts is None:
            try:
                record = await store.load(event.rollout)
            except (BusError, ProtocolError) as exc:
                log.warning("notify: cannot read rollout %s (%s); notifying without its "
                            "versions", event.rollout, exc)
                return Facts()
            if record is None:
                return Facts()
            facts = Facts(from_version=record.from_version, to_version=record.release.version,
                          strategy=record.spec.strategy)
            if len(self._facts) >= FACTS_KEPT:  # a long-lived leader: forget the oldest
                del self._facts[next(iter(self._facts))]
            self._facts[event.rollout] = facts
        return facts

    async def deliver(self, target: Target, event: Event, facts: Facts) -> bool:
        """POST ``event``'s notification to ``target``, retrying with backoff; whether it was
        delivered. Every attempt is logged."""
        note = doc.document(event, facts)
        body = msgspec.json.encode(doc.slack_message(note) if target.slack else note)
        what = f"{note.what} of rollout {note.rollout} (event {note.id[:12]})"
        for attempt in range(1, self._attempts + 1):
            secret = target.secret if target.secret is not None else self._secret
            headers = ({} if secret is None else doc.sign(secret, body, int(self._clock())))
            headers["X-Fleetwave-Event"] = note.id
            status: int | None = None
            try:
                status = await self._post(target.url, body, headers, self._timeout)
                answer = f"HTTP {status}"
            except TimeoutError:
                answer = f"no answer within {self._timeout:g}s"
            except (OSError, ssl.SSLError, UnicodeError) as exc:  # (a host IDNA refuses)
                answer = f"cannot connect: {getattr(exc, 'strerror', None) or exc}"
            if doc.delivered(status):
                log.info("notify %s: %s delivered, attempt %d/%d: %s", target.shown, what,
                         attempt, self._attempts, answer)
                return True
            final = attempt == self._attempts or not doc.retried(status)
            if final:
                log.error("notify %s: %s NOT delivered, attempt %d/%d: %s; giving up",
                          target.shown, what, attempt, self._attempts, answer)
                return False
            delay = doc.backoff(attempt, first=self._first_delay)
            log.warning("notify %s: %s failed, attempt %d/%d: %s; retrying in %gs",
                        target.shown, what, attempt, self._attempts, answer, delay)
            await self._sleep(delay)
        return False


async def _renew(pulled: Pulled) -> None:
    while True:
        await asyncio.sleep(KEEPALIVE)
        await pulled.working()
