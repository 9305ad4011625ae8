"""Fenced writes (``Bus.kv_fenced_all``) against a real server of one replica: a bucket's
atomic batches travel several at once, yet land in the order they were asked for, and a moved
fence stops every one of them. (A 3-server cluster, where they go one at a time:
``test_cluster.py``.)"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator.dev.broker import Broker
from coordinator.runtime.lease import Fence, write_fences
from protocol import subjects
from protocol.bus import FENCED_BATCH, FENCED_IN_FLIGHT, Bus
from protocol.errors import BusError, Conflict

FLEET = "fb"
DESIRED = subjects.desired_bucket(FLEET)


@pytest.fixture
async def fenced(broker: Broker) -> AsyncIterator[tuple[Bus, Fence]]:
    bus = await Bus.connect(broker.url, FLEET)
    try:
        await bus.ensure_fleet()
        yield bus, await write_fences(bus, term=1, holder="test", now=0.0)
    finally:
        await bus.close()


def watch_sends(bus: Bus) -> list[int]:
    """For each batch ``bus`` sends from now: how many of the bucket's batches awaited acks
    just before it went out."""
    awaiting: list[int] = []
    send = bus._send_atomic

    async def counted(prefix: str, *args: Any, **kwargs: Any) -> Any:
        lane = bus._fence_lanes[DESIRED]
        awaiting.append(len(lane.acks))
        return await send(prefix, *args, **kwargs)

    bus._send_atomic = counted  # type: ignore[method-assign]
    return awaiting


async def test_batches_of_several_calls_travel_at_once_and_all_land(
        fenced: tuple[Bus, Fence]) -> None:
    """On a server not in a cluster, FENCED_IN_FLIGHT batches of different calls await their
    acks at once: six calls of one batch each, made together, all land, each write with its
    own revision, and the fifth batch went out only once one of the first four was acked."""
    bus, fence = fenced
    assert bus.fenced_in_flight == FENCED_IN_FLIGHT > 1
    awaiting = watch_sends(bus)
    calls = [[(f"node-{c}-{i}.web", f"v{c}.{i}".encode()) for i in range(FENCED_BATCH)]
             for c in range(6)]
    results = await asyncio.gather(*(bus.kv_fenced_all(DESIRED, writes, fence.seq(DESIRED))
                                     for writes in calls))
    flat = [r for rs in results for r in rs]
    assert all(isinstance(r, int) for r in flat), {str(r) for r in flat
                                                   if not isinstance(r, int)}
    assert len(set(flat)) == len(flat)
    assert awaiting[:FENCED_IN_FLIGHT] == list(range(FENCED_IN_FLIGHT))  # sent without waiting
    assert max(awaiting) == FENCED_IN_FLIGHT - 1  # never more than the limit at once
    entries = {e.key: e.value for e in await bus.kv_entries(DESIRED)}
    assert {k: v for k, v in entries.items() if k != subjects.FENCE_KEY} == {
        k: v for writes in calls for k, v in writes}


async def test_the_batches_of_one_call_go_one_after_another(fenced: tuple[Bus, Fence]) -> None:
    """One call of three batches: each is sent once the one before it was stored (none of the
    bucket's batches awaits an ack when the next goes out), and all land in order."""
    bus, fence = fenced
    awaiting = watch_sends(bus)
    writes = [(f"node-{i}.web", b"x") for i in range(3 * FENCED_BATCH)]
    results = await bus.kv_fenced_all(DESIRED, writes, fence.seq(DESIRED))
    assert awaiting == [0, 0, 0]
    assert results == sorted(results) and all(isinstance(r, int) for r in results)


async def test_a_failed_batch_ends_its_call_and_nothing_after_it_lands(
        fenced: tuple[Bus, Fence]) -> None:
    """A call whose first batch the server refuses (a key written twice in it, the second
    time as a rollup, which JetStream refuses in a batch), or that cannot be sent at all (a
    value past max_payload): every write of the call is a BusError, and not one write of its
    later batches lands, so that a caller may write last a key saying the rest landed (the
    history's rebuild does)."""
    bus, fence = fenced
    writes = [(f"node-{i}.web", b"x") for i in range(2 * FENCED_BATCH)]
    writes[1] = ("node-0.web", b"again")
    results = await bus.kv_fenced_all(DESIRED, writes, fence.seq(DESIRED), rollup={"node-0.web"})
    assert all(isinstance(r, BusError) and not isinstance(r, Conflict) for r in results), {
        str(r) for r in results}
    assert [e.key for e in await bus.kv_entries(DESIRED)] == [subjects.FENCE_KEY]

    writes = [(f"node-{i}.web", b"x") for i in range(2 * FENCED_BATCH)]
    writes[10] = ("node-10.web", bytes(bus.max_payload + 1))
    results = await bus.kv_fenced_all(DESIRED, writes, fence.seq(DESIRED))
    assert all(isinstance(r, BusError) and not isinstance(r, Conflict) for r in results)
    assert [e.key for e in await bus.kv_entries(DESIRED)] == [subjects.FENCE_KEY]


async def test_a_later_call_lands_after_an_earlier_one_on_the_same_key(
        fenced: tuple[Bus, Fence]) -> None:
    """Two calls at once, the first with five batches whose last write is node-1.web, the
    second one write of node-1.web: the second lands last (its revision is higher and its value
    stays), every time, though the first's batches are still awaiting acks when it is sent."""
    bus, fence = fenced
    seq = fence.seq(DESIRED)
    for round_ in range(5):
        first = [(f"node-{i}.web", b"filler") for i in range(2, 5 * FENCED_BATCH + 1)]
        first.append(("node-1.web", f"first {round_}".encode()))
        a, b = await asyncio.gather(
            bus.kv_fenced_all(DESIRED, first, seq),
            bus.kv_fenced_all(DESIRED, [("node-1.web", f"second {round_}".encode())], seq))
        assert all(isinstance(r, int) for r in [*a, *b])
        assert isinstance(a[-1], int) and isinstance(b[0], int) and b[0] > a[-1]
        entry = await bus.kv_get(DESIRED, "node-1.web")
        assert entry is not None and entry.value == f"second {round_}".encode()


async def test_a_moved_fence_stops_every_batch_and_writes_nothing(
        fenced: tuple[Bus, Fence]) -> None:
    """Writes under a fence another leader has moved past: each is a Conflict (never a plain
    BusError, which callers retry), and none of them is stored."""
    bus, old = fenced
    new = await write_fences(bus, term=2, holder="next", now=1.0)
    writes = [(f"node-{i}.web", b"stale") for i in range(3 * FENCED_BATCH)]
    results = await bus.kv_fenced_all(DESIRED, writes, old.seq(DESIRED))
    assert all(isinstance(r, Conflict) for r in results), {type(r) for r in results}
    assert [e.key for e in await bus.kv_entries(DESIRED)] == [subjects.FENCE_KEY]
    # And the new fence writes.
    assert all(isinstance(r, int) for r in
               await bus.kv_fenced_all(DESIRED, writes[:10], new.seq(DESIRED)))


async def test_a_batch_with_no_ack_in_time_is_given_up_and_frees_its_place(
        fenced: tuple[Bus, Fence], broker: Broker) -> None:
    """A server that stops answering (SIGSTOP) mid-call: each batch is a BusError after the
    timeout, not a Conflict, nothing waits longer than it, and the bucket's lane holds no
    batch afterwards (the next call, once the server answers again, writes at once)."""
    bus, fence = fenced
    writes = [(f"node-{i}.web", b"x") for i in range(2 * FENCED_BATCH)]
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await bus.kv_fenced_all(DESIRED, writes, fence.seq(DESIRED), timeout=0.5)
        assert loop.time() - started < 3.0
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert all(isinstance(r, BusError) and not isinstance(r, Conflict) for r in results)
    assert not bus._fence_lanes[DESIRED].acks
    again = await bus.kv_fenced_all(DESIRED, writes, fence.seq(DESIRED))
    assert all(isinstance(r, int) for r in again)
