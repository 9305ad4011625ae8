"""The rollout history in KV (``coordinator.runtime.history``) on the fake bus: the index is
written with the record, retention reduces old records, a missing index is rebuilt once, and the
resync and the reading verbs never scan every record."""

from __future__ import annotations

import logging

import pytest

from coordinator.core.history import Retention
from coordinator.runtime.history import decode_stored
from coordinator.runtime.runner import OUTBOX_CLEAR_AFTER, Runner
from protocol import subjects
from protocol.codec import decode, encode
from protocol.history import LatestRollout, ServiceIndex, SummarisedRollout
from protocol.messages import RolloutRecord
from protocol.testing import FLEET, NEW, OLD, FakeBus, FakeClock, spec
from tests.unit.coordinator.runtime.test_runner import SEED, drive, fenced, fleet_bus, views

ROLLOUTS = subjects.rollouts_bucket(FLEET)


class CountingBus(FakeBus):
    """A fake bus that counts the scans of the rollouts bucket (every key read at once)."""

    scans = 0

    async def kv_entries(self, bucket: str, pattern: str = ">") -> list:  # type: ignore[type-arg]
        if bucket == ROLLOUTS and pattern in (">", "*"):  # every record (or every head)
            self.scans += 1
        return await super().kv_entries(bucket, pattern)


def counting_bus() -> CountingBus:
    bus = CountingBus()
    base = fleet_bus()
    bus.kv, bus.log = base.kv, base.log
    return bus


def make(bus: FakeBus, clock: FakeClock, keep: int = 50) -> Runner:
    table = views()
    return Runner(bus, seed=SEED, fenced=fenced(bus), nodes=lambda: table, clock=clock,
                  retention=Retention(keep))


def index(bus: FakeBus, service: str = "hello") -> ServiceIndex:
    e = bus.live(ROLLOUTS, subjects.index_key(service))
    assert e is not None and e.value is not None
    return decode(ServiceIndex, e.value)


async def settle(r: Runner, bus: FakeBus, clock: FakeClock) -> None:
    """The stream acknowledges every queued event, and the outboxes are cleared."""
    await r.events.publish(bus, r.events.pending(expand=False))
    clock.t += OUTBOX_CLEAR_AFTER
    await r.step()


async def finished(r: Runner, bus: FakeBus, clock: FakeClock, n: int) -> list[str]:
    """``n`` rollouts of hello, one after the other, each succeeded and settled."""
    ids = []
    for i in range(n):
        clock.t += 10
        release = NEW if i % 2 == 0 else OLD  # to and fro
        rec = await r.deploy(spec(version=release.version), release)
        assert await drive(r, bus, clock, rec.id) == "succeeded"
        await settle(r, bus, clock)
        ids.append(rec.id)
    return ids


async def test_the_index_and_latest_are_written_with_the_record() -> None:
    """Created, the rollout is in its service's index and is _latest; terminal and settled,
    the index says so."""
    bus, clock = fleet_bus(), FakeClock()
    r = make(bus, clock)
    rec = await r.deploy(spec(), NEW)
    [entry] = index(bus).rollouts
    assert entry.id == rec.id and entry.state != "succeeded" and not entry.settled
    latest = bus.live(ROLLOUTS, subjects.LATEST_KEY)
    assert latest is not None and decode(LatestRollout, latest.value or b"").id == rec.id
    await drive(r, bus, clock, rec.id)
    await settle(r, bus, clock)
    [entry] = index(bus).rollouts
    assert (entry.state, entry.settled, entry.whole) == ("succeeded", True, True)


