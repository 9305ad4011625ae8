"""The rollout runner against an in-memory bus, in virtual time: command order, idempotent
desired writes, the per-service lock, resuming after a crash, and failures of the bus."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from typing import Any

import pytest

import coordinator.runtime.runner as runner_mod
from coordinator.core import pages
from coordinator.core.engine import Pause, Resume, Rollout
from coordinator.core.fleet import Fleet
from coordinator.errors import RemoteError, UsageError
from coordinator.runtime.desired import SCAN_FROM
from coordinator.runtime.driver import HOLD_PERSIST
from coordinator.runtime.lease import Fence, Fenced, fenced_buckets
from coordinator.runtime.runner import OUTBOX_CLEAR_AFTER, OUTBOX_RETRY, Runner
from protocol import subjects
from protocol.bus import FENCED_BATCH, FENCED_IN_FLIGHT, Entry
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict
from protocol.events import EVENT_ATTEMPTS, PACK, unpacked
from protocol.history import RolloutPage, assemble, unpack_page
from protocol.messages import (
    DesiredState,
    Event,
    FenceMarker,
    Heartbeat,
    NodeView,
    ObservedState,
    ReleaseRef,
    RolloutRecord,
    SignedEnvelope,
    SlotStatus,
)
from protocol.signing import generate_seed, public_key, sign, verify
from protocol.testing import FLEET, NEW, OLD, PUBLISH, FakeBus, FakeClock, desired, spec

SEED = generate_seed()
DESIRED = subjects.desired_bucket(FLEET)
ROLLOUTS = subjects.rollouts_bucket(FLEET)
LOCKS = subjects.locks_bucket(FLEET)
OBSERVED = subjects.observed_bucket(FLEET)


class Killed(BaseException):
    """The coordinator process died here (kill -9): nothing after it runs."""


def fleet_bus(n: int = 3) -> FakeBus:
    """A bus whose desired bucket has every node on 1.0.0 at generation 7, fenced by term 1."""
    bus = FakeBus()
    for i in range(1, n + 1):
        d = desired(f"node-{i}")
        bus.set("put", DESIRED, f"node-{i}.hello", encode(sign(SEED, d)))
    fence(bus, 1)
    bus.log.clear()
    return bus


def fence(bus: FakeBus, term: int) -> None:
    """A leader of ``term`` fenced every bucket (``lease.write_fences``, in memory)."""
    for bucket in fenced_buckets(FLEET):
        bus.set("put", bucket, subjects.FENCE_KEY, encode(FenceMarker(term=term, holder="t")))


def fenced(bus: FakeBus) -> Fenced:
    """The writer of the leader whose fences the bus holds now."""
    seqs = {}
    term = 0
    for bucket in fenced_buckets(FLEET):
        marker = bus.live(bucket, subjects.FENCE_KEY)
        assert marker is not None and marker.value is not None
        seqs[bucket] = marker.revision
        term = decode(FenceMarker, marker.value).term
    return Fenced(bus, Fence(term=term, seqs=seqs))


def views(n: int = 3, *, offline: tuple[str, ...] = (), heard: bool = True) -> list[NodeView]:
    return [NodeView(id=f"node-{i}", labels={"zone": "a"}, online=f"node-{i}" not in offline,
                     last_seen=1000.0 if heard else None) for i in range(1, n + 1)]


def runner(bus: FakeBus, clock: FakeClock, nodes: list[NodeView] | None = None,
           **kw: float) -> Runner:
    table = nodes if nodes is not None else views()
    return Runner(bus, seed=SEED, fenced=fenced(bus), nodes=lambda: table, clock=clock, **kw)


async def report(r: Runner, bus: FakeBus, node: str, t: float, *, healthy: bool = True) -> None:
    """The node's agent converged on its current desired state (or failed to) at time ``t``."""
    d = bus.desired(node)
    assert d is not None
    slots = {s: SlotStatus(slot=s, status="healthy" if healthy or ref == OLD else "failed",
                           version=ref.version) for s, ref in d.slots.items()}
    seen = ObservedState(
        node=node, service="hello", generation=d.generation, slots=slots, time=t,
        observed_generation=d.generation if healthy else d.generation - 1,
        weights=dict(d.weights) if healthy else {}, phase="converged" if healthy else "failed",
        error="" if healthy else "health check failed",
    )
    await r.on_observed(Entry(f"{node}.hello", encode(seen), 1))


async def drive(r: Runner, bus: FakeBus, clock: FakeClock, rid: str, *, limit: int = 50) -> str:
    """Let every node converge on whatever it is told, tick by tick, until the rollout ends."""
    for _ in range(limit):
        clock.t += 1
        for i in (1, 2, 3):
            await report(r, bus, f"node-{i}", clock.t)
        await r.step()
        if rid not in r.drivers:
            return bus.record(rid).state
    raise AssertionError("the rollout did not end")


async def test_persist_comes_before_the_desired_writes_it_decided() -> None:
    """Every desired write happens after a persisted record already names that generation."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(), NEW)
    assert await drive(r, bus, clock, rec.id) == "succeeded"
    head: RolloutRecord | None = None
    pages: dict[int, RolloutPage] = {}  # the record is a head and its pages (core.pages)
    writes = 0
    for op, bucket, key, value in bus.log:
        if bucket == ROLLOUTS and value is not None and not key.startswith("_"):
            if "." in key:
                got = decode(RolloutPage, unpack_page(value))
                pages[got.index] = got
            else:
                head = decode(RolloutRecord, value)
        elif bucket == DESIRED and value is not None:
            writes += 1
            gen = decode(SignedEnvelope, value).generation
            assert head is not None
            last_record = assemble(head, pages.values())
            target = last_record.nodes[key.split(".")[0]].target
            assert target is not None and target.generation == gen, (op, key, gen)
    assert writes == 6  # three forward writes, three retirements of the old slot


async def test_a_rollout_runs_to_success_and_releases_its_lock() -> None:
    """Nodes move one by one; success retires old slots, deletes the lock, emits every event."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(), NEW)
    assert bus.live(LOCKS, "hello") is not None
    assert await drive(r, bus, clock, rec.id) == "succeeded"
    assert bus.live(LOCKS, "hello") is None
    for i in (1, 2, 3):
        d = bus.desired(f"node-{i}")
        assert d is not None and d.slots == {"b": NEW} and d.weights == {"b": 100}
    events = r.events.pending()
    kinds = [e.kind for e in events]
    assert kinds[0] == "rollout.started" and kinds[-1] == "rollout.succeeded"
    assert all(e.rollout == rec.id and e.service == "hello" and e.fleet == FLEET for e in events)
    assert len({e.id for e in events}) == len(events)


