"""The lease and the fence against an in-memory bus: who takes the lease and when, that a term
only grows, and that no write of a deposed term lands."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from coordinator.runtime.lease import (
    Deposed,
    Fenced,
    Lease,
    fenced_buckets,
    ping_subject,
    write_fences,
)
from protocol import subjects
from protocol.codec import decode, encode
from protocol.errors import BusError, ProtocolError
from protocol.messages import FenceMarker, LeaseRecord
from protocol.testing import FLEET, FakeBus, FakeClock

LEASE = subjects.lease_bucket(FLEET)
ROLLOUTS = subjects.rollouts_bucket(FLEET)
DESIRED = subjects.desired_bucket(FLEET)


def lease(bus: FakeBus, me: str, mono: FakeClock, **kw: float) -> Lease:
    return Lease(bus, me=me, key="Akey", ttl=2.0, renew=0.001, poll=0.001, monotonic=mono,
                 **kw)


def held(bus: FakeBus) -> LeaseRecord:
    entry = bus.live(LEASE, subjects.LEASE_KEY)
    assert entry is not None and entry.value is not None
    return decode(LeaseRecord, entry.value)


async def test_the_first_coordinator_takes_a_free_lease_above_every_fence() -> None:
    """With no lease, the term starts above the highest fence (a lost lease bucket never
    hands out a term already used)."""
    bus, mono = FakeBus(), FakeClock()
    await write_fences(bus, term=41, holder="old", now=0.0)
    won = await asyncio.wait_for(lease(bus, "a", mono).acquire(), 2)
    assert won.term == 42 and won.holder == "a" and won.key == "Akey"
    assert held(bus) == won


async def test_a_live_lease_is_taken_only_after_the_ttl_by_the_standbys_own_clock() -> None:
    bus, mono = FakeBus(), FakeClock()
    first = lease(bus, "a", mono)
    await first.acquire()
    standby = asyncio.ensure_future(lease(bus, "b", mono).acquire())
    await asyncio.sleep(0.05)
    assert not standby.done()  # the leader answers its pings and the ttl has not passed
    mono.t += 2.0
    won = await asyncio.wait_for(standby, 2)
    assert won.holder == "b" and won.term == 2


async def test_a_standby_waits_for_the_longer_ttl_the_lease_names() -> None:
    """A leader started with --lease-ttl 10 names it in the lease: a standby with the default
    2 s does not take over a leader that promised itself 10 s before those 10 s."""
    bus, mono = FakeBus(), FakeClock()
    slow = Lease(bus, me="a", key="Akey", ttl=10.0, renew=0.001, poll=0.001, monotonic=mono)
    await slow.acquire()
    assert held(bus).ttl == 10.0
    bus.pings[ping_subject(FLEET, "a")] = None  # frozen: only the ttl decides
    standby = asyncio.ensure_future(lease(bus, "b", mono).acquire())
    await asyncio.sleep(0.05)
    mono.t += 5.0
    await asyncio.sleep(0.05)
    assert not standby.done()
    mono.t += 5.0
    assert (await asyncio.wait_for(standby, 2)).holder == "b"


async def test_a_leader_with_no_responders_is_taken_over_at_once() -> None:
    """Its connection is gone (killed, cut off): no need to wait for the ttl."""
    bus, mono = FakeBus(), FakeClock()
    await lease(bus, "a", mono).acquire()
    bus.pings[ping_subject(FLEET, "a")] = False

    async def passing() -> None:
        while True:
            await asyncio.sleep(0.001)
            mono.t += 0.01

    clock = asyncio.ensure_future(passing())
    try:
        won = await asyncio.wait_for(lease(bus, "b", mono).acquire(), 2)
    finally:
        clock.cancel()
    # No renewal for PING_SILENCE and two pings apart: well inside the ttl (2 s).
    assert won.holder == "b" and mono.t - 1000.0 < 1.5


async def test_a_leader_that_answers_nothing_is_judged_by_the_ttl_only() -> None:
    """A frozen leader (SIGSTOP) neither answers nor is gone: the ttl decides."""
    bus, mono = FakeBus(), FakeClock()
    await lease(bus, "a", mono).acquire()
    bus.pings[ping_subject(FLEET, "a")] = None
    standby = asyncio.ensure_future(lease(bus, "b", mono).acquire())
    await asyncio.sleep(0.05)
    assert not standby.done()
    mono.t += 2.5
    assert (await asyncio.wait_for(standby, 2)).holder == "b"


async def test_renewing_a_lease_someone_took_ends_the_leadership() -> None:
    bus, mono = FakeBus(), FakeClock()
    a = lease(bus, "a", mono)
    await a.acquire()
    entry = bus.live(LEASE, subjects.LEASE_KEY)
    assert entry is not None
    await bus.kv_update(LEASE, subjects.LEASE_KEY,
                        encode(LeaseRecord(holder="b", term=2)), entry.revision)
    why = await asyncio.wait_for(a.hold(), 2)
    assert "another coordinator took the lease" in why and not a.leading


async def test_a_leader_that_could_not_renew_for_a_ttl_stops_leading() -> None:
    """Its renewals fail (the bus is away) until its own clock says a ttl passed."""
    bus, mono = FakeBus(), FakeClock()
    a = lease(bus, "a", mono)
    await a.acquire()
    bus.faults[("update", LEASE)] = BusError("NATS is away")
    bus.fault_count[("update", LEASE)] = 10**6
    holding = asyncio.ensure_future(a.hold())
    await asyncio.sleep(0.05)
    assert not holding.done()
    mono.t += 2.0
    why = await asyncio.wait_for(holding, 2)
    assert "not renewed" in why and not a.leading


async def test_a_leader_paused_past_its_ttl_retakes_its_untouched_lease_under_a_new_term() -> None:
    bus, mono = FakeBus(), FakeClock()
    a = lease(bus, "a", mono)
    first = await a.acquire()
    a.deposed()  # it stopped leading after the pause
    again = await asyncio.wait_for(a.acquire(), 2)
    assert again.holder == "a" and again.term == first.term + 1


async def test_giving_the_lease_up_lets_a_standby_take_it_at_once() -> None:
    bus, mono = FakeBus(), FakeClock()
    a = lease(bus, "a", mono)
    await a.acquire()
    await a.release()
    won = await asyncio.wait_for(lease(bus, "b", mono).acquire(), 2)
    assert won.holder == "b" and won.term == 2


async def test_fences_only_move_up_and_a_fenced_writer_of_an_older_term_is_deposed() -> None:
    bus = FakeBus()
    old = Fenced(bus, await write_fences(bus, term=1, holder="a", now=0.0))
    await old.put(ROLLOUTS, "r1", b"one")
    new = Fenced(bus, await write_fences(bus, term=2, holder="b", now=0.0))
    with pytest.raises(Deposed):
        await write_fences(bus, term=2, holder="c", now=0.0)
    with pytest.raises(Deposed):
        await old.put(ROLLOUTS, "r1", b"stale")
    for bucket in fenced_buckets(FLEET):
        with pytest.raises(Deposed):
            await old.put(bucket, "k", b"stale")
    with pytest.raises(Deposed):
        await old.delete(ROLLOUTS, "r1")
    entry = bus.live(ROLLOUTS, "r1")
    assert entry is not None and entry.value == b"one"
    await new.put(ROLLOUTS, "r1", b"two")
    assert [r for r in await new.write_all(ROLLOUTS, [("r2", b"x"), ("r3", None)])
            if not isinstance(r, int)] == []


async def test_heard_is_when_the_last_lease_call_the_server_answered_was_sent() -> None:
    """Reads and renewals the bus does not answer (this host cut off) leave ``heard`` where it
    was; an answered one moves it to when that call was sent."""
    bus, mono = FakeBus(), FakeClock()
    a = lease(bus, "a", mono)
    await a.acquire()
    answered = a.heard
    assert answered == mono.t
    bus.faults[("update", LEASE)] = BusError("no answer")
    bus.fault_count[("update", LEASE)] = 10**6
    holding = asyncio.ensure_future(a.hold())
    mono.t += 1.5
    await asyncio.sleep(0.05)  # many renewals tried, none answered
    assert a.heard == answered and not holding.done()
    del bus.faults[("update", LEASE)]
    await asyncio.sleep(0.05)
    assert a.heard == mono.t  # a renewal sent now was answered
    holding.cancel()

    standby = lease(bus, "b", mono)
    bus.faults[("get", LEASE)] = BusError("no answer")
    bus.fault_count[("get", LEASE)] = 10**6
    waiting = asyncio.ensure_future(standby.acquire())
    before = standby.heard
    mono.t += 5.0
    await asyncio.sleep(0.05)
    assert standby.heard == before
    del bus.faults[("get", LEASE)]
    await asyncio.sleep(0.05)
    assert standby.heard == mono.t
    waiting.cancel()


# What any principal of the bus can make the server store on a key: the answer to one of its
# own requests, sent to the reply subject it named (nats-server checks none against its
# permissions). Measured with a node's credentials: one such request deposed the leader.
FORGED = b'{"type":"io.nats.jetstream.api.v1.stream_info_response","config":{}}'


async def until(done: Callable[[], bool], what: str, timeout: float = 2.0) -> None:
    """Let the loops under test run until ``done()``; AssertionError naming ``what`` after
    ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not done():  # noqa: ASYNC110 (the loops under test take turns between)
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g}s: {what}") from None


