"""The rollout store: rollout records and the per-service locks, as kept in the KV buckets.

Every write goes through the leadership's ``Fenced`` writer (``coordinator.runtime.lease``): it
lands only while no later leader has fenced the bucket, else ``Deposed``. With one writer at a
time per bucket, a record needs no compare-and-set of its own: ``persist`` writes the record, and
a write whose reply was lost is simply written again. A coordinator that does not lead has a store
without a writer (``fenced=None``): it reads, and every write says that it does not lead.

The per-service lock: ``take_lock`` writes ``fw-<fleet>-locks/<service>`` (value: the rollout id)
*after* the record is created (``check_lock`` refused a held lock before anything was written),
and ``release_lock`` deletes it once the rollout is terminal (only if it still names that
rollout). A lock whose rollout is terminal or missing is stale and taken over; a lock held by a
live rollout is a Conflict that tells the operator what to do. The order is what makes "missing"
safe to take over: were the lock written first, a lock whose record is being created right now
would look stale, and a take-over in that window would leave two live rollouts of one service.
The other way round, a record may exist without its lock (a crash between the two, or a create
whose lost reply made its deploy give up): it is started only once it holds the lock
(``Runner.resync`` takes it, and drops a never-started record that cannot).

The record split (``coordinator.core.pages``): a record is written as its head (key ``<id>``)
and the pages of its node table (``<id>.<k>``), the head first, in the same atomic fenced batch.
A persist writes the head and only the pages that changed since the record as this store last
wrote or read it (``_split``: per live rollout, its layout and that record); a record it does
not know yet (after a failed write dropped its driver, or kept in one value by an earlier
version) is read back first, or written whole. Reading assembles the head and its pages; a
missing page is a BusError naming it. Reduced or discarded records' pages are purged.

The history (``coordinator.runtime.history``): every write that changes a record's summary
(create, start, a wave, terminal, its last events acknowledged) carries the service's index, and
past the retention the records it reduces, in the same atomic fenced batch. Reading the history
(``index``, ``latest``, ``open_ids``) reads indexes, never every record.

Every call is bounded (``calls.bounded``); retrying is the caller's choice.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Collection, Mapping

from coordinator.core import pages
from coordinator.core.history import Retention
from coordinator.runtime.calls import bounded, readable_before, scanned
from coordinator.runtime.history import Change, History, Stored, decode_stored
from coordinator.runtime.lease import Fenced
from coordinator.runtime.ports import RunnerBus
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode, encode, shared
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.history import (
    PageSeen,
    RolloutPage,
    RolloutSummary,
    SummarisedRollout,
    pack_page,
    unpack_page,
)
from protocol.messages import TERMINAL_STATES, DesiredState, RolloutRecord, SignedEnvelope

log = logging.getLogger("fleetwave.coordinator.runner")

_ROLLOUT_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")


class NotLeading(BusError):
    """A write asked of a coordinator that does not lead."""


class RolloutStore:
    """The rollout records and service locks of one fleet in KV."""

    def __init__(self, bus: RunnerBus, *, fenced: Fenced | None = None,
                 live: Callable[[str], RolloutRecord | None] = lambda _id: None,
                 running: Callable[[str], RolloutRecord | None] = lambda _service: None,
                 retention: Retention | None = None) -> None:
        self.bus = bus
        self.fenced = fenced
        self._live = live  # the record of a rollout driven here, which may be ahead of KV
        self._running = running  # a rollout of the service driven here and not ended
        self.fleet = bus.fleet
        self.rollouts = subjects.rollouts_bucket(self.fleet)
        self.desired = subjects.desired_bucket(self.fleet)
        self.locks = subjects.locks_bucket(self.fleet)
        self._complained: set[str] = set()
        # One lock operation per service at a time: a release (read, then delete) must not
        # interleave with a take (read, then write) of the same service's lock.
        self._lock_ops: dict[str, asyncio.Lock] = {}
        self.history = History(bus, fenced=fenced, retention=retention or Retention(),
                               scan=self.records, entries=self.entries)
        self._history_ops = asyncio.Lock()  # one index change (read, write, commit) at a time
        # Per rollout written or read here while leading: the layout of its pages and the record
        # as last persisted, what the next persist writes the changed pages against. Dropped
        # once the record is settled (nothing writes it again).
        self._split: dict[str, tuple[pages.Layout, RolloutRecord]] = {}

    # -- records ----------------------------------------------------------------------------------

    async def load(self, rollout_id: str) -> RolloutRecord | None:
        """A rollout's record as persisted; None if there is none, if the id is not one, or if
        retention reduced it (``find`` says so)."""
        found = await self.load_entry(rollout_id)
        return found[0] if found is not None else None

    async def load_entry(self, rollout_id: str) -> tuple[RolloutRecord, int] | None:
        """``load`` with the record's revision."""
        found = await self.find(rollout_id)
        if found is None or isinstance(found[0], SummarisedRollout):
            return None
        return found[0], found[1]

    async def find(self, rollout_id: str, *, whole: bool = True,
                   seen: bool = False) -> tuple[Stored, int] | None:
        """A rollout as persisted, whole or reduced, and its revision (its head's, for a split
        record, assembled from its pages; with ``whole=False`` the head alone: its spec and
        state, no node table, which at 50,000 nodes is 190 pages to read and decode; with
        ``seen``, its nodes as ``status`` shows them, without their desired states: a fifth of
        the decoding, for showing only); None if there is none."""
        if not _ROLLOUT_ID.match(rollout_id):
            return None
        entry = await bounded(self.bus.kv_get(self.rollouts, rollout_id))
        if entry is None or entry.value is None:
            return None
        try:
            stored = decode_stored(entry.value)
        except ProtocolError:
            record = self.decode(entry)  # logs it once
            return (record, entry.revision) if record is not None else None
        if isinstance(stored, RolloutRecord) and stored.pages and whole:
            stored, layout = await self._assemble(stored, seen=seen)
            if self.fenced is not None and stored.state not in TERMINAL_STATES and not seen:
                self._split[stored.id] = (layout, stored)
        return stored, entry.revision

    async def complete(self, record: RolloutRecord) -> RolloutRecord:
        """``record`` (as ``decode`` read it off ``entries``) whole: a split one's head with its
        pages; BusError if they cannot be read."""
        return (await self._assemble(record))[0] if record.pages else record

    async def _assemble(self, top: RolloutRecord, *,
                        seen: bool = False) -> tuple[RolloutRecord, pages.Layout]:
        """The whole record of a split head, read from its pages (``seen``: as ``PageSeen``);
        BusError if one is missing or unreadable (the record cannot be driven or shown from a
        part of it)."""
        found: list[RolloutPage] = []
        for entry in await self._scan(f"{top.id}.*"):
            try:
                data = unpack_page(entry.value or b"")
                got = (decode(PageSeen, data).page() if seen
                       else shared(decode(RolloutPage, data)))
            except ProtocolError as exc:
                raise BusError(f"rollout {top.id} cannot be read: page {entry.key} is "
                               f"unreadable ({exc})") from None
            if got.index < top.pages:  # an extra page is one a discarded write left
                found.append(got)
        try:
            layout = pages.layout_of(top, found)
        except ValueError as exc:
            raise BusError(f"rollout {top.id} cannot be read: {exc}") from None
        return pages.assemble(top, found), layout

    async def index(self, service: str) -> list[RolloutSummary]:
        """``service``'s recent rollouts as persisted, newest first (``History.index``)."""
        return await self.history.index(service)

    async def indexes(self) -> dict[str, list[RolloutSummary]]:
        """Every service's recent rollouts as persisted."""
        return await self.history.indexes()

    async def latest(self) -> str:
        """The id of the rollout created last in the fleet, or ""."""
        return await self.history.latest()

    async def open_ids(self) -> list[str]:
        """Every rollout that may need a coordinator: each not settled (``RolloutSummary``) and
        each holding a service's lock, read off the indexes and the locks, never the records."""
        out = {s.id for entries in (await self.indexes()).values() for s in entries
               if not s.settled}
        for entry in await bounded(self.bus.kv_entries(self.locks)):
            if entry.key != subjects.FENCE_KEY and entry.value:
                out.add(entry.value.decode(errors="replace"))
        return sorted(out)

    async def entries(self) -> list[Entry]:
        """Every record entry of the rollouts bucket (``decode`` reads them; a split record's
        head, not its pages): a scan, for the history's rebuild and tools; reading rollouts goes
        through the indexes."""
        return [e for e in await self._scan("*") if not e.key.startswith("_") and "." not in e.key]

    async def _scan(self, pattern: str) -> list[Entry]:
        return await scanned(self.bus, self.rollouts, pattern)

    async def records(self) -> list[RolloutRecord]:
        """Every rollout of the fleet kept whole as persisted, newest first: a scan (see
        ``entries``), split records assembled."""
        out = []
        for entry in await self.entries():
            record = self.decode(entry)
            if record is not None and record.pages:
                record = (await self._assemble(record))[0]
            if record is not None:
                out.append(record)
        return sorted(out, key=lambda r: (r.created, r.id), reverse=True)

    @property
    def writer(self) -> Fenced:
        if self.fenced is None:
            raise NotLeading("this coordinator does not lead; writes go to the leader")
        return self.fenced

    def decode(self, entry: Entry) -> RolloutRecord | None:
        """The record in ``entry``, or None (logged once per key) if it does not decode."""
        try:
            stored = decode_stored(entry.value or b"")
        except ProtocolError as exc:
            if entry.key not in self._complained:
                self._complained.add(entry.key)
                log.error("ignoring unreadable rollout record %s: %s", entry.key, exc)
            return None
        return stored if isinstance(stored, RolloutRecord) else None  # reduced: not a record

    async def create(self, record: RolloutRecord, layout: pages.Layout | None = None) -> int:
        """Store a new record (its head and every page of ``layout``, by default as
        ``pages.plan`` cuts it), with its service's index and ``_latest``; its revision. A
        failed write whose head turns out to be there (a lost reply) is a success; one that
        lands later still needs the lock to start."""
        layout = layout or _replan(record)
        try:
            return await self._write(record, layout, None, created=True)
        except BusError:
            entry = await bounded(self.bus.kv_get(self.rollouts, record.id))
            if entry is None or entry.value != encode(pages.head(record, layout)):
                raise
            self._split[record.id] = (layout, record)
            # The batch landed with its index and ``_latest`` writes, which the leader's copy
            # of the history never took: read again (a review found ``latest`` naming the
            # previous rollout for the rest of the leadership).
            self.history.reload()
            return entry.revision

    async def discard(self, record: RolloutRecord) -> None:
        """Delete a record that never started (it lost its service's lock), its pages and its
        summary."""
        writer = self.writer
        async with self._history_ops:
            await self.history.ensure()
            change = self.history.without(record.spec.service, record.id)
            await self._batch(writer, [(record.id, None), *change.writes], change)
        self._split.pop(record.id, None)
        await self._purge_pages([record.id])

    async def persist(self, record: RolloutRecord,
                      touched: Collection[str] | None = None) -> int:
        """Write ``record`` (its head, the pages that changed since its last persist here, and
        the history its summary changes) in one atomic batch; its new revision. Deposed once
        another coordinator leads. ``touched``: the only nodes whose progress may have changed
        since that persist (``pages.dirty``); None compares every node."""
        known = self._split.get(record.id)
        if known is None:
            return await self._write(record, await self._stored_layout(record), None)
        return await self._write(record, known[0], known[1], touched=touched)

    async def _stored_layout(self, record: RolloutRecord) -> pages.Layout:
        """The layout of ``record``'s pages in KV (a record persisted before this coordinator
        knew it, e.g. after a failed write dropped its driver), or a new one for a record kept
        in one value (written before the split: it is split on this write)."""
        entry = await bounded(self.bus.kv_get(self.rollouts, record.id))
        if entry is not None and entry.value:
            try:
                stored = decode_stored(entry.value)
            except ProtocolError:
                stored = None
            if isinstance(stored, RolloutRecord) and stored.pages:
                return (await self._assemble(stored))[1]
        return _replan(record)

    async def _write(self, record: RolloutRecord, layout: pages.Layout,
                     before: RolloutRecord | None, *, created: bool = False,
                     touched: Collection[str] | None = None) -> int:
        layout = pages.place(record, layout)
        changed = (range(len(layout.pages)) if before is None
                   else sorted(pages.dirty(before, record, layout, touched)))
        where = pages.positions(record.waves) if changed else []
        posts = pages.mail(record, layout) if changed else {}
        writes: list[tuple[str, bytes | None]] = [(record.id, encode(pages.head(record, layout)))]
        writes += [(f"{record.id}.{k}",
                    pack_page(encode(pages.page(record, layout, k, where, posts))))
                   for k in changed]
        writer = self.writer
        async with self._history_ops:
            change = await self.history.change(record, created=created)
            if change is None:
                revision = await self._batch(writer, writes, None)
                reduced: list[str] = []
            else:
                # A record that retention reduces in this very write (keep 0) is written reduced,
                # without its pages: one key once per batch (the server refuses a rollup of a key
                # written before it).
                mine = [value for key, value in change.writes if key == record.id]
                rest = [(key, value) for key, value in change.writes if key != record.id]
                ours = [(record.id, mine[0])] if mine else writes
                revision = await self._batch(writer, [*ours, *rest], change)
                reduced = [key for key, _ in change.writes if not key.startswith("_")]
        if (record.state in TERMINAL_STATES and not record.outbox) or record.id in reduced:
            self._split.pop(record.id, None)  # settled: nothing writes it again
        else:
            self._split[record.id] = (layout, record)
        await self._purge_pages(reduced)
        return revision

    async def _purge_pages(self, rollout_ids: list[str]) -> None:
        """Remove the pages of records reduced or deleted (their heads no longer name them).
        Not fenced: a late purge by a deposed leader removes only what its successor would, the
        pages of records already reduced. One that fails leaves garbage, logged, never a wrong
        answer (pages are read only through their head)."""
        for rid in rollout_ids:
            try:
                await bounded(self.bus.kv_purge_keys(self.rollouts, f"{rid}.*"))
            except BusError as exc:
                log.warning("cannot purge the pages of reduced rollout %s (%s); they stay, "
                            "unread", rid, exc)

    async def _batch(self, writer: Fenced, writes: list[tuple[str, bytes | None]],
                     change: Change | None) -> int:
        """Write ``writes`` in one atomic fenced batch (the first is the record's head); its
        revision."""
        results = await writer.write_all(self.rollouts, writes,
                                         rollup=change.keys if change else ())
        failed = next((r for r in results if isinstance(r, BusError)), None)
        if failed is not None:
            raise failed
        self.history.commit(change)
        first = results[0]
        assert isinstance(first, int)
        return first

    def page_of(self, rollout_id: str) -> Mapping[str, int]:
        """Which page keeps each node of a live rollout's record ({} if not known yet)."""
        known = self._split.get(rollout_id)
        return known[0].page_of if known is not None else {}

    async def current_desired(self, service: str) -> dict[str, DesiredState]:
        """Every node's current desired state of ``service``, from the desired bucket."""
        entries = await bounded(self.bus.kv_entries(self.desired, f"*.{service}"))
        out: dict[str, DesiredState] = {}
        for entry in entries:
            try:
                desired = _desired(entry.value)
            except ProtocolError as exc:
                found = await self._last_readable(entry, exc)
                if found is None:
                    continue
                desired = found
            out[desired.node] = desired
        return out

    async def _last_readable(self, entry: Entry, exc: ProtocolError) -> DesiredState | None:
        """The newest desired state the key held before ``entry``, which does not decode.

        No coordinator writes such a value; a principal of the bus can have the server write
        one (the answer to its request, sent to this key as its reply subject: ``Fenced``'s
        ``_refence``). Refusing to plan (as before) let one node's credentials stop every
        deploy and rollback of the service; planning as if the node had none would give it a
        generation its agent refuses. The bucket keeps the key's last revisions: the newest
        that decodes is what the node runs (its agent refused the rest), and the rollout
        writes over the stray one. None: the key was deleted before it (no state). BusError
        when none of them decodes."""
        found, revision = await readable_before(self.bus, self.desired, entry, _desired)
        if revision == 0:
            log.warning("desired state %s holds what no coordinator writes (%s); before it the "
                        "key was deleted: planned as a node with none", entry.key, exc)
            return None
        if found is not None:
            log.warning("desired state %s holds what no coordinator writes (%s): planned from "
                        "the one before it (revision %d)", entry.key, exc, revision)
            return found
        raise BusError(f"desired state {entry.key} is unreadable ({exc}), and so is every "
                       "revision the bucket keeps of it; was it written by another tool?")

    # -- locks ------------------------------------------------------------------------------------

    async def check_lock(self, service: str) -> RolloutRecord | None:
        """Conflict if a live rollout holds ``service``'s lock (read only: a deploy asks before
        it writes anything); else the finished record a stale lock still names (its leader
        may have died before its last writes: ``Runner.deploy`` makes them first), or None."""
        async with self._lock_ops.setdefault(service, asyncio.Lock()):
            return (await self._holder(service, ""))[1]

    async def take_lock(self, service: str, rollout_id: str) -> None:
        """Lock ``service`` for ``rollout_id`` (whose record exists), taking over a stale lock;
        Conflict if another live rollout holds it."""
        async with self._lock_ops.setdefault(service, asyncio.Lock()):
            if not await self._held(service, rollout_id):
                await self.writer.put(self.locks, service, rollout_id.encode())

    async def _held(self, service: str, rollout_id: str) -> bool:
        """Whether the lock already names ``rollout_id``; Conflict if a live rollout other than
        it holds the lock."""
        return (await self._holder(service, rollout_id))[0]

    async def _holder(self, service: str,
                      rollout_id: str) -> tuple[bool, RolloutRecord | None]:
        """Whether the lock already names ``rollout_id``, and the finished record of another
        rollout it still names (stale); Conflict if a live rollout other than it holds it."""
        entry = await bounded(self.bus.kv_get(self.locks, service))
        record = None
        if entry is not None and entry.value is not None:
            holder = entry.value.decode(errors="replace")
            if holder == rollout_id:
                return True, None
            record = self._live(holder) or await self.load(holder)
            if record is not None and record.state not in TERMINAL_STATES:
                raise _locked(service, record)
            if rollout_id:
                log.warning("taking over the stale lock of %s from %s rollout %s", service,
                            record.state if record else "missing", holder[:80])
        # Whatever the key says: a principal of the bus can have the server write the answer
        # to its request into it (``Fenced._refence``), and a lock naming no live rollout would
        # let a second rollout of the service start beside the one driven here.
        running = self._running(service)
        if running is not None and running.id != rollout_id:
            raise _locked(service, running)
        return False, record

    async def release_lock(self, service: str, rollout_id: str) -> None:
        """Delete the lock of ``service`` if it still names ``rollout_id``."""
        async with self._lock_ops.setdefault(service, asyncio.Lock()):
            entry = await bounded(self.bus.kv_get(self.locks, service))
            if entry is None or entry.value != rollout_id.encode():
                return  # not ours (anymore)
            await self.writer.delete(self.locks, service)


def _replan(record: RolloutRecord) -> pages.Layout:
    """A layout for a record that has none yet (one kept in one value, or a test's): pages cut
    at twice each node's size now, room for its target and baselines to come."""
    return pages.plan(pages.order(record),
                      lambda n: 2 * len(encode(record.nodes[n])) + 1024, pages.PAGE_BYTES)


def _desired(value: bytes | None) -> DesiredState:
    """The desired state a desired key's ``value`` holds (ProtocolError if it does not)."""
    env = decode(SignedEnvelope, value or b"")
    return shared(decode(DesiredState, env.payload))  # a record keeps it


def _locked(service: str, record: RolloutRecord) -> Conflict:
    """The refusal of a deploy of ``service`` while ``record`` runs."""
    by = f" (started by {record.started_by})" if record.started_by else ""
    return Conflict(f"service {service} already has rollout {record.id}{by} {record.state}; "
                    f"wait for it ('fleetwave status {record.id}') or stop it with 'fleetwave "
                    f"abort {record.id}'")