async def test_a_second_deploy_plans_from_what_this_leader_wrote_without_reading_the_bucket(
) -> None:
    """A deploy plans from every node's current desired state. A leader that read them all once
    (the first deploy) and wrote every change since knows them: the next deploy of the service
    reads no bucket (0.7 s of every 10,000-node deploy's start) and plans from what is stored."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    first = await r.deploy(spec(), NEW)
    assert await drive(r, bus, clock, first.id) == "succeeded"
    bus.faults[("entries", DESIRED)] = BusError("the desired bucket is not read again")
    bus.fault_count[("entries", DESIRED)] = 10**6
    stored = {f"node-{i}": bus.desired(f"node-{i}") for i in (1, 2, 3)}
    second = await r.deploy(spec(version=OLD.version), OLD)
    for node, state in stored.items():
        assert state is not None and state.slots == {"b": NEW}
        assert second.nodes[node].previous == state
    assert bus.fault_count[("entries", DESIRED)] == 10**6


async def test_what_the_writer_knows_of_a_service_is_read_again_when_it_may_be_wrong() -> None:
    """The writer keeps a service's states only from a read that none of its own writes to the
    service overlapped (a snapshot can miss a write on its way), and forgets them after a write
    whose outcome it does not know: the next ``current`` reads the bucket."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    reads = 0

    async def read() -> dict[str, DesiredState]:
        nonlocal reads
        reads += 1
        states = await r.store.current_desired("hello")
        if reads == 1:  # a write of the service lands while this read is under way
            await r.desired.write(desired("node-1", generation=8, release=NEW))
        return states

    first = await r.desired.current("hello", read)
    assert first["node-1"].generation == 7  # the snapshot missed it ...
    again = await r.desired.current("hello", read)
    assert reads == 2 and again["node-1"].generation == 8  # ... so it was not kept
    await r.desired.write(desired("node-2", generation=8, release=NEW))
    known = await r.desired.current("hello", read)
    assert reads == 2 and known["node-2"] == bus.desired("node-2")  # kept by the write
    known.clear()  # a caller's copy
    assert len(await r.desired.current("hello", read)) == 3 and reads == 2

    bus.faults[("update", DESIRED)] = BusError("the server did not answer")
    with pytest.raises(BusError):
        await r.desired.write(desired("node-3", generation=8, release=NEW))
    after = await r.desired.current("hello", read)
    assert reads == 3 and after["node-3"] == bus.desired("node-3")


async def test_desired_writes_are_idempotent_by_generation() -> None:
    """A desired state is skipped when KV holds that generation or newer, written when older."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    same = DesiredState(fleet=FLEET, node="node-1", service="hello", generation=7,
                        slots={"b": NEW}, weights={"b": 100})
    assert await r.desired.write(same) is False
    assert bus.desired("node-1").slots == {"a": OLD}  # type: ignore[union-attr]
    newer = DesiredState(fleet=FLEET, node="node-1", service="hello", generation=8,
                         slots={"b": NEW}, weights={"b": 100})
    assert await r.desired.write(newer) is True
    assert await r.desired.write(newer) is False
    assert bus.desired_writes() == [("node-1.hello", 8)]


async def test_many_keys_first_written_in_a_term_are_read_by_one_scan_and_go_forward_only(
) -> None:
    """A leader's first wave over thousands of nodes reads their stored generations by one
    scan of the service's keys, not one read a key (29 s for 10,000), then writes them in one
    batch: never backwards over a newer state, and a key not there yet is written too."""
    n = SCAN_FROM + 50
    bus, clock = fleet_bus(n), FakeClock()
    bus.set("put", DESIRED, "node-5.hello", encode(sign(SEED, desired("node-5", generation=9))))
    bus.log.clear()
    bus.faults[("get", DESIRED)] = BusError("no key is read one by one")
    bus.fault_count[("get", DESIRED)] = 10**6
    r = runner(bus, clock)
    writes = [desired(f"node-{i}", generation=8) for i in range(1, n + 2)]  # node-<n+1>: new
    await r.desired.write_all(writes)
    written = dict(bus.desired_writes())
    assert len(written) == n
    assert "node-5.hello" not in written and bus.desired("node-5").generation == 9  # type: ignore[union-attr]
    assert written[f"node-{n + 1}.hello"] == 8
    assert bus.fault_count[("get", DESIRED)] == 10**6


async def test_a_second_deploy_of_the_service_is_refused_naming_the_first() -> None:
    """While a rollout runs, another deploy of its service is a Conflict naming the first and
    who started it, and writes nothing."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    first = await r.deploy(spec(), NEW, "alice")
    assert first.started_by == "alice"
    before = list(bus.log)
    with pytest.raises(Conflict, match=f"{first.id} \\(started by alice\\)"):
        await r.deploy(spec(), NEW, "bob")
    assert bus.log == before
    assert list(r.drivers) == [first.id]



@pytest.mark.parametrize("lock", [b'{"type":"io.nats.jetstream.api.v1.pub_ack"}', None])
async def test_a_second_deploy_is_refused_whatever_the_lock_key_holds(lock: bytes | None) -> None:
    """The lock key can hold what no coordinator wrote (the answer to a node's request, sent
    there as its reply subject) or be gone: a rollout of the service driven here still refuses
    a second one (before, the stray lock was "taken over" and two rollouts ran side by side)."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    first = await r.deploy(spec(), NEW, "alice")
    if lock is None:
        await bus.kv_delete(LOCKS, "hello")
    else:
        bus.set("put", LOCKS, "hello", lock)
    before = list(bus.log)
    with pytest.raises(Conflict, match=f"{first.id} \\(started by alice\\)"):
        await r.deploy(spec(), NEW, "bob")
    assert bus.log == before
    assert list(r.drivers) == [first.id]

async def test_a_stale_lock_of_a_finished_rollout_is_taken_over() -> None:
    """A lock naming a terminal (or missing) rollout does not block a new deploy."""
    bus, clock = fleet_bus(), FakeClock()
    bus.set("create", LOCKS, "hello", b"hello-gone")
    r = runner(bus, clock)
    rec = await r.deploy(spec(), NEW)
    lock = bus.live(LOCKS, "hello")
    assert lock is not None and lock.value == rec.id.encode()


async def test_a_bad_spec_is_refused_before_anything_is_written() -> None:
    """A spec planning refuses raises UsageError and leaves no lock and no record."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    with pytest.raises(UsageError, match="--batch"):
        await r.deploy(spec(batch="zero"), NEW)
    with pytest.raises(UsageError, match="offline nodes are not targeted"):
        await runner(bus, clock, views(offline=("node-1", "node-2", "node-3"))).deploy(spec(), NEW)
    assert bus.log == []


async def test_resume_after_a_crash_between_persist_and_write_rewrites_only_the_missing() -> None:
    """Killed after persisting wave 0 but before writing node-1, a new runner writes it once."""
    bus, clock = fleet_bus(), FakeClock()
    bus.faults[("create", DESIRED)] = Killed()
    bus.faults[("update", DESIRED)] = Killed()
    with pytest.raises(Killed):
        await runner(bus, clock).deploy(spec(), NEW)
    bus.faults.clear()
    rid = next(k for k in bus.kv[ROLLOUTS] if not k.startswith("_"))
    assert bus.record(rid).nodes["node-1"].target is not None
    assert bus.desired_writes() == []
    clock.t += 5
    r2 = runner(bus, clock)
    await r2.resync()
    assert bus.desired_writes() == [("node-1.hello", 8)]
    await r2.resync()  # nothing new to do: driven already
    r3 = runner(bus, clock)
    await r3.resync()  # a third coordinator finds the write done and does not repeat it
    assert bus.desired_writes() == [("node-1.hello", 8)]
    assert await drive(r3, bus, clock, rid) == "succeeded"
    assert [k for k, g in bus.desired_writes() if g == 8] == ["node-1.hello", "node-2.hello",
                                                               "node-3.hello"]


async def test_a_resumed_rollouts_events_go_out_only_after_the_writes_they_announce() -> None:
    """Killed after persisting a wave's start, before its writes: the next leader's outbox
    (``node.updating`` of writes that never happened) is not published while those writes
    cannot be made; once they are, it is."""
    bus, clock = fleet_bus(), FakeClock()
    bus.faults[("create", DESIRED)] = Killed()
    bus.faults[("update", DESIRED)] = Killed()
    with pytest.raises(Killed):
        await runner(bus, clock).deploy(spec(), NEW)
    bus.faults.clear()
    rid = next(k for k in bus.kv[ROLLOUTS] if not k.startswith("_"))
    assert bus.record(rid).outbox and bus.desired_writes() == []
    clock.t += 5
    bus.faults[("update", DESIRED)] = BusError("NATS is away")
    bus.fault_count[("update", DESIRED)] = 1000
    r2 = runner(bus, clock, command_deadline=0.3)
    await r2.resync()
    assert bus.desired_writes() == [] and r2.events.pending() == []
    bus.faults.clear()
    await r2.resync()
    assert bus.desired_writes() == [("node-1.hello", 8)]
    assert [e.kind for e in r2.events.pending()] == ["rollout.started", "wave.started",
                                                     "node.updating"]