def readable(bus: FakeBus) -> LeaseRecord | None:
    """The lease record stored now (None: the key holds none)."""
    entry = bus.live(LEASE, subjects.LEASE_KEY)
    try:
        return decode(LeaseRecord, entry.value) if entry and entry.value else None
    except ProtocolError:
        return None


async def leading(bus: FakeBus, holder: str, term: int) -> Fenced:
    """A leader of ``term``: the lease names it and it fenced every bucket."""
    await bus.kv_put(LEASE, subjects.LEASE_KEY, encode(LeaseRecord(holder=holder, term=term)))
    return Fenced(bus, await write_fences(bus, term=term, holder=holder, now=0.0))


async def test_a_forged_fence_is_put_back_and_the_write_lands() -> None:
    """A fence key holding something no coordinator writes (or an older term's marker, which
    ``write_fences`` never writes after ours) is written back over: the writes it stopped
    land, the leader is not deposed, and later writes go on."""
    bus = FakeBus()
    writer = await leading(bus, "a", 3)
    fence = writer.fence
    for bucket in fenced_buckets(FLEET):
        await bus.kv_put(bucket, subjects.FENCE_KEY, FORGED)
        assert await writer.put(bucket, "k", b"after") > 0
        entry = bus.live(bucket, subjects.FENCE_KEY)
        assert entry is not None and entry.value == fence.marker
        assert entry.revision == fence.seq(bucket)
    older = encode(FenceMarker(term=2, holder="z"))
    await bus.kv_put(ROLLOUTS, subjects.FENCE_KEY, older)
    results = await writer.write_all(ROLLOUTS, [("r1", b"1"), ("r2", b"2")])
    assert all(isinstance(r, int) for r in results), results
    assert await writer.put(ROLLOUTS, "r3", b"3") > 0


