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
writes (``FENCED_BUCKETS``: rollouts, desired, locks, cordons), and every write it makes carries
the marker's revision as a condition the server checks in the same step (``Bus.kv_fenced_all``). A
marker only ever moves to a higher term, so once a successor has fenced a bucket, no write of an
older term lands there, however late it arrives: a leader paused for a minute, or partitioned
and healed, gets ``Deposed`` from its first write and stops. Its signed desired states carry the
term too, and agents refuse a lower term than they have run (``protocol.signing.verify``).

Takeover: ping strikes take ~2 x ``PING_EVERY`` after a leader's connection drops; a leader that
hangs (SIGSTOP, a stalled VM) or whose host vanishes without closing its connection is judged by
the ttl: ``LEASE_TTL`` + ``POLL`` at most, then the fences (four writes), then its runner.

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
from dataclasses import dataclass, field
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
REFENCES = 3  # a fence forged this many times in a row within one write: retried later
FORGED_LOG_EVERY = 10.0  # seconds between the lines that say a lease or fence was forged
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
    """The term of one leadership and the revision of its marker in each fenced bucket (moved
    when the marker is put back: ``Fenced``), with the marker itself."""

    term: int
    seqs: dict[str, int]
    marker: bytes = b""  # our FenceMarker, encoded: what is written back over a forged one
    holder: str = ""
    refencing: dict[str, asyncio.Lock] = field(default_factory=dict, compare=False, repr=False)

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
                        rollup: Collection[str] = (), atomic: bool = True,
                        ) -> list[int | BusError]:
        """Every (key, value; None deletes) of ``bucket`` pipelined; per write its revision or
        its BusError, where a lost fence is ``Deposed``. Keys in ``rollup`` drop their history;
        ``atomic=False``: the writes need not land together (``Bus.kv_fenced_all``).

        A fence moved by something that is not a coordinator (``_refence``) is put back and the
        writes it stopped are made again: up to ``REFENCES`` times, then a BusError (retried
        by the caller), never Deposed."""
        out: list[int | BusError] = [BusError("not written")] * len(writes)
        todo = list(range(len(writes)))
        for attempt in range(REFENCES + 1):
            try:
                results = await bounded(self.bus.kv_fenced_all(
                    bucket, [writes[i] for i in todo], self.fence.seq(bucket), rollup=rollup,
                    atomic=atomic))
            except BusError as exc:
                for i in todo:
                    out[i] = exc
                return out
            stopped = []
            for i, result in zip(todo, results, strict=True):
                if isinstance(result, Conflict):
                    stopped.append(i)
                else:
                    out[i] = result
            if not stopped:
                return out
            verdict = (await self._refence(bucket) if attempt < REFENCES else BusError(
                f"the fence of {bucket} was overwritten {REFENCES} times in a row by something "
                "that is not a coordinator; the writes are retried later"))
            if verdict is not None:
                for i in stopped:
                    out[i] = verdict
                return out
            todo = stopped
        return out  # not reached: the last attempt returns above

    async def _refence(self, bucket: str) -> BusError | None:
        """After a write found the fence of ``bucket`` moved: Deposed when a coordinator of a
        later term (or another of ours) moved it; None when it is ours again, so the writes
        may be made again; a BusError when that cannot be told now.

        What else moves a fence: any message the server stores on its key. A principal of the
        bus (a node, an operator) can make the server publish onto any subject of the account,
        as the reply to one of its own requests (a JetStream API answer, a publish
        acknowledgement; nats-server checks no reply subject against permissions), and the
        bucket's stream stores it. Such a value is never a marker (no JetStream answer has a
        term and a holder), and no coordinator writes a marker of an older term after ours
        (``write_fences`` refuses to move one down). Either is written back over, by
        compare-and-set on its revision, and logged, but only while the lease names this
        leadership: what the value replaced is not known, and a successor (this leader was
        paused) takes the lease before it fences, so a lease naming another is Deposed; with the
        lease unreadable too, the key's own history decides (``_ours_before``), else a
        BusError (the lease's renewal settles it). Before, one such request from any
        node's credentials deposed the leader (measured: term 1 to 2 at once), and a stream of
        them kept a fleet from finishing a rollout."""
        lock = self.fence.refencing.setdefault(bucket, asyncio.Lock())
        async with lock:  # the concurrent writes of one bucket put it back once
            for _ in range(3):
                try:
                    entry = await bounded(self.bus.kv_get(bucket, subjects.FENCE_KEY))
                except BusError as exc:
                    return exc
                marker = _marker(entry.value if entry else None)
                if marker is not None and (marker.term > self.fence.term or (
                        marker.term == self.fence.term and marker.holder != self.fence.holder)):
                    return self._deposed(bucket)
                if entry is not None and entry.revision == self.fence.seqs.get(bucket):
                    return None  # put back already (by a write that met it first)
                if marker is not None and marker.term == self.fence.term:
                    self.fence.seqs[bucket] = entry.revision if entry else 0
                    return None
                # What the forged value replaced is not known (the locks bucket keeps no
                # history): a successor's marker, if this leader was paused. Only while the
                # lease names this leadership has none taken over (a successor takes the lease
                # before it fences), and only then is it written back.
                lease = await self._lease()
                if isinstance(lease, BusError):
                    return lease
                if lease is not None and (lease.holder != self.fence.holder
                                          or lease.term != self.fence.term):
                    return self._deposed(bucket)
                if lease is None:  # forged too: the key's own history may tell
                    proof = await self._ours_before(bucket)
                    if proof is not None:
                        return proof
                _FORGED.tell(bucket, subjects.FENCE_KEY, entry.value if entry else None)
                try:
                    rev = await _compare_and_set(self.bus, bucket, subjects.FENCE_KEY, entry,
                                                 self.fence.marker)
                except Conflict:
                    continue  # moved again meanwhile: look again
                except BusError as exc:
                    return exc
                self.fence.seqs[bucket] = rev
                return None
            return BusError(f"the fence of {bucket} keeps moving; the writes are retried later")

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

    async def _ours_before(self, bucket: str) -> BusError | None:
        """None when the newest marker the fence key of ``bucket`` still keeps (its history,
        5 revisions for rollouts and desired, 1 for locks) is this leadership's: a successor's
        would be newer, and still kept if ours is. Deposed when it is another coordinator's of
        our term or later; a BusError when none is kept (retried later)."""
        try:
            kept = await bounded(self.bus.kv_history(bucket, subjects.FENCE_KEY))
        except BusError as exc:
            return exc
        for entry in reversed(kept):
            marker = _marker(entry.value)
            if marker is None:
                continue
            if marker.term == self.fence.term and marker.holder == self.fence.holder:
                return None
            if marker.term >= self.fence.term:
                return self._deposed(bucket)
            break
        return BusError(f"the fence of {bucket} and the lease were both overwritten by what no "
                        "coordinator writes: whether this coordinator still leads cannot be "
                        "told now; the writes are retried later")

    async def _lease(self) -> LeaseRecord | BusError | None:
        """The lease as stored now (None: none, or not a lease record)."""
        try:
            entry = await bounded(self.bus.kv_get(subjects.lease_bucket(self.bus.fleet),
                                                  subjects.LEASE_KEY))
        except BusError as exc:
            return exc
        return _lease(entry.value if entry else None)

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
                seqs[bucket] = await _compare_and_set(bus, bucket, subjects.FENCE_KEY, entry,
                                                      data)
                break
            except Conflict:
                # Moved in between, or (clustered) a deposed leader's write on the fence key is
                # still in flight: read it again, after a moment.
                await asyncio.sleep(0.05 * (attempt + 1))
        else:
            raise Deposed(f"the fence of {bucket} keeps moving; another coordinator is taking over")
    return Fence(term=term, seqs=seqs, marker=data, holder=holder)