async def killed_after_the_success(bus: FakeBus, clock: FakeClock) -> str:
    """A one-wave rollout of three nodes whose coordinator is killed after persisting its
    success, before writing the old slots' retirement; its id."""
    r = runner(bus, clock)
    rec = await r.deploy(spec(batch="100%", max_unavailable="100%"), NEW)
    clock.t += 1
    bus.faults[("update", DESIRED)] = Killed()
    with pytest.raises(Killed):
        for i in (1, 2, 3):
            await report(r, bus, f"node-{i}", clock.t)
    bus.faults.clear()
    assert bus.record(rec.id).state == "succeeded"
    return rec.id


async def test_a_rollout_killed_between_its_success_and_its_retirements_retires_on_resume(
) -> None:
    """Killed after persisting the success (terminal), before writing the old slots' retirement:
    the next leader makes those writes, then publishes ``rollout.succeeded``: the old slots
    would otherwise run on every node until the next rollout."""
    bus, clock = fleet_bus(), FakeClock()
    record = bus.record(await killed_after_the_success(bus, clock))
    assert record.outbox
    assert all(len(p.target.slots) == 1 for p in record.nodes.values() if p.target)
    assert all(len(bus.desired(f"node-{i}").slots) == 2 for i in (1, 2, 3))
    clock.t += 5
    r2 = runner(bus, clock)
    await r2.resync()
    assert all(len(bus.desired(f"node-{i}").slots) == 1 for i in (1, 2, 3))
    assert "rollout.succeeded" in [e.kind for e in r2.events.pending()]


async def test_a_deploy_waits_for_the_last_writes_of_the_rollout_that_just_ended() -> None:
    """A success is persisted before its writes retire the old slots, so a deploy in that
    moment takes the lock as stale; planned from the states being replaced, its writes had the
    retirement's generations and one of the two was skipped as already stored. It now waits
    for them and plans from the retired states."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(batch="100%", max_unavailable="100%"), NEW)
    clock.t += 1
    for i in (1, 2):
        await report(r, bus, f"node-{i}", clock.t)
    gate, held = asyncio.Event(), asyncio.Event()
    write = bus.kv_fenced_all

    async def retirement_held(bucket: str, *args: Any, **kwargs: Any) -> Any:
        if bucket == DESIRED and not held.is_set():
            held.set()
            await gate.wait()
        return await write(bucket, *args, **kwargs)

    bus.kv_fenced_all = retirement_held  # type: ignore[method-assign]
    waited = asyncio.Event()

    class Watched(asyncio.Lock):
        async def acquire(self) -> bool:
            if self.locked():
                waited.set()  # someone waits for the step being carried out
            return await super().acquire()

    r.drivers[rec.id].lock = Watched()
    stepping = asyncio.create_task(report(r, bus, "node-3", clock.t))  # the last: success
    await asyncio.wait_for(held.wait(), 5)
    assert bus.record(rec.id).state == "succeeded"  # persisted; its writes held
    retired = {i: bus.desired(f"node-{i}").generation + 1 for i in (1, 2, 3)}
    deploying = asyncio.create_task(r.deploy(spec(version=OLD.version), OLD))
    waiting = asyncio.create_task(waited.wait())
    await asyncio.wait({deploying, waiting}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    assert waited.is_set() and not deploying.done()  # it waits for the retirement's writes
    gate.set()
    await stepping
    second = await asyncio.wait_for(deploying, 5)
    for i in (1, 2, 3):
        p = bus.record(second.id).nodes[f"node-{i}"]
        assert p.previous is not None and p.previous.generation == retired[i]
        assert len(p.previous.slots) == 1


@pytest.mark.parametrize("seed", range(4))
async def test_the_pages_written_hold_every_node_as_the_engine_has_it(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A persist compares only the nodes the engine's steps took since the last one
    (``Rollout.touched``): after every step that was carried out (none held back), the record
    read back from its head and pages is the driven one, node for node, through reports in a
    seeded order, staging ahead, nodes going offline and back (a change a node's page holds no
    event of), failures that pause, resumes and the end."""
    rng = random.Random(seed)
    n = 12
    monkeypatch.setattr(pages, "PAGE_BYTES", 1)  # a page a node or two: a missed one shows
    bus, clock = fleet_bus(n), FakeClock()
    table = views(n)
    r = runner(bus, clock, table)
    rec = await r.deploy(spec(batch="3", max_unavailable="3", prestage="1",
                              on_failure="pause"), NEW)
    head = bus.live(ROLLOUTS, rec.id)
    assert head is not None and head.value is not None
    assert decode(RolloutRecord, head.value).pages >= n // 2
    offline: set[str] = set()
    compared = 0
    for round_ in range(400):
        driver = r.drivers.get(rec.id)
        if driver is None:
            break
        if not driver.held:
            assert bus.record(rec.id).nodes == driver.rollout.record.nodes
            compared += 1
        clock.t += 1
        node = f"node-{rng.randint(1, n)}"
        if round_ < 200 and rng.random() < 0.1:
            offline ^= {node}
        elif round_ >= 200:
            offline.clear()  # let it end
        table[:] = views(n, offline=tuple(offline))
        if driver.rollout.state == "paused":
            await r.request(rec.id, Resume())
        elif node not in offline:
            await report(r, bus, node, clock.t, healthy=rng.random() > 0.03)
        await r.step()
    assert bus.record(rec.id).state in ("succeeded", "rolled_back") and compared > 50


async def test_a_deploy_makes_the_last_writes_of_a_rollout_whose_leader_died_first() -> None:
    """Killed after persisting the success, before the retirement's writes: the next leader's
    first deploy of the service (before any resync) finds the stale lock naming that record,
    makes its writes, and plans from the retired states, not from the ones they replace."""
    bus, clock = fleet_bus(), FakeClock()
    rid = await killed_after_the_success(bus, clock)
    retired = {i: bus.record(rid).nodes[f"node-{i}"].generation for i in (1, 2, 3)}
    clock.t += 5
    second = await runner(bus, clock).deploy(spec(version=OLD.version), OLD)
    for i in (1, 2, 3):
        p = bus.record(second.id).nodes[f"node-{i}"]
        assert p.previous is not None and p.previous.generation == retired[i]
        assert len(p.previous.slots) == 1


async def test_resume_starts_a_rollout_killed_before_its_start() -> None:
    """A record still pending (killed between creating and starting it) is started on resume."""
    bus, clock = fleet_bus(), FakeClock()
    bus.faults[("update", ROLLOUTS)] = Killed()
    with pytest.raises(Killed):
        await runner(bus, clock).deploy(spec(), NEW)
    bus.faults.clear()
    rid = next(k for k in bus.kv[ROLLOUTS] if not k.startswith("_"))
    assert bus.record(rid).state == "pending"
    r2 = runner(bus, clock)
    await r2.resync()
    assert bus.record(rid).state == "running"
    assert await drive(r2, bus, clock, rid) == "succeeded"


