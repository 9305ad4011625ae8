"""The rollout store's side of the record split (``coordinator.core.pages``): what a step
writes, what a reader and a resuming leader read back, retention, and records written whole by
an earlier coordinator."""

from __future__ import annotations

import zlib

import msgspec
import pytest

from coordinator.core import pages
from coordinator.core.history import Retention
from coordinator.runtime.runner import Runner
from protocol.codec import encode
from protocol.errors import BusError
from protocol.history import PAGE_MAX_BYTES, SummarisedRollout, unpack_page
from protocol.messages import RolloutRecord
from protocol.testing import NEW, OLD, FakeBus, FakeClock, spec
from tests.unit.coordinator.runtime.test_history import settle
from tests.unit.coordinator.runtime.test_runner import (
    ROLLOUTS,
    SEED,
    fenced,
    fleet_bus,
    report,
    views,
)

N = 12


@pytest.fixture(autouse=True)
def tiny_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of ~3 nodes, so that a dozen nodes make several."""
    monkeypatch.setattr(pages, "PAGE_BYTES", 3 * 2600)


def make(bus: FakeBus, clock: FakeClock, keep: int = 50) -> Runner:
    table = views(N)
    return Runner(bus, seed=SEED, fenced=fenced(bus), nodes=lambda: table, clock=clock,
                  retention=Retention(keep))


def written(bus: FakeBus, since: int) -> list[str]:
    """The keys of the rollouts bucket written after log entry ``since``."""
    return [k for _, b, k, v in bus.log[since:] if b == ROLLOUTS and v is not None
            and not k.startswith("_")]


def bare(record: RolloutRecord) -> RolloutRecord:
    """``record`` without what the runner adds to it when persisting (outbox, term)."""
    return msgspec.structs.replace(record, outbox=[], term=0)


async def drive(r: Runner, bus: FakeBus, clock: FakeClock, rid: str) -> str:
    for _ in range(60):
        clock.t += 1
        for i in range(1, N + 1):
            await report(r, bus, f"node-{i}", clock.t)
        await r.step()
        if rid not in r.drivers:
            return bus.record(rid).state
    raise AssertionError("the rollout did not end")


async def test_a_step_writes_the_head_and_the_pages_it_changed() -> None:
    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock)
    rec = await r.deploy(spec(batch="3", max_unavailable="3"), NEW)
    assert bare(bus.record(rec.id)) == bare(r.drivers[rec.id].rollout.record)
    stored_pages = [k for k in bus.kv[ROLLOUTS] if k.startswith(f"{rec.id}.")]
    assert len(stored_pages) >= 2
    since = len(bus.log)
    clock.t += 1
    await report(r, bus, "node-1", clock.t)  # one node of wave 0 converged
    await r.step()
    keys = written(bus, since)
    assert keys[0] == rec.id  # the head first, in the same batch as its pages
    assert len(keys) == 2, keys  # ... and the one page that holds node-1
    assert bare(bus.record(rec.id)) == bare(r.drivers[rec.id].rollout.record)


async def test_a_resumed_leader_reads_the_split_record_back_exactly() -> None:
    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock)
    rec = await r.deploy(spec(batch="3", max_unavailable="3"), NEW)
    clock.t += 1
    for i in (1, 2, 3):
        await report(r, bus, f"node-{i}", clock.t)
    await r.step()
    live = r.drivers[rec.id].rollout.record
    assert live.current_wave == 1
    r2 = make(bus, clock)
    await r2.resync()
    resumed = r2.drivers[rec.id].rollout.record
    assert bare(resumed) == bare(live)
    assert await drive(r2, bus, clock, rec.id) == "succeeded"


async def test_a_missing_page_makes_the_record_unreadable_not_wrong() -> None:
    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock)
    rec = await r.deploy(spec(batch="3", max_unavailable="3"), NEW)
    del bus.kv[ROLLOUTS][f"{rec.id}.1"]
    reader = make(bus, clock)
    with pytest.raises(BusError, match=rf"rollout {rec.id} cannot be read: 1 of its \d+ pages "
                                       rf"are missing \(first: {rec.id}.1\)"):
        await reader.store.find(rec.id)


async def test_a_head_only_read_reads_no_page() -> None:
    """``find(whole=False)`` (what ``rollback`` needs of an earlier rollout: its spec): the
    stored head, its node table left in its pages, none of which is read."""
    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock)
    rec = await r.deploy(spec(batch="3", max_unavailable="3"), NEW)
    assert await drive(r, bus, clock, rec.id) == "succeeded"
    for key in [k for k in bus.kv[ROLLOUTS] if k.startswith(f"{rec.id}.")]:
        del bus.kv[ROLLOUTS][key]  # were a page read, the record would be unreadable
    found = await make(bus, clock).find(rec.id, whole=False)
    assert isinstance(found, RolloutRecord) and found.pages > 1 and found.nodes == {}
    assert found.spec == rec.spec and found.state == "succeeded"
    with pytest.raises(BusError, match="pages are missing"):
        await make(bus, clock).find(rec.id)


async def test_a_status_read_shows_what_a_whole_read_shows() -> None:
    """``find(seen=True)`` (``status`` of a stored rollout): the pages read without their
    desired states, and the status built from it equal to the whole record's, running and
    finished; the writer's cache of split records is left alone."""
    from coordinator.api.rollouts import status_dict

    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock)
    rec = await r.deploy(spec(batch="3", max_unavailable="3"), NEW)
    clock.t += 1
    for i in (1, 2):
        await report(r, bus, f"node-{i}", clock.t)
    await r.step()
    for done in (False, True):
        if done:
            assert await drive(r, bus, clock, rec.id) == "succeeded"
        reader = make(bus, clock)
        whole, shown = await reader.find(rec.id), await reader.find(rec.id, seen=True)
        assert isinstance(whole, RolloutRecord) and isinstance(shown, RolloutRecord)
        assert all(p.target is None and p.previous is None for p in shown.nodes.values())
        assert any(p.target is not None for p in whole.nodes.values())
        assert status_dict(shown) == status_dict(whole)
        assert status_dict(shown, max_nodes=4) == status_dict(whole, max_nodes=4)
        if not done:  # running: a whole read is cached for writing, a status read never
            fresh = make(bus, clock)
            await fresh.store.find(rec.id, seen=True)
            assert rec.id not in fresh.store._split
            await fresh.store.find(rec.id)
            assert rec.id in fresh.store._split