async def test_a_later_coordinators_fence_still_deposes() -> None:
    """Written back over only when no coordinator wrote it: a later term's marker, or another
    holder's in our term, deposes as before."""
    bus = FakeBus()
    writer = await leading(bus, "a", 3)
    await bus.kv_put(ROLLOUTS, subjects.FENCE_KEY, encode(FenceMarker(term=4, holder="b")))
    with pytest.raises(Deposed):
        await writer.put(ROLLOUTS, "k", b"v")
    await bus.kv_put(ROLLOUTS, subjects.FENCE_KEY, encode(FenceMarker(term=3, holder="b")))
    with pytest.raises(Deposed):
        await writer.put(ROLLOUTS, "k", b"v")


async def test_a_fence_forged_again_and_again_is_a_bus_error_not_deposed() -> None:
    """Forged at every look: the writes fail with a BusError (the caller retries them later),
    and the leader is never deposed by it."""
    bus = FakeBus()
    writer = await leading(bus, "a", 3)
    real = bus.kv_fenced_all

    async def forged_first(*a: object, **kw: object) -> list[int | BusError]:
        await bus.kv_put(ROLLOUTS, subjects.FENCE_KEY, FORGED)
        return await real(*a, **kw)  # type: ignore[arg-type]

    bus.kv_fenced_all = forged_first  # type: ignore[method-assign]
    [result] = await writer.write_all(ROLLOUTS, [("k", b"v")])
    assert isinstance(result, BusError) and not isinstance(result, Deposed), result
    assert "not a coordinator" in str(result)


async def test_a_forged_lease_is_renewed_over_and_the_leader_keeps_its_term() -> None:
    """The leader's renewal meets a lease key holding no lease record: it writes its renewal
    back over it and keeps leading in the same term (before: "another coordinator took the
    lease", and a new term)."""
    bus, mono = FakeBus(), FakeClock()
    a = lease(bus, "a", mono)
    first = await a.acquire()
    holding = asyncio.ensure_future(a.hold())
    await bus.kv_put(LEASE, subjects.LEASE_KEY, FORGED)
    await until(lambda: readable(bus) is not None, "the lease written back over")
    assert not holding.done() and a.leading
    assert held(bus).holder == "a" and held(bus).term == first.term
    holding.cancel()