async def test_resume_feeds_cached_observed_states_so_progress_is_not_repeated() -> None:
    """A resumed rollout learns from the observed cache that node-1 already converged."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(), NEW)
    clock.t += 1
    await report(r, bus, "node-1", clock.t)
    seen = dict(r.observed)
    r2 = runner(bus, clock)
    r2.observed.update(seen)
    await r2.resync()
    record = r2.drivers[rec.id].rollout.record
    assert record.nodes["node-1"].state == "done"
    assert [k for k, g in bus.desired_writes()] == ["node-1.hello", "node-2.hello"]


async def test_a_deposed_leader_gets_no_write_through_and_stops() -> None:
    """Once a later leader fenced the buckets, the old runner's next step writes nothing (no
    record, no desired state, no lock), and it stops driving every rollout."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(), NEW)
    other = Rollout(bus.record(rec.id), fleet=FLEET)
    other.handle(Pause("the other one"), clock.t)
    fence(bus, 2)
    before = {b: dict(kv) for b, kv in bus.kv.items()}
    with pytest.raises(RemoteError, match="another coordinator leads") as info:
        await r.request(rec.id, Pause())
    assert info.value.code == "conflict"
    assert r.drivers == {} and r.lost.is_set() and r.deposed is not None
    assert {b: dict(kv) for b, kv in bus.kv.items()} == before
    with pytest.raises(RemoteError):  # nor a new rollout: no lock, no record
        await r.deploy(spec(service="other"),
                       ReleaseRef(service="other", version=NEW.version, digest=NEW.digest))
    assert {b: dict(kv) for b, kv in bus.kv.items()} == before
    assert bus.live(LOCKS, "hello") is not None
    r2 = runner(bus, clock)  # the new leader resumes it
    await r2.resync()
    assert rec.id in r2.drivers


async def test_a_desired_state_carries_the_leaders_term() -> None:
    """Every envelope a leader writes is signed with its term."""
    bus, clock = fleet_bus(), FakeClock()
    fence(bus, 7)
    r = runner(bus, clock)
    await r.deploy(spec(), NEW)
    entry = bus.live(DESIRED, "node-1.hello")
    assert entry is not None and entry.value is not None
    env = decode(SignedEnvelope, entry.value)
    assert env.term == 7 and env.generation == 8


