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
from protocol.bus import FENCED_BATCH, FENCED_IN_FLIGHT, FENCED_SINGLES, Bus
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


@pytest.mark.parametrize("atomic", [True, False])
async def test_a_batch_with_no_ack_in_time_is_given_up_and_frees_its_place(
        fenced: tuple[Bus, Fence], broker: Broker, atomic: bool) -> None:
    """A server that stops answering (SIGSTOP) mid-call: each batch (or, ``atomic=False``,
    each of a few single messages) is a BusError after the timeout, not a Conflict, nothing
    waits longer than it, and the bucket's lane holds no batch afterwards (the next call, once
    the server answers again, writes at once)."""
    bus, fence = fenced
    writes = [(f"node-{i}.web", b"x")
              for i in range(2 * FENCED_BATCH if atomic else FENCED_SINGLES)]
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await bus.kv_fenced_all(DESIRED, writes, fence.seq(DESIRED), timeout=0.5,
                                          atomic=atomic)
        assert loop.time() - started < 3.0
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert all(isinstance(r, BusError) and not isinstance(r, Conflict) for r in results)
    assert not bus._fence_lanes[DESIRED].acks and not bus._batch_acks
    again = await bus.kv_fenced_all(DESIRED, writes, fence.seq(DESIRED), atomic=atomic)
    assert all(isinstance(r, int) for r in again)


async def watch_headers(bus: Bus) -> list[tuple[str, dict[str, str]]]:
    """Every message stored on DESIRED's keys from now but its fence's (a core subscriber
    sees what the stream takes), as (key, headers), once ``bus.flush()``-ed."""
    seen: list[tuple[str, dict[str, str]]] = []
    prefix = f"$KV.{DESIRED}."

    async def heard(msg: Any) -> None:
        key = msg.subject.removeprefix(prefix)
        if key != subjects.FENCE_KEY:
            seen.append((key, dict(msg.headers or {})))

    await bus.nc.subscribe(f"{prefix}>", cb=heard)
    await bus.flush()
    return seen


@pytest.mark.parametrize("atomic", [True, False])
async def test_one_write_is_one_fenced_message_without_a_batch(
        fenced: tuple[Bus, Fence], atomic: bool) -> None:
    """A write of one key goes as one message carrying the fence's headers and no batch (a
    single server stages every batch in a file store of its own: ~2.5 ms): it lands, and under
    a fence moved past it is a Conflict and is not stored."""
    bus, old = fenced
    seen = await watch_headers(bus)
    [rev] = await bus.kv_fenced_all(DESIRED, [("node-1.web", b"one")], old.seq(DESIRED),
                                    atomic=atomic)
    assert isinstance(rev, int)
    await bus.flush()
    [(key, headers)] = seen
    assert key == "node-1.web" and not any(h.startswith("Nats-Batch") for h in headers)
    assert headers["Nats-Expected-Last-Subject-Sequence"] == str(old.seq(DESIRED))
    await write_fences(bus, term=2, holder="next", now=1.0)
    [stale] = await bus.kv_fenced_all(DESIRED, [("node-1.web", b"stale")], old.seq(DESIRED),
                                      atomic=atomic)
    assert isinstance(stale, Conflict), stale
    entry = await bus.kv_get(DESIRED, "node-1.web")
    assert entry is not None and entry.value == b"one"


async def test_a_few_writes_that_need_not_land_together_go_one_message_each(
        fenced: tuple[Bus, Fence]) -> None:
    """``atomic=False`` (a wave's desired states): up to FENCED_SINGLES writes go one fenced
    message each, in order, all sent before the first is acked (one round trip for all, where
    one after another took one each), each landing with its own revision; more go as a batch, as do
    atomic writes (a rollout record's head and pages). Under a moved fence every one of them
    is a Conflict and none lands."""
    bus, old = fenced
    seen = await watch_headers(bus)
    few = [(f"node-{i}.web", b"v") for i in range(FENCED_SINGLES)]
    awaiting = watch_sends(bus)
    revs = await bus.kv_fenced_all(DESIRED, few, old.seq(DESIRED), atomic=False)
    assert all(isinstance(r, int) for r in revs) and revs == sorted(revs), revs
    assert awaiting == list(range(FENCED_SINGLES))  # none waited for the one before it
    assert not bus._fence_lanes[DESIRED].acks and not bus._batch_acks
    await bus.flush()
    assert [k for k, _ in seen] == [k for k, _ in few]
    assert all("Nats-Batch-Id" not in h and "Nats-Expected-Last-Subject-Sequence" in h
               for _, h in seen), seen
    for writes, atomic in (([(f"node-{i}.web", b"w") for i in range(FENCED_SINGLES + 1)], False),
                           (few, True)):
        seen.clear()
        assert all(isinstance(r, int) for r in await bus.kv_fenced_all(
            DESIRED, writes, old.seq(DESIRED), atomic=atomic))
        await bus.flush()
        assert len(seen) == len(writes) and len({h["Nats-Batch-Id"] for _, h in seen}) == 1
    await write_fences(bus, term=2, holder="next", now=1.0)
    stale = await bus.kv_fenced_all(DESIRED, [(k, b"stale") for k, _ in few], old.seq(DESIRED),
                                    atomic=False)
    assert all(isinstance(r, Conflict) for r in stale), stale
    assert {e.value for e in await bus.kv_entries(DESIRED) if e.key != subjects.FENCE_KEY} == {
        b"v", b"w"}