async def test_retention_purges_the_pages_of_the_records_it_reduces() -> None:
    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock, keep=1)
    ids = []
    for i in range(3):
        clock.t += 10
        release = NEW if i % 2 == 0 else OLD
        rec = await r.deploy(spec(version=release.version, batch="50%",
                                  max_unavailable="50%"), release)
        assert await drive(r, bus, clock, rec.id) == "succeeded"
        await settle(r, bus, clock)
        ids.append(rec.id)
    for rid in ids[:2]:
        assert isinstance(await r.find(rid), SummarisedRollout)
        assert [k for k in bus.kv[ROLLOUTS] if k.startswith(f"{rid}.")] == []
    assert [k for k in bus.kv[ROLLOUTS] if k.startswith(f"{ids[2]}.")]
    found = await r.find(ids[2])
    assert isinstance(found, RolloutRecord) and len(found.nodes) == N


async def test_a_record_written_whole_by_an_earlier_coordinator_is_resumed_and_split() -> None:
    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock)
    rec = await r.deploy(spec(batch="3", max_unavailable="3"), NEW)
    whole = r.drivers[rec.id].rollout.record
    for key in [k for k in bus.kv[ROLLOUTS] if k.startswith(f"{rec.id}.")]:
        del bus.kv[ROLLOUTS][key]
    bus.set("put", ROLLOUTS, rec.id, encode(whole))  # as the previous version wrote it
    r2 = make(bus, clock)
    found = await r2.store.find(rec.id)
    assert found is not None and found[0] == whole
    await r2.resync()
    assert await drive(r2, bus, clock, rec.id) == "succeeded"
    assert bus.record(rec.id).pages == 0  # bus.record assembles: the head named its pages
    top = bus.live(ROLLOUTS, rec.id)
    assert top is not None and top.value is not None and b'"pages":0' not in top.value


async def test_pages_are_stored_deflated_and_a_page_stored_plain_is_read_too() -> None:
    """Every page goes to KV deflated (``pack_page``), smaller than its JSON; a record whose
    pages an earlier coordinator stored as plain JSON is read back the same and driven on."""
    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock)
    rec = await r.deploy(spec(batch="3", max_unavailable="3"), NEW)
    live = r.drivers[rec.id].rollout.record
    keys = [k for k in bus.kv[ROLLOUTS] if k.startswith(f"{rec.id}.")]
    assert len(keys) > 1
    for key in keys:
        value = bus.kv[ROLLOUTS][key].value
        assert value is not None and value[:1] != b"{"
        assert len(value) < len(unpack_page(value))
        bus.set("put", ROLLOUTS, key, unpack_page(value))  # as stored before: plain JSON
    r2 = make(bus, clock)
    await r2.resync()
    assert bare(r2.drivers[rec.id].rollout.record) == bare(live)
    assert await drive(r2, bus, clock, rec.id) == "succeeded"


@pytest.mark.parametrize("value, why", [
    (zlib.compress(bytes(PAGE_MAX_BYTES + 1), 9), "inflates past 64 MiB"),
    (zlib.compress(b'{"schema": 1}' * 100)[:-8], "cut short"),
    (zlib.compress(b'{"schema": 1}') + b"more", "bytes follow its end"),
    (b"\x00garbage", "not a page"),
    (b"", "empty"),
])
async def test_a_hostile_page_makes_the_record_unreadable_and_is_never_inflated_whole(
        value: bytes, why: str) -> None:
    """A page value that inflates past PAGE_MAX_BYTES (a deflate bomb: 64 MiB of zeros is 64
    KiB deflated), one cut short or followed by more bytes, an empty one, or one that is not
    deflated JSON at all: the record is
    unreadable, said in one line naming the page, and nothing past the bound is inflated."""
    bus, clock = fleet_bus(N), FakeClock()
    r = make(bus, clock)
    rec = await r.deploy(spec(batch="3", max_unavailable="3"), NEW)
    bus.set("put", ROLLOUTS, f"{rec.id}.1", value)
    with pytest.raises(BusError, match=rf"rollout {rec.id} cannot be read: page {rec.id}\.1 is "
                                       rf"unreadable \(.*{why}"):
        await make(bus, clock).store.find(rec.id)