async def test_a_standby_does_not_take_a_forged_lease_from_a_live_leader() -> None:
    """A standby that reads a lease key holding no lease record waits as for a silent leader:
    the live leader writes it back over within a renewal, and the standby never takes it;
    with no leader to do so, it takes it after the ttl."""
    bus, mono = FakeBus(), FakeClock()
    a = lease(bus, "a", mono)
    first = await a.acquire()
    holding = asyncio.ensure_future(a.hold())
    standby = asyncio.ensure_future(lease(bus, "b", mono).acquire())
    for _ in range(20):
        await bus.kv_put(LEASE, subjects.LEASE_KEY, FORGED)
        await until(lambda: readable(bus) is not None, "the lease written back over")
    assert not standby.done() and held(bus).holder == "a" and held(bus).term == first.term
    holding.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await holding
    await bus.kv_put(LEASE, subjects.LEASE_KEY, FORGED)  # and no leader to put it back
    mono.t += 2.0
    won = await asyncio.wait_for(standby, 2)
    assert won.holder == "b" and won.term == first.term + 1


async def test_a_paused_leader_never_writes_its_fence_back_over_a_successors() -> None:
    """L (term 5) is paused; S takes the lease and fences term 6; a forged value then lands on
    a fence key. L, awake, must not take it for its own fence forged: the lease names S, so L
    is deposed and none of its writes lands (found by a review: before, L wrote its term-5
    marker back and its writes landed beside S's)."""
    bus = FakeBus()
    paused = await leading(bus, "L", 5)
    successor = await leading(bus, "S", 6)
    for bucket in fenced_buckets(FLEET):
        await bus.kv_put(bucket, subjects.FENCE_KEY, FORGED)
        with pytest.raises(Deposed):
            await paused.put(bucket, "k", b"stale")
        assert bus.live(bucket, "k") is None
        assert await successor.put(bucket, "k", b"new") > 0
        marker = bus.live(bucket, subjects.FENCE_KEY)
        assert marker is not None and decode(FenceMarker, marker.value or b"").term == 6


async def test_with_the_lease_forged_too_the_fence_keys_history_decides() -> None:
    """A forged fence while the lease holds a forged value as well: the newest marker the key
    still keeps decides. Ours: written back, the write lands. A successor's: Deposed, nothing
    lands. None kept (more forged values than the history holds): a BusError, retried, and the
    key is left as it is (the lease's renewal settles who leads first)."""
    bus = FakeBus()
    writer = await leading(bus, "a", 3)
    await bus.kv_put(LEASE, subjects.LEASE_KEY, FORGED)
    await bus.kv_put(ROLLOUTS, subjects.FENCE_KEY, FORGED)
    assert await writer.put(ROLLOUTS, "k", b"v") > 0

    await bus.kv_put(ROLLOUTS, subjects.FENCE_KEY, FORGED)
    bus.kept[(ROLLOUTS, subjects.FENCE_KEY)] = bus.kept[(ROLLOUTS, subjects.FENCE_KEY)][-1:]
    [result] = await writer.write_all(ROLLOUTS, [("k", b"w")])
    assert isinstance(result, BusError) and not isinstance(result, Deposed), result
    entry = bus.live(ROLLOUTS, subjects.FENCE_KEY)
    assert entry is not None and entry.value == FORGED

    paused = await leading(bus, "L", 5)
    await leading(bus, "S", 6)
    await bus.kv_put(LEASE, subjects.LEASE_KEY, FORGED)
    await bus.kv_put(DESIRED, subjects.FENCE_KEY, FORGED)
    with pytest.raises(Deposed):
        await paused.put(DESIRED, "k", b"stale")
    assert bus.live(DESIRED, "k") is None