async def _compare_and_set(bus: RunnerBus, bucket: str, key: str, read: Entry | None,
                           value: bytes) -> int:
    """Write ``value`` to ``key`` only if it still holds what was ``read`` (None: no key); its
    new revision, or Conflict."""
    if read is None or read.value is None:
        return await bounded(bus.kv_create(bucket, key, value))
    return await bounded(bus.kv_update(bucket, key, value, read.revision))


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
    after the lease bucket was lost. A fence key holding what no coordinator writes (a forged
    value: ``Fenced._refence``) counts by the markers its history still keeps: taken as 0, a
    new leader could start below the term the agents have run, and they would refuse it."""
    terms = [0]
    for bucket in fenced_buckets(bus.fleet):
        entry = await bounded(bus.kv_get(bucket, subjects.FENCE_KEY))
        if entry is not None and entry.value and _marker(entry.value) is None:
            kept = await bounded(bus.kv_history(bucket, subjects.FENCE_KEY))
            terms += [_marker_term(e.value) for e in kept]
        else:
            terms.append(_marker_term(entry.value if entry else None))
    return max(terms)


def _marker_term(value: bytes | None) -> int:
    marker = _marker(value)
    return marker.term if marker is not None else 0  # unreadable: any real term replaces it


def _marker(value: bytes | None) -> FenceMarker | None:
    """The fence marker ``value`` holds; None when there is none or it is not one."""
    if not value:
        return None
    try:
        return decode(FenceMarker, value)
    except ProtocolError:
        return None


class _Forgeries:
    """Says (at most every ``FORGED_LOG_EVERY`` seconds per key, with how many since) that a
    lease or fence key held something no coordinator writes, and was written back over."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def tell(self, bucket: str, key: str, value: bytes | None) -> None:
        where = f"{bucket}/{key}"
        self._since[where] = self._since.get(where, 0) + 1
        now = self._clock()
        if now - self._last.get(where, -FORGED_LOG_EVERY) < FORGED_LOG_EVERY:
            return
        seen = (value or b"")[:80].decode("utf-8", "replace")
        log.error("%s held %s, which no coordinator writes (%d time(s) in %gs): a principal of "
                  "the bus made the server publish onto it (the reply subject of its own "
                  "request); written back over, this coordinator keeps leading. Find who: the "
                  "server's connection list at that moment", where, repr(seen) or "nothing",
                  self._since[where], FORGED_LOG_EVERY)
        self._last[where] = now
        self._since[where] = 0


