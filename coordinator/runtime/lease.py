"""Leadership: the coordinators' lease, and the fence that makes a deposed leader's writes fail.

Theory of operation. Any number of coordinators run against one fleet; one leads. The lease is
one KV key, ``fw-<fleet>-lease/leader`` (``LeaseRecord``: holder, term, ...), written only by
compare-and-set on its revision:

- A *standby* reads the key every ``POLL`` seconds. Whether the lease has expired it judges by
  its own monotonic clock: the revision has not changed for ``ttl`` seconds (no one compares
  wall clocks of different hosts). It also pings the holder's own subject
  (``fw.<fleet>.coord.<holder>.ping``) every ``PING_EVERY``; when the server answers "no
  responders" ``PING_STRIKES`` times in a row, the holder's connection is gone (killed, or cut off
  from the bus) and the standby does not wait for the ttl. It then takes the lease by
  compare-and-set on the revision it saw, with ``term + 1``; of several standbys one wins.
- The *leader* renews every ``renew`` seconds (compare-and-set on its own revision). A renewal
  that meets another revision means it was deposed; one that cannot reach the bus for ``ttl``
  means it may have been: either way it stops leading at once (``hold`` returns).
- A leader that stops on purpose gives the lease up (the record stays, with no holder, so its
  term is never handed out again), and a standby takes it within ``POLL``.

Timing is for liveness only. Safety comes from the *fence*: a new leader, before its first
write, writes a marker (``FenceMarker``, key ``_fence``) with its term into every bucket it
writes (``FENCED_BUCKETS``: rollouts, desired, locks), and every write it makes carries the
marker's revision as a condition the server checks in the same step (``Bus.kv_fenced_all``). A
marker only ever moves to a higher term, so once a successor has fenced a bucket, no write of an
older term lands there, however late it arrives: a leader paused for a minute, or partitioned
and healed, gets ``Deposed`` from its first write and stops. Its signed desired states carry the
term too, and agents refuse a lower term than they have run (``protocol.signing.verify``).

Takeover: ping strikes take ~2 x ``PING_EVERY`` after a leader's connection drops; a leader that
hangs (SIGSTOP, a stalled VM) or whose host vanishes without closing its connection is judged by
the ttl: ``LEASE_TTL`` + ``POLL`` at most, then the fences (three writes), then its runner.

Hearing the bus: the lease's calls are this coordinator's regular round trips to the server
(every ``POLL`` standing by, every ``renew`` leading). ``heard`` is when the last one that the
server answered was sent: whatever the server had for this coordinator before then (heartbeats)
came down the same connection ahead of that answer. A coordinator cut off from the bus, with a
connection that still looks open, gets no answers: the daemon judges the nodes' silence only up
to ``heard`` (``coordinator.runtime.daemon``), so it never reads its own deafness as theirs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from coordinator.runtime.calls import Deposed as Deposed  # defined beside all_of, named here too
from coordinator.runtime.calls import bounded
from coordinator.runtime.ports import RunnerBus
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.messages import FenceMarker, LeaseRecord

log = logging.getLogger("fleetwave.coordinator.lease")

LEASE_TTL = 2.0  # a lease not renewed for this long (by the standby's own clock) is taken over
RENEW_EVERY = 0.4  # the leader's renewals: five within one ttl
POLL = 0.1  # how often a standby reads the lease
PING_EVERY = 0.2  # how often a standby pings the leader's own subject
PING_TIMEOUT = POLL  # a frozen holder answers nothing: only "no responders" counts
PING_STRIKES = 2  # "no responders" this many times in a row: the leader's connection is gone
# ... and only once the lease has not been renewed for this long either (a leader that is just
# reconnecting, e.g. its broker went into lame-duck mode, has no subscription for a moment).
PING_SILENCE = 2.5 * RENEW_EVERY


fenced_buckets = subjects.fenced_buckets


def new_id() -> str:
    """A coordinator's id: random, a valid subject token (host and pid are in the lease)."""
    return uuid.uuid4().hex[:12]


ping_subject = subjects.coordinator_ping
direct_api = subjects.coordinator_api