async def test_a_standby_pings_the_last_leader_it_read_behind_a_forged_lease() -> None:
    """A stream of forged values can hide every renewal of a live leader from a standby: it
    pings the holder of the last record it read instead, and an answer counts as a renewal,
    past the ttl too; once that holder's connection is gone, it takes over (found by a review:
    before, two coordinators both led under such a stream)."""
    bus, mono = FakeBus(), FakeClock()
    first = await lease(bus, "a", mono).acquire()  # "a" leads; it does not renew here
    b = lease(bus, "b", mono)
    standby = asyncio.ensure_future(b.acquire())
    await until(lambda: b.current is not None and b.current.holder == "a",
                "the standby has read a's record")
    answer = bus.ping
    pinged: list[float] = []  # when (by the fake clock) the standby pinged a

    async def ping(subject: str, timeout: float) -> bool | None:
        pinged.append(mono.t)
        return await answer(subject, timeout)

    async def ticks(n: int) -> None:
        """``n`` half-seconds, each passed once the standby pinged a again."""
        for _ in range(n):
            mono.t += 0.5
            now = mono.t
            await until(lambda: (pinged and pinged[-1] >= now) or standby.done(),  # noqa: B023
                        "the standby pinging a")

    bus.ping = ping  # type: ignore[method-assign]
    await bus.kv_put(LEASE, subjects.LEASE_KEY, FORGED)
    await ticks(8)  # 4 s: twice the ttl, a's pings answered
    assert not standby.done()
    bus.pings[ping_subject(FLEET, "a")] = False  # a's connection is gone
    await ticks(4)
    won = await asyncio.wait_for(standby, 2)
    assert won.holder == "b" and won.term == first.term + 1


async def test_a_leader_does_not_renew_over_a_forged_lease_once_a_later_term_fenced() -> None:
    """The forged value may have replaced a successor's record: a leader whose renewal meets
    one, while a fence names a later term, stops leading instead of writing its record back."""
    bus, mono = FakeBus(), FakeClock()
    a = lease(bus, "a", mono)
    await a.acquire()
    holding = asyncio.ensure_future(a.hold())
    await write_fences(bus, term=9, holder="s", now=0.0)
    await bus.kv_put(LEASE, subjects.LEASE_KEY, FORGED)
    why = await asyncio.wait_for(holding, 2)
    assert "another coordinator took the lease" in why and not a.leading



async def test_a_new_lease_starts_above_a_forged_fences_kept_markers() -> None:
    """Every fence key holding a forged value (and no lease): the first coordinator still
    starts above the term the fences' histories keep, not at 1, whose desired states the agents
    would refuse as older than what they run."""
    bus, mono = FakeBus(), FakeClock()
    await write_fences(bus, term=7, holder="old", now=0.0)
    for bucket in fenced_buckets(FLEET):
        await bus.kv_put(bucket, subjects.FENCE_KEY, FORGED)
    won = await asyncio.wait_for(lease(bus, "a", mono).acquire(), 2)
    assert won.term == 8


async def test_a_take_whose_reply_was_lost_is_taken_again_at_once() -> None:
    """The take landed and its reply was lost: the lease names this coordinator at a revision
    it never learned. It takes it again at once, under a new term, not after a ttl with the
    fleet leaderless meanwhile (found by a review)."""
    bus, mono = FakeBus(), FakeClock()
    real = bus.kv_create
    lost = [True]

    async def create(bucket: str, key: str, value: bytes) -> int:
        rev = await real(bucket, key, value)
        if lost:
            lost.clear()
            raise BusError("no answer")  # it landed; the reply did not come
        return rev

    bus.kv_create = create  # type: ignore[method-assign]
    a = Lease(bus, me="a", ttl=2.0, renew=0.4, poll=0.001, monotonic=mono)
    won = await asyncio.wait_for(a.acquire(), 1)  # mono never moves: no ttl passes
    assert won.holder == "a" and won.term == 2 and not lost


async def test_a_recovery_that_hangs_does_not_keep_a_leader_past_its_ttl() -> None:
    """A renewal refused (another revision), then the reads that tell whether the lease is still
    ours hang (a slow bus: each may wait OP_TIMEOUT, 12 s): the leader stops leading about a
    ttl after its last renewal, not after them (found by a review)."""
    import time

    bus = FakeBus()
    a = Lease(bus, me="a", ttl=0.3, renew=0.05, poll=0.01, monotonic=time.monotonic)
    await asyncio.wait_for(a.acquire(), 1)
    bus.set("put", subjects.lease_bucket(FLEET), subjects.LEASE_KEY,
            encode(LeaseRecord(holder="b", term=9)))  # its next renewal: a Conflict

    async def hangs() -> bool | None:
        await asyncio.Event().wait()
        return None

    a._recover = hangs  # type: ignore[method-assign]
    began = time.monotonic()
    why = await asyncio.wait_for(a.hold(), 5)
    assert "not renewed" in why and time.monotonic() - began < 2.0, why