async def test_the_events_of_a_decision_survive_a_kill_between_persist_and_publish() -> None:
    """Killed after the record write, before the stream stored its events: the next leader
    publishes them (the outbox), once each, and then rewrites the record without them."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(), NEW)  # the events are queued, never published: killed now
    stored = bus.record(rec.id)
    kinds = [e.kind for e in stored.outbox]
    assert "rollout.started" in kinds and "node.updating" in kinds
    queued = r.events.pending()
    assert [e.id for e in queued] == [e.id for e in stored.outbox]
    clock.t += 1
    r2 = runner(bus, clock)
    await r2.resync()
    await r2.events.publish(bus, r2.events.pending(expand=False))
    published = [decode(Event, d) for _, d in bus.published]
    assert [e.id for e in published] == [e.id for e in stored.outbox]
    assert r2.drivers[rec.id].outbox == {}
    clock.t += OUTBOX_CLEAR_AFTER
    await r2.step()
    assert bus.record(rec.id).outbox == []


async def test_a_decisions_node_events_go_out_as_one_pack_kept_and_republished_whole() -> None:
    """A wave's start about every node: its node events are one pack (one page holds these
    three nodes), after the rollout's own events, kept in the outbox as one event and
    published again after a kill with the same bytes (the stream's message id de-duplicates);
    readers get each node's event back. A lone node event goes out alone."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(batch="100%", max_unavailable="100%"), NEW)
    queued = r.events.pending(expand=False)
    assert [e.kind for e in queued] == ["rollout.started", "wave.started", PACK]
    assert [(e.kind, e.node) for e in unpacked(queued[-1])] == [
        ("node.updating", f"node-{i}") for i in (1, 2, 3)]
    stored = bus.record(rec.id)
    assert [e.id for e in stored.outbox] == [e.id for e in queued]
    clock.t += 1
    r2 = runner(bus, clock)
    await r2.resync()
    again = r2.events.pending(expand=False)
    assert [encode(e) for e in again] == [encode(e) for e in queued]
    clock.t += 1
    await report(r2, bus, "node-2", clock.t)
    await r2.step()
    assert [(e.kind, e.node) for e in r2.events.pending(expand=False)] == [
        ("node.done", "node-2")]


async def test_a_bus_outage_drops_the_driver_and_the_resync_rebuilds_it() -> None:
    """A persist that keeps failing drops the driver; resync drives the rollout again."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock, command_deadline=0.3)
    rec = await r.deploy(spec(), NEW)
    bus.faults[("update", ROLLOUTS)] = BusError("NATS is away")
    bus.fault_count[("update", ROLLOUTS)] = 100
    with pytest.raises(BusError):
        await r.request(rec.id, Pause())
    assert rec.id not in r.drivers
    assert bus.record(rec.id).state == "running"  # the pause never reached KV
    bus.faults.clear()
    await r.resync()
    paused = await r.request(rec.id, Pause())
    assert paused.state == "paused" and bus.record(rec.id).state == "paused"
    resumed = await r.request(rec.id, Resume())
    assert resumed.state == "running"


async def test_operator_requests_say_why_they_cannot_be_done() -> None:
    """Unknown ids are not_found, finished rollouts and illegal moves are conflicts."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    with pytest.raises(RemoteError) as missing:
        await r.request("nope", Pause())
    assert missing.value.code == "not_found"
    rec = await r.deploy(spec(), NEW)
    with pytest.raises(RemoteError, match="cannot resume") as illegal:
        await r.request(rec.id, Resume())
    assert illegal.value.code == "conflict"
    await drive(r, bus, clock, rec.id)
    with pytest.raises(RemoteError, match="already succeeded") as done:
        await r.request(rec.id, Pause())
    assert done.value.code == "conflict"


async def test_offline_nodes_are_reported_only_after_the_startup_grace() -> None:
    """A node the table has not heard from since start is not called offline during the grace."""
    bus, clock = fleet_bus(), FakeClock()
    table = views(heard=False)
    r = Runner(bus, seed=SEED, fenced=fenced(bus), nodes=lambda: table, clock=clock,
               startup_grace=10.0)
    rec = await r.deploy(spec(), NEW)
    table[0] = NodeView(id="node-1", online=False, last_seen=None)
    clock.t += 5
    await r.step()
    assert r.drivers[rec.id].rollout.record.nodes["node-1"].online is True
    clock.t += 6
    await r.step()
    record = bus.record(rec.id)
    assert record.nodes["node-1"].online is False and record.phase == "rollback"
    assert "offline" in record.reason


async def test_with_the_node_tables_liveness_its_window_is_the_startup_grace() -> None:
    """Given ``liveness`` (the daemon's ``Fleet.liveness``), a node the table says it cannot
    know yet stays as it is past the runner's own grace (the table's window is longer after a
    time the coordinator could not hear: ``Fleet.excuse``); once the table knows, it counts."""
    bus, clock = fleet_bus(), FakeClock()
    known = {"node-1": (True, True), "node-2": (True, True), "node-3": (True, True)}
    r = Runner(bus, seed=SEED, fenced=fenced(bus), nodes=lambda: views(), clock=clock,
               startup_grace=10.0, liveness=known.get)
    rec = await r.deploy(spec(), NEW)
    known["node-1"] = (False, False)  # not heard yet, by the table's window
    clock.t += 30
    await r.step()
    assert bus.record(rec.id).nodes["node-1"].online is True
    known["node-1"] = (False, True)  # its window is over, still silent: offline
    await r.step()
    record = bus.record(rec.id)
    assert record.nodes["node-1"].online is False and record.phase == "rollback"


async def test_a_tick_looks_at_every_node_only_when_the_table_changed() -> None:
    """With the table's count of changes (``Fleet.changes``), a tick after the grace reads
    no node's liveness while the count stays where every node agreed with it; a node that the
    table then takes offline is told to the rollout at the next tick all the same."""
    bus, clock = fleet_bus(), FakeClock()
    table = Fleet()
    for i in (1, 2, 3):
        table.heartbeat(Heartbeat(node=f"node-{i}", interval=1.0), clock.t)
    asked: list[str] = []

    def liveness(node: str) -> tuple[bool, bool] | None:
        asked.append(node)
        return table.liveness(node)

    r = Runner(bus, seed=SEED, fenced=fenced(bus), nodes=lambda: views(), clock=clock,
               startup_grace=0.0, liveness=liveness, liveness_changes=lambda: table.changes)
    rec = await r.deploy(spec(), NEW)
    await r.step()
    assert sorted(set(asked)) == ["node-1", "node-2", "node-3"]  # looked, all agree
    asked.clear()
    table.heartbeat(Heartbeat(node="node-2", interval=1.0), clock.t + 0.5)
    await r.step()
    await r.step()
    assert asked == []  # nothing changed since: not looked at again
    clock.t += 10
    assert [t.node for t in table.tick(clock.t)] == ["node-1", "node-2", "node-3"]
    await r.step()
    record = bus.record(rec.id)
    assert record.nodes["node-1"].online is False and record.phase == "rollback"


async def test_a_failing_node_rolls_the_rollout_back() -> None:
    """An agent reporting failure rolls back every touched node to its previous state."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(), NEW)
    clock.t += 1
    await report(r, bus, "node-1", clock.t, healthy=False)
    assert bus.record(rec.id).phase == "rollback"
    restored = bus.desired("node-1")
    assert restored is not None and restored.slots == {"a": OLD} and restored.generation == 9
    assert await drive(r, bus, clock, rec.id) == "rolled_back"
    assert bus.live(LOCKS, "hello") is None


async def test_malformed_or_misaddressed_observed_states_are_ignored() -> None:
    """Garbage, or a state claiming another key, neither reaches a rollout nor the cache."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    await r.deploy(spec(), NEW)
    await r.on_observed(Entry("node-1.hello", b"{not json", 1))
    lie = ObservedState(node="node-2", service="hello", observed_generation=99, time=clock.t)
    await r.on_observed(Entry("node-1.hello", encode(lie), 2))
    assert r.observed == {}
    await r.on_observed(Entry("node-1.hello", None, 3))
    assert r.observed == {}


async def test_an_observed_state_too_large_is_neither_decoded_nor_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    """A node may write any value under its own keys: a review's 8 MB ones cost ~90 MiB of the
    coordinator's memory each once decoded. One over OBSERVED_MAX voids what that key said
    before; a node is named once, however many keys it spoils."""
    from coordinator.runtime import runner as runner_mod

    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    ok = ObservedState(node="node-1", service="hello", time=clock.t)
    await r.on_observed(Entry("node-1.hello", encode(ok), 1))
    assert ("node-1", "hello") in r.observed
    huge = ObservedState(node="node-1", service="hello", error="x" * runner_mod.OBSERVED_MAX)
    await r.on_observed(Entry("node-1.hello", encode(huge), 2))
    assert r.observed == {}
    for i in range(20):
        await r.on_observed(Entry(f"node-1.s{i}", b"junk", 3 + i))
    assert caplog.text.count("ignoring observed state node-1.") == 1


async def test_node_progress_is_held_for_the_next_persist_and_never_published_before_it() -> None:
    """Reports that only mark nodes done are persisted together, by the next step that changes
    nothing (a tick) or decides something; their events follow that Persist, never precede it."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(batch="100%", max_unavailable="100%"), NEW)
    r.events.pending()
    persisted = len([1 for _, b, k, v in bus.log
                     if b == ROLLOUTS and v is not None and not k.startswith("_") and "." not in k])
    clock.t += 0.01
    await report(r, bus, "node-1", clock.t)
    await report(r, bus, "node-2", clock.t)
    assert bus.record(rec.id).nodes["node-1"].state == "updating"  # held
    live = await r.get(rec.id)
    assert live is not None and live.nodes["node-2"].state == "done"  # what the API shows
    assert [e.kind for e in r.events.pending()] == []
    await r.step()  # the tick: nothing to decide, so the held change is written now
    assert {n: p.state for n, p in bus.record(rec.id).nodes.items()} == {
        "node-1": "done", "node-2": "done", "node-3": "updating"}
    assert [(e.kind, e.node) for e in r.events.pending()] == [
        ("node.done", "node-1"), ("node.done", "node-2")]
    assert len([1 for _, b, k, v in bus.log if b == ROLLOUTS and v is not None
                and not k.startswith("_") and "." not in k]) == persisted + 1
    clock.t += 0.01
    await report(r, bus, "node-3", clock.t)  # the wave converges: decided and written at once
    assert bus.record(rec.id).state == "succeeded"
    kinds = [e.kind for e in r.events.pending()]
    assert kinds[0] == "node.done" and kinds[-1] == "rollout.succeeded"


async def test_held_progress_is_written_within_the_hold_time_however_many_reports_come() -> None:
    """A stream of progress-only reports still persists at least every HOLD_PERSIST."""
    bus, clock = fleet_bus(5), FakeClock()
    r = runner(bus, clock, views(5))
    rec = await r.deploy(spec(batch="100%", max_unavailable="100%"), NEW)
    await report(r, bus, "node-1", clock.t)
    clock.t += HOLD_PERSIST + 0.01
    await report(r, bus, "node-2", clock.t)  # held for longer than allowed: written with it
    assert [bus.record(rec.id).nodes[f"node-{i}"].state for i in (1, 2, 3)] == [
        "done", "done", "updating"]


async def test_a_staged_node_is_progress_held_for_the_next_persist() -> None:
    """A node staged ahead of its wave (healthy at weight 0) is progress as a node done is: the
    record is not written for it alone (each such write was an atomic batch on the broker,
    while the first wave's slots were starting), nor its ``node.staged`` published before the
    Persist that holds it: a tick, or the wave's end, writes it."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(batch="1", max_unavailable="1", prestage="all"), NEW)
    r.events.pending()
    persisted = len([1 for _, b, k, v in bus.log
                     if b == ROLLOUTS and v is not None and not k.startswith("_") and "." not in k])
    clock.t += 0.01
    await report(r, bus, "node-3", clock.t)  # its staged slot is healthy
    assert bus.record(rec.id).nodes["node-3"].staged == "staging"  # held
    live = await r.get(rec.id)
    assert live is not None and live.nodes["node-3"].staged == "staged"
    assert [e.kind for e in r.events.pending()] == []
    await r.step()  # the tick: nothing to decide, so the held change is written now
    assert bus.record(rec.id).nodes["node-3"].staged == "staged"
    assert [(e.kind, e.node) for e in r.events.pending()] == [("node.staged", "node-3")]
    assert len([1 for _, b, k, v in bus.log if b == ROLLOUTS and v is not None
                and not k.startswith("_") and "." not in k]) == persisted + 1
    clock.t += 0.01
    await report(r, bus, "node-2", clock.t)  # staged, held again
    await report(r, bus, "node-1", clock.t)  # wave 1 converges: decided, written with it
    assert bus.record(rec.id).nodes["node-2"].staged == "staged"
    assert bus.record(rec.id).current_wave == 1
    kinds = [e.kind for e in r.events.pending()]
    assert kinds[0] == "node.staged" and "wave.started" in kinds


async def test_held_progress_lost_with_its_coordinator_is_derived_again_once() -> None:
    """A coordinator that dies holding progress published none of it; the next one derives it
    from the observed states and emits each node's event exactly once."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(batch="100%", max_unavailable="100%"), NEW)
    clock.t += 0.01
    await report(r, bus, "node-1", clock.t)
    assert not any(e.kind == "node.done" for e in r.events.pending())
    seen = dict(r.observed)
    r2 = runner(bus, clock)  # the first one is gone (kill -9): its held change with it
    r2.observed.update(seen)
    await r2.resync()
    await r2.step()
    assert bus.record(rec.id).nodes["node-1"].state == "done"
    assert [e.node for e in r2.events.pending() if e.kind == "node.done"] == ["node-1"]


async def test_a_rollout_whose_record_could_outgrow_a_nats_message_is_refused() -> None:
    """The record is persisted whole: a deploy it could outgrow the server's max_payload with
    is refused up front, naming the fix, and writes nothing."""
    bus, clock = fleet_bus(), FakeClock()
    bus.max_payload = 2000  # the real Bus reads it from the server's INFO
    with pytest.raises(UsageError, match=r"max_payload .*--batch"):
        await runner(bus, clock).deploy(spec(), NEW)
    assert bus.log == []
    bus.max_payload = 1 << 20
    await runner(bus, clock).deploy(spec(), NEW)


async def test_selected_nodes_offline_at_the_deploy_are_named_in_the_report() -> None:
    """The nodes a deploy leaves out for being offline go into the report, first, as they
    always have: the record in KV holds ``"report":{"skipped_offline":[...]}``."""
    bus, clock = fleet_bus(), FakeClock()
    rec = await runner(bus, clock, views(offline=("node-3",))).deploy(spec(), NEW)
    assert set(rec.nodes) == {"node-1", "node-2"}
    assert rec.report.skipped_offline == ["node-3"]
    stored = [value for _, bucket, _, value in bus.log if bucket == ROLLOUTS and value]
    assert b'"report":{"skipped_offline":["node-3"]}' in stored[0]


async def test_a_deploy_waits_for_the_nodes_a_just_started_coordinator_has_not_heard(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Targeted nodes *not heard yet* (``Fleet.listen``) are waited for, then planned as the
    live nodes they turn out to be; one still silent after ``UNHEARD_WAIT`` is left out as
    offline. Before, a deploy in a coordinator's first seconds skipped every one of them."""
    monkeypatch.setattr(runner_mod, "UNHEARD_WAIT", 0.5)
    monkeypatch.setattr(runner_mod, "UNHEARD_POLL", 0.01)
    bus, clock = fleet_bus(), FakeClock()
    table = [NodeView(id=f"node-{i}", labels={"zone": "a"}, unheard=True) for i in (1, 2, 3)]
    asked: list[dict[str, str]] = []

    def unheard(selector: dict[str, str]) -> list[str]:
        asked.append(selector)
        if len(asked) == 3:  # the third look: node-1 and node-2 beat meanwhile
            for v in table[:2]:
                v.online, v.unheard, v.last_seen = True, False, clock.t
        return [v.id for v in table if v.unheard]

    r = Runner(bus, seed=SEED, fenced=fenced(bus), nodes=lambda: table, clock=clock,
               unheard=unheard)
    rec = await r.deploy(spec(), NEW)
    assert set(rec.nodes) == {"node-1", "node-2"} and len(asked) > 3
    assert rec.report.skipped_offline == ["node-3"]  # never heard: after the wait, offline
    table[2].online, table[2].unheard = True, False
    asked.clear()
    r2 = Runner(fleet_bus(), seed=SEED, fenced=fenced(bus), nodes=lambda: table, clock=clock)
    assert set((await r2.deploy(spec(), NEW)).nodes) == {"node-1", "node-2", "node-3"}


async def test_events_the_publisher_gave_up_on_are_sent_again_from_the_outbox() -> None:
    """The stream was away past the publisher's retries: the outbox keeps the events, and the
    ticks send them again until the stream stores them."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    rec = await r.deploy(spec(), NEW)
    lost = r.events.pending()  # given up on: never published
    assert lost and set(r.drivers[rec.id].outbox) == {e.id for e in lost}
    clock.t += OUTBOX_RETRY
    await r.step()
    again = r.events.pending()
    assert {e.id for e in lost} <= {e.id for e in again}
    await r.events.publish(bus, again)
    assert r.drivers[rec.id].outbox == {}


async def test_an_event_the_stream_refuses_for_good_is_sent_again_once_not_in_a_loop() -> None:
    """An event refused at every attempt while others are stored (too large, say) is sent
    again once at the next store; refused again, it waits for OUTBOX_RETRY (a review's sink
    published it 50 times in 20 batches, 75 s of backoff)."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)

    async def at_once(_: float) -> None:
        return None

    r.events._sleep = at_once
    rec = await r.deploy(spec(), NEW)
    r.events.pending(expand=False)
    refused = next(iter(r.drivers[rec.id].outbox.values()))
    stored = Event(id="stored", time=clock.t, fleet=FLEET, kind="node.heard", message="",
                   rollout=rec.id)


    async def refusing(events: list[Event]) -> None:
        bus.faults[(PUBLISH, PUBLISH)] = BusError("maximum message size exceeded")
        bus.fault_count[(PUBLISH, PUBLISH)] = EVENT_ATTEMPTS
        await r.events.publish(bus, events)

    await refusing([refused])  # given up
    await r.events.publish(bus, [stored])  # stored: what was given up goes again
    again = r.events.pending(expand=False)
    assert [e.id for e in again] == [refused.id]
    await refusing(again)  # given up again
    await r.events.publish(bus, [stored])  # left to OUTBOX_RETRY this time
    assert r.events.pending(expand=False) == []
    assert refused.id in r.drivers[rec.id].outbox


async def test_events_given_up_on_go_again_as_soon_as_the_stream_stores_anything() -> None:
    """The stream answered no one past the publisher's retries (a cluster electing the events
    stream's leader): the events it gave up on go again from the outbox as soon as a later
    publication is stored, not OUTBOX_RETRY later (the rollout's success was published before
    them: a chaos test's audit log lacked a wave's node.done when read)."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)

    async def at_once(_: float) -> None:
        return None

    r.events._sleep = at_once  # the publisher's backoff, in no time
    rec = await r.deploy(spec(), NEW)
    decided = r.events.pending(expand=False)
    bus.faults[(PUBLISH, PUBLISH)] = BusError("no JetStream stream answers on that subject")
    bus.fault_count[(PUBLISH, PUBLISH)] = EVENT_ATTEMPTS
    await r.events.publish(bus, decided)  # every attempt refused: given up
    assert bus.published == [] and set(r.drivers[rec.id].outbox) == {e.id for e in decided}
    later = Event(id="later", time=clock.t, fleet=FLEET, kind="node.heard", message="",
                  rollout=rec.id)
    await r.events.publish(bus, [later])  # the stream answers again
    again = r.events.pending(expand=False)
    assert {e.id for e in again} == {e.id for e in decided}
    await r.events.publish(bus, again)
    assert r.drivers[rec.id].outbox == {}


async def test_on_node_lost_wait_a_lost_node_is_written_once_and_waited_for() -> None:
    """Under wait a node the table reports offline mid-wave is waited for: the runner writes it
    nothing while it is lost (nor twice a generation, resyncs included), and once it is back and
    converged the rollout goes on and succeeds; a node offline at the deploy is still skipped."""
    bus, clock = fleet_bus(4), FakeClock()
    table = views(4, offline=("node-4",))
    r = runner(bus, clock, table)
    rec = await r.deploy(spec(on_node_lost="wait", progress_deadline=60.0), NEW)
    assert set(rec.nodes) == {"node-1", "node-2", "node-3"}
    assert rec.report.skipped_offline == ["node-4"]
    table[0] = NodeView(id="node-1", labels={"zone": "a"}, online=False, last_seen=1000.0)
    for _ in range(10):
        clock.t += 3
        await r.step()
        await r.resync()
    record = bus.record(rec.id)
    assert record.state == "running" and record.nodes["node-1"].state == "updating"
    table[0] = NodeView(id="node-1", labels={"zone": "a"}, online=True, last_seen=clock.t)
    assert await drive(r, bus, clock, rec.id) == "succeeded"
    writes = [gen for key, gen in bus.desired_writes() if key == "node-1.hello"]
    assert writes == sorted(set(writes)) == [8, 9]  # the new release, then the old slot retired


async def test_a_bus_error_starting_a_recorded_rollout_says_it_was_accepted() -> None:
    """The record and lock are stored but the bus fails while the rollout starts: the deploy
    answers "accepted" with the rollout's id (not a plain error), and the resync starts it."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock, command_deadline=0.3)
    bus.faults[("update", ROLLOUTS)] = BusError("NATS is away")
    bus.fault_count[("update", ROLLOUTS)] = 100
    with pytest.raises(RemoteError, match="is recorded but its start failed") as info:
        await r.deploy(spec(), NEW, "alice")
    rid = next(k for k in bus.kv[ROLLOUTS] if not k.startswith("_"))
    assert info.value.code == "accepted" and info.value.data == {"id": rid}
    assert f"'fleetwave status {rid}'" in str(info.value)
    assert bus.record(rid).state == "pending" and bus.live(LOCKS, "hello") is not None
    bus.faults.clear()
    await r.resync()
    assert bus.record(rid).state == "running"
    assert await drive(r, bus, clock, rid) == "succeeded"


async def test_no_lock_ever_names_a_record_not_yet_created() -> None:
    """A deploy creates its record before its lock names it: a lock whose record is missing is
    then stale whenever it is seen (its record never came), never one being created now, so a
    take-over cannot slip between the lock's creation and the record's."""
    bus, clock = fleet_bus(), FakeClock()
    rec = await runner(bus, clock).deploy(spec(), NEW)
    writes = [(b, k) for op, b, k, v in bus.log if b in (ROLLOUTS, LOCKS) and v is not None]
    assert writes.index((ROLLOUTS, rec.id)) < writes.index((LOCKS, "hello")), writes


async def test_a_recorded_rollout_that_lost_its_lock_is_never_started() -> None:
    """A record that landed without its lock (a late write after its deploy gave up, or a crash
    between record and lock) while another rollout took the service's lock is dropped by the
    resync, not driven beside that rollout."""
    bus, clock = fleet_bus(), FakeClock()
    bus.faults[("update", ROLLOUTS)] = Killed()
    with pytest.raises(Killed):
        await runner(bus, clock).deploy(spec(), NEW)
    bus.faults.clear()
    late = next(k for k in bus.kv[ROLLOUTS] if not k.startswith("_"))
    assert bus.record(late).state == "pending"
    bus.set("delete", LOCKS, "hello", None)  # its deploy gave up and released the lock
    clock.t += 5
    r2 = runner(bus, clock)
    other = await r2.deploy(spec(), NEW, "bob")
    await r2.resync()
    assert list(r2.drivers) == [other.id]
    assert bus.live(ROLLOUTS, late) is None
    lock = bus.live(LOCKS, "hello")
    assert lock is not None and lock.value == other.id.encode()
    assert await drive(r2, bus, clock, other.id) == "succeeded"


async def test_known_keys_go_out_a_signed_batch_at_a_time_and_a_failed_batch_sends_the_rest_slowly(
) -> None:
    """Desired states of keys written before in this term go out FENCED_BATCH at a time, each
    batch signed just before it is written (so agents apply the first while the rest are
    signed). A batch the bus fails sends the rest one by one, retried, instead of one timeout
    a batch: every state still lands, at its generation."""
    n = 2 * FENCED_BATCH + 200
    bus, clock = fleet_bus(n), FakeClock()
    r = runner(bus, clock)
    await r.desired.write_all([desired(f"node-{i}", generation=8) for i in range(1, n + 1)])
    sizes: list[int] = []
    fenced_all = bus.kv_fenced_all

    async def counted(bucket: str, writes: Sequence[tuple[str, bytes | None]], fence: int,
                      **kw: Any) -> list[int | BusError]:
        sizes.append(len(writes))
        return await fenced_all(bucket, writes, fence, **kw)

    bus.kv_fenced_all = counted  # type: ignore[method-assign]
    await r.desired.write_all([desired(f"node-{i}", generation=9) for i in range(1, n + 1)])
    assert sizes == [FENCED_BATCH, FENCED_BATCH, 200]

    sizes.clear()
    bus.faults[("update", DESIRED)] = BusError("the server did not answer")
    await r.desired.write_all([desired(f"node-{i}", generation=10) for i in range(1, n + 1)])
    assert sizes[0] == FENCED_BATCH and set(sizes[1:]) == {1}
    assert len(sizes) == 1 + 1 + (n - FENCED_BATCH)  # the failed one again, then the rest
    assert all(bus.desired(f"node-{i}").generation == 10  # type: ignore[union-attr]
               for i in range(1, n + 1))


async def test_known_keys_go_out_several_batches_at_once_in_their_order() -> None:
    """Batches of one write_all are handed to the bus several at once (the bus sends them in
    turn and lets FENCED_IN_FLIGHT await acks, one more signed and waiting), in the order of
    the states: the first batch first. Every state lands."""
    n = (FENCED_IN_FLIGHT + 3) * FENCED_BATCH
    bus, clock = fleet_bus(n), FakeClock()
    r = runner(bus, clock)
    await r.desired.write_all([desired(f"node-{i}", generation=8) for i in range(1, n + 1)])
    fenced_all = bus.kv_fenced_all
    firsts: list[str] = []
    at_once = most = 0
    all_in = asyncio.Event()

    async def held(bucket: str, writes: Sequence[tuple[str, bytes | None]], fence: int,
                   **kw: Any) -> list[int | BusError]:
        nonlocal at_once, most
        firsts.append(writes[0][0])
        at_once += 1
        most = max(most, at_once)
        if at_once == FENCED_IN_FLIGHT + 1:
            all_in.set()
        if len(firsts) <= FENCED_IN_FLIGHT + 1:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):  # only when they never come: the assert says
                    await all_in.wait()
        try:
            return await fenced_all(bucket, writes, fence, **kw)
        finally:
            at_once -= 1

    bus.kv_fenced_all = held  # type: ignore[method-assign]
    await r.desired.write_all([desired(f"node-{i}", generation=9) for i in range(1, n + 1)])
    assert most == FENCED_IN_FLIGHT + 1
    assert firsts == [f"node-{1 + k * FENCED_BATCH}.hello" for k in range(n // FENCED_BATCH)]
    assert all(bus.desired(f"node-{i}").generation == 9  # type: ignore[union-attr]
               for i in range(1, n + 1))


async def test_nodes_that_take_batch_signatures_get_them_and_the_others_single_ones() -> None:
    """The retirement writes all three nodes at once: node-1 and node-2 (which announced
    ``batch-signatures``) share one signature with a proof each; node-3 (an older agent) gets
    a state signed alone. Each verifies as its agent would."""
    bus, clock = fleet_bus(), FakeClock()
    table = views()
    r = Runner(bus, seed=SEED, fenced=fenced(bus), nodes=lambda: table, clock=clock,
               batchable=lambda node: node != "node-3")
    rec = await r.deploy(spec(), NEW)
    assert await drive(r, bus, clock, rec.id) == "succeeded"
    envs = {}
    for i in (1, 2, 3):
        entry = bus.live(DESIRED, f"node-{i}.hello")
        assert entry is not None and entry.value is not None
        envs[i] = decode(SignedEnvelope, entry.value)
        assert verify(envs[i], {public_key(SEED)}, fleet=FLEET, node=f"node-{i}",
                      service="hello", min_generation=0).slots == {"b": NEW}
    assert envs[1].proof and envs[2].proof and envs[1].sig == envs[2].sig
    assert envs[3].proof == b"" and envs[3].sig != envs[1].sig


async def test_an_event_before_every_write_of_its_step_goes_out_before_those_writes() -> None:
    """``rollout.started`` and ``wave.started`` announce decisions, not writes: they are queued
    for the publisher before the step's desired writes (a blue-green switch back is told
    before the thousands of writes that retire the new slots); ``node.updating``, which the
    engine emits after its node's write, still goes out only once that write landed."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock)
    order: list[tuple[str, object]] = []
    put, write_all = r.events.put, r.desired.write_all

    def queued(event: Event) -> None:
        order.append(("event", event.kind))
        put(event)

    async def written(pending: Sequence[DesiredState]) -> None:
        await write_all(pending)
        order.append(("written", [d.node for d in pending]))

    r.events.put = queued  # type: ignore[method-assign]
    r.desired.write_all = written  # type: ignore[method-assign]
    await r.deploy(spec(), NEW)
    assert order == [("event", "rollout.started"), ("event", "wave.started"),
                     ("written", ["node-1"]), ("event", "node.updating")]


async def test_a_desired_key_holding_what_no_coordinator_writes_is_planned_from_the_one_before(
) -> None:
    """A desired key that does not decode (what a node's credentials can have the server
    write there: the answer to its own request) no longer stops every deploy of the service:
    the plan takes the newest revision the bucket keeps that decodes, so the generation goes
    on from what the node runs, and the rollout writes over the stray value. With none that
    decodes it is refused as before."""
    bus, clock = fleet_bus(), FakeClock()
    before = bus.desired("node-2")
    assert before is not None
    bus.set("put", DESIRED, "node-2.hello", b'{"type":"io.nats.jetstream.api.v1.pub_ack"}')
    r = runner(bus, clock)
    record = await r.deploy(spec(), NEW)
    assert record.nodes["node-2"].previous == before
    assert await drive(r, bus, clock, record.id) == "succeeded"
    after = bus.desired("node-2")
    assert after is not None and after.generation > before.generation

    lone = fleet_bus()
    lone.kept.pop((DESIRED, "node-3.hello"))  # no revision before the stray one
    lone.set("put", DESIRED, "node-3.hello", b"garbage")
    lone.kept[(DESIRED, "node-3.hello")] = [lone.kept[(DESIRED, "node-3.hello")][-1]]
    with pytest.raises(BusError, match="every revision the bucket keeps"):
        await runner(lone, FakeClock()).deploy(spec(), NEW)


async def test_the_bus_away_past_the_deadline_fails_no_node_and_the_excuse_follows_it() -> None:
    """While the coordinator's connection is down its ticks go on but no progress deadline
    passes (the nodes' silence is the bus's); once it is back, the excuse lasts as long as
    agents take to reconnect (RECONNECT_CAP) and start their watches again (the fleet's
    restart spread: 20 s at 10,000 nodes), plus a whole --progress-deadline."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock, size=lambda: 10_000)
    assert r.excused_until(clock.t) == 0.0  # never disconnected: no excuse
    rec = await r.deploy(spec(progress_deadline=60.0), NEW)
    started = clock.t
    bus.connected = False  # the broker restarts
    for _ in range(20):
        clock.t += 5
        await r.step()
    assert r.excused_until(clock.t) == clock.t + 5 + 20
    assert r.drivers[rec.id].rollout.record.nodes["node-1"].state == "updating"
    bus.connected, bus.reconnected_at = True, clock.t  # back after 100 s
    back = clock.t
    await r.step()
    assert r.excused_until(clock.t) == back + 25
    clock.t = back + 25 + 60 - 0.1
    await r.step()
    assert bus.record(rec.id).nodes["node-1"].state == "updating"
    clock.t = back + 25 + 60
    await r.step()
    failed = bus.record(rec.id)
    assert failed.phase == "rollback" and "did not converge within 1m" in failed.reason, failed
    assert started + 60 < back  # its own deadline had long passed


async def test_a_leader_that_starts_after_a_reconnect_excuses_its_rollouts_as_long() -> None:
    """Counted from the bus's last reconnect: a runner made after it (a leader taking over, or
    leading again) excuses as long; one long after it, no more."""
    bus, clock = fleet_bus(), FakeClock()
    bus.reconnected_at = clock.t - 10
    r = runner(bus, clock, size=lambda: 50_000)
    assert r.excused_until(clock.t) == clock.t - 10 + 5 + 100
    rec = await r.deploy(spec(progress_deadline=60.0), NEW)
    clock.t += 60
    await r.step()
    assert r.drivers[rec.id].rollout.excused_until == clock.t - 60 - 10 + 105
    assert bus.record(rec.id).nodes["node-1"].state == "updating"


async def test_a_burst_of_registrations_excuses_the_rollouts_as_a_reconnect_would() -> None:
    """The coordinator's own connection held (a server of its cluster went away, not its own):
    the agents' burst of registrations (``core.reconnects``) excuses its rollouts from the
    burst's last registration, as long as a reconnect of its own would (5 s + the restart
    spread, 20 s at 10,000 nodes), plus a whole --progress-deadline. A lone registration, no."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock, size=lambda: 10_000)
    rec = await r.deploy(spec(progress_deadline=60.0), NEW)
    r.reconnects.note(clock.t, 10_000, 30.0, "node-1")  # one agent's reconnect: no burst
    assert r.excused_until(clock.t) == 0.0
    clock.t += 50
    for i in range(500):  # 5 % of the fleet within the window: a burst
        r.reconnects.note(clock.t + i * 0.01, 10_000, 30.0, f"node-{i}")
    last = clock.t + 499 * 0.01
    assert r.excused_until(clock.t) == last + 25
    clock.t = last + 25 + 60 - 0.1
    await r.step()
    assert bus.record(rec.id).nodes["node-1"].state == "updating"  # its own deadline: 60 s
    clock.t = last + 25 + 60
    await r.step()
    failed = bus.record(rec.id)
    assert failed.phase == "rollback" and "did not converge within 1m" in failed.reason, failed


async def test_churn_does_not_excuse_the_rollouts_for_ever() -> None:
    """Registrations that go on past a window from a burst's first (agents in crash loops,
    flapping links: more than LEAST nodes, again and again) excuse the rollouts from one window
    after that first registration, no longer: the deadline passes. Found by a review: the
    excuse ran from each newest registration, and an hour of churn held a rollout that long."""
    bus, clock = fleet_bus(), FakeClock()
    r = runner(bus, clock, size=lambda: 400)
    rec = await r.deploy(spec(progress_deadline=60.0), NEW)
    began = clock.t
    while clock.t < began + 3600:  # 25 nodes registering again every 3.5 s, for an hour
        for i in range(25):
            r.reconnects.note(clock.t + i * 0.01, 400, 7.0, f"node-{i + 2}")
        clock.t += 3.5
        await r.step()
        if bus.record(rec.id).phase == "rollback":
            break
    failed = bus.record(rec.id)
    assert failed.phase == "rollback" and "did not converge within 1m" in failed.reason, failed
    # From the burst's first registration: one window, the lag (5 s + 0.8 s at 400 nodes), the
    # deadline, and the step that saw it (every 3.5 s).
    assert clock.t - began <= 7.0 + 5.8 + 60 + 3.5 + 0.3, clock.t - began