@dataclass(frozen=True)
class Fence:
    """The term of one leadership and the revision of its marker in each fenced bucket."""

    term: int
    seqs: dict[str, int]

    def seq(self, bucket: str) -> int:
        try:
            return self.seqs[bucket]
        except KeyError:
            raise BusError(f"bucket {bucket} is not fenced; only "
                           f"{', '.join(sorted(self.seqs))} are") from None


class Fenced:
    """Writes of one leadership, each conditional on its fence (``Bus.kv_fenced_all``)."""

    def __init__(self, bus: RunnerBus, fence: Fence) -> None:
        self.bus = bus
        self.fence = fence

    @property
    def term(self) -> int:
        return self.fence.term

    async def write_all(self, bucket: str, writes: Sequence[tuple[str, bytes | None]], *,
                        rollup: Collection[str] = ()) -> list[int | BusError]:
        """Every (key, value; None deletes) of ``bucket`` pipelined; per write its revision or
        its BusError, where a lost fence is ``Deposed``. Keys in ``rollup`` drop their history."""
        try:
            results = await bounded(self.bus.kv_fenced_all(bucket, writes,
                                                           self.fence.seq(bucket), rollup=rollup))
        except BusError as exc:
            return [exc] * len(writes)
        return [self._deposed(bucket) if isinstance(r, Conflict) else r for r in results]

    async def put(self, bucket: str, key: str, value: bytes) -> int:
        """Write one key; its new revision. Deposed or BusError."""
        [result] = await self.write_all(bucket, [(key, value)])
        if isinstance(result, BusError):
            raise result
        return result

    async def delete(self, bucket: str, key: str) -> None:
        [result] = await self.write_all(bucket, [(key, None)])
        if isinstance(result, BusError):
            raise result

    def _deposed(self, bucket: str) -> Deposed:
        return Deposed(f"the fence of {bucket} moved past term {self.fence.term}: another "
                       "coordinator leads now; this one stops writing")


async def write_fences(bus: RunnerBus, *, term: int, holder: str, now: float,
                       key: str = "", retired: Sequence[str] = ()) -> Fence:
    """Move every fenced bucket's marker to ``term`` (never to a lower one); Deposed if one
    already holds ``term`` or higher (a later leader got there first). The markers name the
    leader's signing ``key`` and the keys the fleet was rotated away from (``retired``)."""
    seqs: dict[str, int] = {}
    data = encode(FenceMarker(term=term, holder=holder, time=now, key=key, retired=list(retired)))
    for bucket in fenced_buckets(bus.fleet):
        for attempt in range(10):
            entry = await bounded(bus.kv_get(bucket, subjects.FENCE_KEY))
            have = _marker_term(entry.value if entry else None)
            if have >= term:
                raise Deposed(f"{bucket} is fenced by term {have} already; term {term} lost")
            try:
                if entry is None:
                    seqs[bucket] = await bounded(bus.kv_create(bucket, subjects.FENCE_KEY, data))
                else:
                    seqs[bucket] = await bounded(
                        bus.kv_update(bucket, subjects.FENCE_KEY, data, entry.revision))
                break
            except Conflict:
                # Moved in between, or (clustered) a deposed leader's write on the fence key is
                # still in flight: read it again, after a moment.
                await asyncio.sleep(0.05 * (attempt + 1))
        else:
            raise Deposed(f"the fence of {bucket} keeps moving; another coordinator is taking over")
    return Fence(term=term, seqs=seqs)


async def fence_markers(bus: RunnerBus) -> list[FenceMarker]:
    """The fence markers that can be read (of the leaders that wrote the fleet's states: their
    signing keys, and the keys retired by a rotation; ``coordinator.core.rotation``)."""
    markers = []
    for bucket in fenced_buckets(bus.fleet):
        entry = await bounded(bus.kv_get(bucket, subjects.FENCE_KEY))
        if entry is not None and entry.value:
            try:
                markers.append(decode(FenceMarker, entry.value))
            except ProtocolError:
                continue
    return markers


async def highest_fence(bus: RunnerBus) -> int:
    """The highest term any fence marker names (0 if none): a new lease starts above it, even
    after the lease bucket was lost."""
    terms = [0]
    for bucket in fenced_buckets(bus.fleet):
        entry = await bounded(bus.kv_get(bucket, subjects.FENCE_KEY))
        terms.append(_marker_term(entry.value if entry else None))
    return max(terms)


