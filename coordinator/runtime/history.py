"""The rollout history in KV: the per-service indexes and the latest rollout, read and written.

Keys and values: ``protocol.history``; what is kept and reduced: ``coordinator.core.history``.

The leader's ``History`` (with a ``Fenced`` writer) holds every index in memory, loaded once per
leadership (``ensure``): only the leader writes them, and each write it makes goes out in the
same atomic, fenced batch as the record whose summary changed (``RolloutStore.persist``), so an
index never says more than the records do, and a deposed leader's index write fails with its
record write. A standby's ``History`` caches nothing and reads the keys on each request.

A fleet written before there were indexes (no ``_latest`` key, records present) has its indexes
rebuilt once from a scan of the records, by the first leader of this version (logged), which
also applies the retention; a standby meanwhile answers from a scan, as before.

Every value written here replaces its key's history (``Nats-Rollup: sub``): the bucket keeps
revisions of records for their own sake, not of indexes rewritten at every step, and a reduced
record leaves no older revision of itself behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from coordinator.core import history as core
from coordinator.core.history import Retention
from coordinator.runtime.calls import bounded
from coordinator.runtime.lease import Fenced
from coordinator.runtime.ports import RunnerBus
from protocol import subjects
from protocol.bus import Entry
from protocol.codec import decode, encode
from protocol.errors import BusError, ProtocolError
from protocol.history import (
    HistoryProbe,
    LatestRollout,
    RolloutSummary,
    ServiceIndex,
    SummarisedRollout,
)
from protocol.messages import RolloutRecord

log = logging.getLogger("fleetwave.coordinator.runner")

Write = tuple[str, bytes | None]
REBUILD_STEP = 2000  # writes of a rebuild per call (4 atomic batches; 100,000 take ~50 calls)
Stored = RolloutRecord | SummarisedRollout


@dataclass
class Change:
    """The history writes that go with one record write, and what they make true once stored."""

    writes: list[Write]
    service: str
    entries: list[RolloutSummary] | None = None  # the service's index once written
    latest: LatestRollout | None = None

    @property
    def keys(self) -> set[str]:
        return {key for key, _ in self.writes}


def decode_stored(data: bytes) -> Stored:
    """A rollout key's value: a record, or what retention left of one (ProtocolError if
    neither)."""
    if decode(HistoryProbe, data).summarised:
        return decode(SummarisedRollout, data)
    return decode(RolloutRecord, data)


class History:
    """The indexes of one fleet; see the module docstring."""

    def __init__(self, bus: RunnerBus, *, fenced: Fenced | None, retention: Retention,
                 scan: Callable[[], Awaitable[list[RolloutRecord]]],
                 entries: Callable[[], Awaitable[list[Entry]]]) -> None:
        self.bus = bus
        self.fenced = fenced
        self.retention = retention
        self.bucket = subjects.rollouts_bucket(bus.fleet)
        self._scan = scan  # every record of the bucket (a standby's fallback)
        self._entries = entries  # ... undecoded (the rebuild)
        self._indexes: dict[str, list[RolloutSummary]] | None = None  # the leader's, once loaded
        self._latest: LatestRollout | None = None
        self._loading = asyncio.Lock()

    # -- reading ----------------------------------------------------------------------------------

    async def index(self, service: str) -> list[RolloutSummary]:
        """``service``'s recent rollouts, newest first."""
        if self.fenced is not None:
            await self.ensure()
            assert self._indexes is not None
            return list(self._indexes.get(service, []))
        entry = await bounded(self.bus.kv_get(self.bucket, subjects.index_key(service)))
        if entry is not None and entry.value:
            return self._decode_index(entry)
        if await self._indexed():
            return []
        return (await self._from_scan()).get(service, [])

    async def indexes(self) -> dict[str, list[RolloutSummary]]:
        """Every service's index (one read per service, whatever the number of rollouts)."""
        if self.fenced is not None:
            await self.ensure()
            assert self._indexes is not None
            return {s: list(e) for s, e in self._indexes.items()}
        entries = await bounded(self.bus.kv_entries(self.bucket, f"{subjects.INDEX_PREFIX}*"))
        if not entries and not await self._indexed():
            return await self._from_scan()
        return {e.key.removeprefix(subjects.INDEX_PREFIX): self._decode_index(e) for e in entries}

    async def latest(self) -> str:
        """The id of the rollout created last, or ""."""
        if self.fenced is not None:
            await self.ensure()
            return self._latest.id if self._latest else ""
        latest = await self._read_latest()
        if latest is not None:
            return latest.id
        newest = core.newest((await self._from_scan()).values(), 1)
        return newest[0].id if newest else ""

    async def _indexed(self) -> bool:
        return await self._read_latest() is not None

    async def _read_latest(self) -> LatestRollout | None:
        entry = await bounded(self.bus.kv_get(self.bucket, subjects.LATEST_KEY))
        if entry is None or not entry.value:
            return None
        try:
            return decode(LatestRollout, entry.value)
        except ProtocolError as exc:
            log.error("ignoring unreadable %s: %s", subjects.LATEST_KEY, exc)
            return None

    def _decode_index(self, entry: Entry) -> list[RolloutSummary]:
        try:
            return decode(ServiceIndex, entry.value or b"").rollouts
        except ProtocolError as exc:
            log.error("ignoring unreadable rollout index %s: %s", entry.key, exc)
            return []

    async def _from_scan(self) -> dict[str, list[RolloutSummary]]:
        """Indexes made from every record (a fleet not indexed yet), not retained."""
        summaries = [core.summarise(r) for r in await self._scan()]
        return {s: r.entries for s, r in core.rebuild(summaries, Retention(core.KEEP_MAX)).items()}

    # -- the leader's copy ------------------------------------------------------------------------

    async def ensure(self) -> None:
        """Load every index once (the leader), rebuilding them from the records if the fleet has
        none yet."""
        if self._indexes is not None:
            return
        async with self._loading:
            if self._indexes is not None:
                return
            latest = await self._read_latest()
            if latest is None:
                await self._rebuild()
                return
            entries = await bounded(self.bus.kv_entries(self.bucket, f"{subjects.INDEX_PREFIX}*"))
            unreadable = [e.key for e in entries if not _decodes(e)]
            if unreadable:
                # No coordinator writes one; a principal of the bus can have the server write
                # the answer to its request there (``Fenced._refence``). Taken as empty, the
                # service would lose its history (``rollouts``, and what ``rollback`` goes
                # back to) at the next index write: made again from the records instead.
                log.error("rollout index %s is unreadable: the indexes are made again from "
                          "the records", ", ".join(sorted(unreadable)))
                await self._rebuild()
                return
            self._latest = latest
            self._indexes = {e.key.removeprefix(subjects.INDEX_PREFIX): self._decode_index(e)
                             for e in entries}

    async def _rebuild(self) -> None:
        """Indexes, retention and ``_latest`` from a scan of every record (once per fleet)."""
        assert self.fenced is not None
        # One record decoded at a time: what is kept of each is its summary and its spec.
        summaries: list[RolloutSummary] = []
        specs: dict[str, Stored] = {}
        for entry in await self._entries():
            try:
                stored = decode_stored(entry.value or b"")
            except ProtocolError as exc:
                log.error("ignoring unreadable rollout record %s: %s", entry.key, exc)
                continue
            if isinstance(stored, SummarisedRollout):
                summaries.append(msgspec.structs.replace(stored.summary, whole=False))
                continue
            summaries.append(core.summarise(stored))
            specs[stored.id] = SummarisedRollout(summary=summaries[-1], spec=stored.spec)
        if not summaries:  # a new fleet: the first create writes every key
            self._indexes, self._latest = {}, None
            return
        log.warning("rollout indexes missing (a fleet from before they existed): rebuilding "
                    "them from %d records, keeping the last %d of each service whole",
                    len(summaries), self.retention.keep)
        built = core.rebuild(summaries, self.retention)
        newest = max(summaries, key=lambda r: (r.created, r.id))
        latest = LatestRollout(id=newest.id, created=newest.created, term=self._term)
        writes: list[Write] = []
        for service, retained in built.items():
            writes += self._reduced(retained.reduce, specs)
            writes.append(self._index_write(service, retained.entries))
        writes.append((subjects.LATEST_KEY, encode(latest)))  # last: "indexed" once all landed
        for start in range(0, len(writes), REBUILD_STEP):  # each step bounded on its own
            step = writes[start:start + REBUILD_STEP]
            results = await self.fenced.write_all(self.bucket, step, rollup={k for k, _ in step})
            failed = next((r for r in results if isinstance(r, BusError)), None)
            if failed is not None:
                raise failed  # retried by the caller: what landed is written the same again
        self._indexes = {service: retained.entries for service, retained in built.items()}
        self._latest = latest
        log.warning("rollout indexes rebuilt: %d services, %d records reduced to summaries",
                    len(built), sum(len(r.reduce) for r in built.values()))

    # -- writing ----------------------------------------------------------------------------------

    async def change(self, stored: RolloutRecord, *, created: bool = False) -> Change | None:
        """The history writes that go with writing ``stored`` (None: its summary is unchanged)."""
        await self.ensure()
        assert self._indexes is not None
        service = stored.spec.service
        summary = core.summarise(stored)
        entries = self._indexes.get(service, [])
        old = next((e for e in entries if e.id == summary.id), None)
        latest = (LatestRollout(id=stored.id, created=stored.created, term=self._term)
                  if created or self._latest is None else None)
        if old is not None and core.same(summary, old) and latest is None:
            return None
        retained = core.with_summary(entries, summary, self.retention)
        writes = [self._index_write(service, retained.entries)]
        if retained.reduce:
            writes += await self._reduce(retained.reduce)
        if latest is not None:
            writes.append((subjects.LATEST_KEY, encode(latest)))
        return Change(writes, service, retained.entries, latest)

    def without(self, service: str, rollout_id: str) -> Change:
        """The index write that forgets a record discarded before it started."""
        assert self._indexes is not None
        entries = core.without(self._indexes.get(service, []), rollout_id)
        return Change([self._index_write(service, entries)], service, entries)

    def reload(self) -> None:
        """Drop the leader's copy: the next ``ensure`` reads the indexes and ``_latest`` again
        (a write whose reply was lost changed them, or not)."""
        self._indexes, self._latest = None, None

    def commit(self, change: Change | None) -> None:
        """``change`` was stored: the leader's copy says so too."""
        if change is None or self._indexes is None:
            return
        if change.entries is not None:
            self._indexes[change.service] = change.entries
        if change.latest is not None and (self._latest is None
                                          or change.latest.created >= self._latest.created):
            self._latest = change.latest

    @property
    def _term(self) -> int:
        return self.fenced.term if self.fenced is not None else 0

    def _index_write(self, service: str, entries: list[RolloutSummary]) -> Write:
        return (subjects.index_key(service), encode(ServiceIndex(service=service,
                                                                 rollouts=entries,
                                                                 term=self._term)))

    async def _reduce(self, summaries: list[RolloutSummary]) -> list[Write]:
        """The writes that reduce these rollouts' records (each read once for its spec)."""
        records: dict[str, Stored] = {}
        for s in summaries:
            entry = await bounded(self.bus.kv_get(self.bucket, s.id))
            if entry is None or not entry.value:
                continue  # gone: nothing to reduce
            try:
                records[s.id] = decode_stored(entry.value)
            except ProtocolError as exc:
                log.error("not reducing unreadable rollout record %s: %s", s.id, exc)
        return self._reduced(summaries, records)

    def _reduced(self, summaries: list[RolloutSummary], records: dict[str, Stored]) -> list[Write]:
        out: list[Write] = []
        for s in summaries:
            rec = records.get(s.id)
            if rec is not None:
                out.append((s.id, encode(SummarisedRollout(summary=s, spec=rec.spec,
                                                           term=self._term))))
        return out


def _decodes(entry: Entry) -> bool:
    """Whether a service index entry holds an index."""
    try:
        decode(ServiceIndex, entry.value or b"")
    except ProtocolError:
        return False
    return True