_FORGED = _Forgeries()


class LeaseBus(RunnerBus, Protocol):
    """What the lease needs beyond the runner's calls: a ping of a coordinator's own subject
    (``protocol.bus.Bus.ping``: True answered, False no responders, None no answer in time)."""

    async def ping(self, subject: str, timeout: float) -> bool | None: ...


def _lease(value: bytes | None) -> LeaseRecord | None:
    """The lease record ``value`` holds; None when there is none or it is not one."""
    if value is None:
        return None
    try:
        return decode(LeaseRecord, value)
    except ProtocolError:
        return None


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
        self._taken_at: float | None = None  # when the take that won was sent (``_mono``)
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
            held = _lease(entry.value if entry is not None else None)
            forged = entry is not None and held is None
            if forged and entry is not None and entry.revision != seen_rev:
                # Not a lease record: a principal of the bus made the server publish onto the
                # key (``Fenced._refence``). Not a change: a live leader writes it back over at
                # its next renewal, which is one, and its holder answers pings meanwhile
                # (``known`` below); taken over once neither happened for the ttl, as a silent
                # leader's (a stream of such writes would otherwise depose every leader, or
                # keep a dead one's lease).
                _FORGED.tell(self.bucket, subjects.LEASE_KEY, entry.value)
                seen_rev = entry.revision
            if entry is not None and entry.revision != seen_rev:
                seen_rev, seen_at, strikes = entry.revision, now, 0
            # Behind a forged value, the lease is the last record read here: its holder is
            # pinged as a live key's would be, and its answer is what a renewal would have
            # been (a leader's renewals may be seen only between two forged values).
            known = held if held is not None else self.current if forged else None
            if held is not None and held != self.current:
                if held.holder and (self.current is None or held.holder != self.current.holder):
                    log.info("coordinator %s (%s pid %d) leads, term %d", held.holder, held.host,
                             held.pid, held.term)
                self.current = held
            # Ours (we were paused, or lost the bus a while, or our take landed and its reply
            # was lost: a revision we never learned): take it again at once, under a new term
            # (the old term's writes stay fenced off). Ids are random per process, so a record
            # names us only if we wrote it; waiting a ttl for our own lost reply left the fleet
            # without a leader that long (found by a review).
            mine = held is not None and held.holder == self.me
            # The longer of our ttl and the leader's (``--lease-ttl``): never sooner than it
            # promised itself to hold on.
            ttl = max(self.ttl, known.ttl if known is not None else 0.0)
            expired = (not forged and (held is None or not held.holder)) or mine \
                or now - seen_at >= ttl
            if (not expired and known is not None and known.holder not in ("", self.me)
                    and now >= next_ping):
                next_ping = now + PING_EVERY
                answered = await self.bus.ping(ping_subject(self.bus.fleet, known.holder),
                                               PING_TIMEOUT)
                strikes = strikes + 1 if answered is False else 0
                if forged and answered is True:
                    seen_at = now
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
        sent = self._mono()  # standbys count our ttl from about now: so does ``hold``
        now = self._clock()
        mine = LeaseRecord(holder=self.me, term=term, host=socket.gethostname(), pid=os.getpid(),
                           since=now, renewed=now, ttl=self.ttl, key=self.key)
        try:
            rev = await _compare_and_set(self.bus, self.bucket, subjects.LEASE_KEY, entry,
                                         encode(mine))
        except Conflict:
            return None  # another standby was quicker
        except BusError as exc:
            log.debug("cannot take the lease: %s", exc)
            return None
        if held is not None and held.holder not in ("", self.me):
            log.warning("took the lease over from coordinator %s (term %d → %d)", held.holder,
                        held.term, term)
        self.current, self._rev = mine, rev
        self._taken_at = sent
        self.takeovers += 1
        return mine

    # -- leading -----------------------------------------------------------------------------------

    async def hold(self) -> str:
        """Renew the lease until it is lost; why it was lost. Cancel to stop holding.

        Counted from the take's request, not from this call: a standby counts the ttl from
        when it saw the take, and a new leader fences (and, after a key rotation, re-signs
        every desired state) before it leads: the daemon starts holding at once, but a
        leadership that began holding late must not believe it has a whole ttl left (a
        review found leaders deposing each other for ever after a rotation at 50,000
        nodes, each re-signing longer than the ttl)."""
        assert self.current is not None
        last_ok = self._taken_at if self._taken_at is not None else self._mono()
        self._taken_at = None
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
                try:  # within what is left of the ttl: its reads may each wait OP_TIMEOUT
                    async with asyncio.timeout(max(0.1, self.ttl - (self._mono() - last_ok))):
                        ours = await self._recover()
                except TimeoutError:
                    ours = None  # cannot tell in time: the ttl's check below ends the lead
                if ours:  # our last renewal landed (its answer was lost), or it was forged
                    last_ok = sent
                    continue
                if ours is None:  # cannot tell now: the next renewal asks again
                    continue
                self._rev = 0
                return "another coordinator took the lease"
            except (BusError, TimeoutError) as exc:
                log.warning("cannot renew the lease: %s", str(exc) or "timed out")
                continue
            self._answered(sent)
            self.current = renewed
            last_ok = sent

    def _answered(self, sent: float) -> None:
        self.heard = max(self.heard, sent)

    async def _recover(self) -> bool | None:
        """After a lost compare-and-set: whether the lease is still ours. True when it names
        us in our term (a renewal whose reply was lost had landed: its revision is adopted) or
        holds what no coordinator writes (not a lease record: a principal of the bus made the
        server publish onto the key, ``Fenced._refence``; written back over with our renewal);
        False when another coordinator's record is there; None when that cannot be told now."""
        for _ in range(3):
            try:
                entry = await bounded(self.bus.kv_get(self.bucket, subjects.LEASE_KEY))
            except BusError:
                return None
            if self.current is None:
                return False
            held = _lease(entry.value if entry else None)
            if held is not None:
                if held.holder != self.me or held.term != self.current.term:
                    return False
                assert entry is not None
                self._rev = entry.revision
                self.current = held
                return True
            # The forged value may have replaced a successor's record (this one was paused,
            # and a standby took over): a fence of a later term says so.
            try:
                if await highest_fence(self.bus) > self.current.term:
                    return False
            except BusError:
                return None
            _FORGED.tell(self.bucket, subjects.LEASE_KEY, entry.value if entry else None)
            renewed = msgspec.structs.replace(self.current, renewed=self._clock())
            try:
                rev = await _compare_and_set(self.bus, self.bucket, subjects.LEASE_KEY, entry,
                                             encode(renewed))
            except Conflict:
                continue  # moved again meanwhile: look again
            except BusError:
                return None
            self._rev = rev
            self.current = renewed
            return True
        return None

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