async def test_old_records_are_reduced_to_their_summary_past_keep() -> None:
    """keep=2 and 4 rollouts: the 2 oldest keys hold a SummarisedRollout with their spec, and
    ``find`` answers with it while ``get`` (a record) does not."""
    bus, clock = fleet_bus(), FakeClock()
    r = make(bus, clock, keep=2)
    ids = await finished(r, bus, clock, 4)
    for rid in ids[:2]:
        e = bus.live(ROLLOUTS, rid)
        assert e is not None and e.value is not None
        stored = decode_stored(e.value)
        assert isinstance(stored, SummarisedRollout)
        assert stored.summary.id == rid and stored.summary.state == "succeeded"
        assert stored.spec.service == "hello"
        assert isinstance(await r.find(rid), SummarisedRollout)
        assert await r.get(rid) is None
    for rid in ids[2:]:
        assert isinstance(await r.find(rid), RolloutRecord)
    assert [e.whole for e in index(bus).rollouts] == [True, True, False, False]
    rows = await r.history("hello", 10)
    assert [s.id for s in rows] == ids[::-1]


async def test_a_fleet_without_indexes_gets_them_rebuilt_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Records written by an older coordinator (no index keys): the first leader rebuilds the
    indexes and _latest from one scan, logged, and applies the retention."""
    bus, clock = counting_bus(), FakeClock()
    for i in range(5):
        rec = RolloutRecord(id=f"hello-old-{i}", spec=spec(), release=NEW, from_version="1.0.0",
                            state="succeeded", created=float(i))
        bus.set("put", ROLLOUTS, rec.id, encode(rec))
    r = make(bus, clock, keep=3)
    with caplog.at_level(logging.WARNING):
        await r.resync()
    assert "rebuilding them from 5 records" in caplog.text
    assert bus.scans == 1
    assert [e.id for e in index(bus).rollouts] == [f"hello-old-{i}" for i in (4, 3, 2, 1, 0)]
    assert isinstance(await r.find("hello-old-0"), SummarisedRollout)
    assert (await r.latest()) is not None
    await r.resync()
    r2 = make(bus, clock, keep=3)  # the next leader finds them
    await r2.resync()
    assert bus.scans == 1


async def test_resync_and_reads_do_not_scan_the_records() -> None:
    """After rollouts, a new leader resumes, lists, reads the latest and chooses a rollback
    without reading every record."""
    bus, clock = counting_bus(), FakeClock()
    r = make(bus, clock, keep=2)
    await finished(r, bus, clock, 3)
    clock.t += 10
    live = await r.deploy(spec(version=OLD.version), OLD)  # killed mid-rollout
    assert live.state == "running"
    bus.scans = 0
    r2 = make(bus, clock, keep=2)
    await r2.resync()
    assert live.id in r2.drivers  # resumed, named by the index (and the lock)
    assert len(await r2.history("", 50)) == 4
    latest = await r2.latest()
    assert latest is not None and isinstance(latest, RolloutRecord) and latest.id == live.id
    assert bus.scans == 0


async def test_a_discarded_record_leaves_the_index() -> None:
    """A record that never started and is discarded is forgotten by its index too."""
    bus, clock = fleet_bus(), FakeClock()
    r = make(bus, clock)
    rec = RolloutRecord(id="hello-x", spec=spec(), release=OLD, created=1.0)
    await r.store.create(rec)
    assert [e.id for e in index(bus).rollouts] == ["hello-x"]
    await r.store.discard(rec)
    assert index(bus).rollouts == [] and bus.live(ROLLOUTS, "hello-x") is None


async def test_an_unreadable_index_is_made_again_from_the_records(
        caplog: pytest.LogCaptureFixture) -> None:
    """A service index holding what no coordinator writes (a node's request's answer, sent
    there as its reply subject) does not cost the service its history: the next leader makes
    the indexes again from the records instead of taking it as empty."""
    bus, clock = counting_bus(), FakeClock()
    r = make(bus, clock)
    ids = await finished(r, bus, clock, 3)
    bus.set("put", ROLLOUTS, subjects.index_key("hello"),
            b'{"type":"io.nats.jetstream.api.v1.pub_ack","stream":"x"}')
    r2 = make(bus, clock)  # the next leader
    with caplog.at_level(logging.WARNING):
        await r2.resync()
    assert "is unreadable: the indexes are made again" in caplog.text
    assert [e.id for e in index(bus).rollouts] == ids[::-1]
    assert [s.id for s in await r2.history("hello", 10)] == ids[::-1]