def _marker_term(value: bytes | None) -> int:
    if not value:
        return 0
    try:
        return decode(FenceMarker, value).term
    except ProtocolError:
        return 0  # unreadable: any real term replaces it


class LeaseBus(RunnerBus, Protocol):
    """What the lease needs beyond the runner's calls: a ping of a coordinator's own subject
    (``protocol.bus.Bus.ping``: True answered, False no responders, None no answer in time)."""

    async def ping(self, subject: str, timeout: float) -> bool | None: ...


async def live_leader(bus: LeaseBus) -> LeaseRecord | None:
    """The lease of a coordinator that answers its ping now (None: no lease, or its holder is
    gone): what a starting coordinator must agree with."""
    entry = await bounded(bus.kv_get(subjects.lease_bucket(bus.fleet), subjects.LEASE_KEY))
    if entry is None or entry.value is None:
        return None
    try:
        held = decode(LeaseRecord, entry.value)
    except ProtocolError:
        return None
    if not held.holder:
        return None
    answered = await bus.ping(ping_subject(bus.fleet, held.holder), PING_TIMEOUT)
    return held if answered is not False else None


class Lease:
    """One coordinator's part in the election; see the module docstring."""

    def __init__(
        self, bus: LeaseBus, *, me: str, key: str = "", ttl: float = LEASE_TTL,
        renew: float = RENEW_EVERY, poll: float = POLL, clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.me = me
        self.key = key  # our signing key's public half, named in the lease and the fences
        self.ttl = ttl
        self.renew = renew
        self.poll = poll
        self._clock = clock
        self._mono = monotonic
        self.bucket = subjects.lease_bucket(bus.fleet)
        self.current: LeaseRecord | None = None  # the lease as last read (or written) here
        self._rev = 0  # revision of the lease while we hold it
        self._last = 0  # the last revision we wrote (a lease still at it is ours to re-take)
        self.takeovers = 0
        self.heard = monotonic()  # when the last call the server answered was sent (docstring)

    @property
    def leader(self) -> LeaseRecord | None:
        """The lease as last seen, if someone holds it."""
        return self.current if self.current is not None and self.current.holder else None

    @property
    def leading(self) -> bool:
        return self.current is not None and self.current.holder == self.me and self._rev > 0

    # -- standing by -------------------------------------------------------------------------------

    async def acquire(self) -> LeaseRecord:
        """Wait (as a standby) until this coordinator holds the lease; its record."""
        seen_rev = -1
        seen_at = self._mono()
        strikes = 0
        next_ping = 0.0
        while True:
            sent = self._mono()
            try:
                entry = await bounded(self.bus.kv_get(self.bucket, subjects.LEASE_KEY))
            except BusError as exc:
                log.debug("cannot read the lease: %s", exc)
                await asyncio.sleep(self.poll)
                continue
            self._answered(sent)
            now = self._mono()
            held: LeaseRecord | None = None
            if entry is not None and entry.value is not None:
                try:
                    held = decode(LeaseRecord, entry.value)
                except ProtocolError as exc:
                    log.error("the lease is unreadable (%s); taking it over", exc)
            if entry is not None and entry.revision != seen_rev:
                seen_rev, seen_at, strikes = entry.revision, now, 0
            if held is not None and held != self.current:
                if held.holder and (self.current is None or held.holder != self.current.holder):
                    log.info("coordinator %s (%s pid %d) leads, term %d", held.holder, held.host,
                             held.pid, held.term)
                self.current = held
            # Ours, untouched since we last renewed it (we were paused, or lost the bus a while):
            # take it again at once, under a new term (the old term's writes stay fenced off).
            mine = held is not None and held.holder == self.me and entry is not None \
                and entry.revision == self._last
            # The longer of our ttl and the leader's (``--lease-ttl``): never sooner than it
            # promised itself to hold on.
            ttl = max(self.ttl, held.ttl if held is not None else 0.0)
            expired = held is None or not held.holder or mine or now - seen_at >= ttl
            if not expired and held is not None and now >= next_ping:
                next_ping = now + PING_EVERY
                answered = await self.bus.ping(ping_subject(self.bus.fleet, held.holder),
                                               PING_TIMEOUT)
                strikes = strikes + 1 if answered is False else 0
                expired = strikes >= PING_STRIKES and now - seen_at >= PING_SILENCE
            if expired:
                won = await self._take(entry, held)
                if won is not None:
                    return won
            await asyncio.sleep(self.poll)

    async def _take(self, entry: Entry | None, held: LeaseRecord | None) -> LeaseRecord | None:
        """Try to take the lease over from ``held`` (None: no lease, or unreadable)."""
        try:
            floor = await highest_fence(self.bus)
        except BusError as exc:
            log.debug("cannot read the fences: %s", exc)
            return None
        term = max(floor, held.term if held else 0, self.current.term if self.current else 0) + 1
        now = self._clock()
        mine = LeaseRecord(holder=self.me, term=term, host=socket.gethostname(), pid=os.getpid(),
                           since=now, renewed=now, ttl=self.ttl, key=self.key)
        try:
            if entry is None or entry.value is None:
                rev = await bounded(self.bus.kv_create(self.bucket, subjects.LEASE_KEY,
                                                       encode(mine)))
            else:
                rev = await bounded(self.bus.kv_update(self.bucket, subjects.LEASE_KEY,
                                                       encode(mine), entry.revision))
        except Conflict:
            return None  # another standby was quicker
        except BusError as exc:
            log.debug("cannot take the lease: %s", exc)
            return None
        if held is not None and held.holder not in ("", self.me):
            log.warning("took the lease over from coordinator %s (term %d → %d)", held.holder,
                        held.term, term)
        self.current, self._rev, self._last = mine, rev, rev
        self.takeovers += 1
        return mine

    # -- leading -----------------------------------------------------------------------------------

    async def hold(self) -> str:
        """Renew the lease until it is lost; why it was lost. Cancel to stop holding."""
        assert self.current is not None
        last_ok = self._mono()
        while True:
            await asyncio.sleep(self.renew)
            sent = self._mono()
            if sent - last_ok >= self.ttl:  # we were paused, or the bus was away, too long
                self._rev = 0
                return (f"the lease was not renewed for {sent - last_ok:.1f}s (this process or "
                        "its connection stalled); a standby may lead now")
            renewed = msgspec.structs.replace(self.current, renewed=self._clock())
            try:
                async with asyncio.timeout(max(0.1, self.ttl - (sent - last_ok))):
                    self._rev = await self.bus.kv_update(self.bucket, subjects.LEASE_KEY,
                                                         encode(renewed), self._rev)
            except Conflict:
                self._answered(sent)
                if await self._still_ours():  # our last renewal landed, its answer was lost
                    last_ok = sent
                    continue
                self._rev = 0
                return "another coordinator took the lease"
            except (BusError, TimeoutError) as exc:
                log.warning("cannot renew the lease: %s", str(exc) or "timed out")
                continue
            self._answered(sent)
            self.current = renewed
            self._last = self._rev
            last_ok = sent

    def _answered(self, sent: float) -> None:
        self.heard = max(self.heard, sent)

    async def _still_ours(self) -> bool:
        """After a lost compare-and-set: whether the lease still names us in our term (a
        renewal whose reply was lost had landed); if so, adopt its revision."""
        try:
            entry = await bounded(self.bus.kv_get(self.bucket, subjects.LEASE_KEY))
            held = decode(LeaseRecord, entry.value) if entry and entry.value else None
        except (BusError, ProtocolError):
            return False
        if (entry is None or held is None or self.current is None or held.holder != self.me
                or held.term != self.current.term):
            return False
        self._rev = self._last = entry.revision
        self.current = held
        return True

    async def release(self) -> None:
        """Give the lease up (a stopping leader): a standby takes it at its next look. The
        record stays, with no holder, so that its term is never handed out again."""
        if not self.leading or self.current is None:
            return
        rev, self._rev = self._rev, 0
        free = msgspec.structs.replace(self.current, holder="", renewed=self._clock())
        try:
            await bounded(self.bus.kv_update(self.bucket, subjects.LEASE_KEY, encode(free), rev))
            log.info("gave up the lease (term %d)", free.term)
        except BusError as exc:  # a Conflict too: someone took it already
            log.info("did not give up the lease: %s", exc)

    def deposed(self) -> None:
        """Stop regarding ourselves as the holder (a fenced write was refused)."""
        self._rev = 0

