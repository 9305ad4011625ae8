"""protocol.bus against a real broker: the pitfalls it promises to handle."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DiscardPolicy, StorageType
from nats.js.manager import JetStreamManager

from coordinator.dev.broker import Broker, find_nats_server, free_port
from protocol.bus import (
    EVENTS_MAX_AGE,
    EVENTS_MAX_BYTES,
    EVENTS_MAX_EVENT,
    FLEET_MAX_CONSUMERS,
    SNAPSHOT_INACTIVE,
    Bus,
    Entry,
    EventsLimits,
)
from protocol.errors import (
    BusError,
    Conflict,
    NotReachable,
    ProtocolError,
    ServerTooOld,
    TooFewServers,
)


async def test_watch_survives_a_broker_restart(tmp_path: Path) -> None:
    """A KV watch keeps delivering changes after the broker is killed and restarted."""
    broker = Broker(store_dir=tmp_path / "js")
    await broker.start()
    bus = await Bus.connect(broker.url, "t")
    writer = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        seen, task = _followed(bus.watch("fw-t-desired", "n1.*"))
        await writer.kv_put("fw-t-desired", "n1.web", b"1")
        await _expect(seen, b"1")
        await broker.kill()
        await broker.start()
        await writer.kv_put("fw-t-desired", "n1.web", b"2")
        await writer.kv_put("fw-t-desired", "n2.web", b"other node")
        await _expect(seen, b"2")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await bus.close()
        await writer.close()
        await broker.stop()


async def test_after_a_reconnect_a_watch_starts_again_within_its_spread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A watch given a spread does not make its new consumer the moment its client reconnects
    (a large fleet doing so at once outruns the restarted server): it waits the moment drawn
    within the spread (here drawn at its end), asked after the reconnect, then delivers again.
    A renewal without a reconnect starts at once."""
    import protocol.bus as bus_mod

    monkeypatch.setattr(bus_mod.random, "uniform", lambda a, b: b)
    spread_s = 4.0
    asked: list[float] = []

    def spread() -> float:
        asked.append(time.monotonic())
        return spread_s

    broker = Broker(store_dir=tmp_path / "js")
    await broker.start()
    bus = await Bus.connect(broker.url, "t")
    writer = await Bus.connect(broker.url, "t")
    renew = asyncio.Event()
    reads: list[float] = []  # when each full read ended
    got: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def follow() -> None:
        async for e in bus.watch("fw-t-desired", "n1.*", renew=renew, spread=spread):
            if e is None:
                reads.append(time.monotonic())
            await got.put(None if e is None else e.value)

    async def read_number(k: int) -> None:
        async with asyncio.timeout(30):
            while len(reads) < k:
                await got.get()

    await bus.ensure_fleet()
    task = asyncio.create_task(follow())
    try:
        await read_number(1)
        renewed = time.monotonic()
        renew.set()
        await read_number(2)
        assert reads[1] - renewed < spread_s - 1 and asked == []  # no reconnect: no spread
        before, killed = bus.reconnects, time.monotonic()
        await broker.kill()
        await broker.start()
        await read_number(3)
        assert bus.reconnects == before + 1
        # Asked once, after the reconnect (a start that failed would ask it again: on a
        # server just restarted and idle, the one start here does not fail).
        assert len(asked) == 1 and asked[0] > killed
        assert reads[2] - asked[0] >= spread_s  # and waited all of it (the draw's end)
        await writer.kv_put("fw-t-desired", "n1.web", b"after")
        async with asyncio.timeout(20):
            while await got.get() != b"after":
                pass
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
        await writer.close()
        await broker.stop()


async def test_a_watch_asks_nothing_of_the_server_until_its_spread_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request for a consumer made while the client is disconnected waits in its buffer and
    goes out the moment it reconnects: every watch of a fleet at once, whatever its spread
    (nats-py's check of missed heartbeats made one; so did a watch whose spread ended while
    the broker was down again). Held: the broker down for five of the watch's heartbeats,
    then again from half a second into the spread for as long: at each reconnect the server
    is asked for no consumer until the spread has passed, and then the watch is back."""
    import urllib.request

    import protocol.bus as bus_mod
    from tests.integration.procs import wait_until

    monkeypatch.setattr(bus_mod.random, "uniform", lambda a, b: b)
    spread_s = 5.0
    broker = Broker(store_dir=tmp_path / "js")
    await broker.start()
    bus = await Bus.connect(broker.url, "t")

    async def consumers() -> int:
        def read() -> int:
            url = f"http://127.0.0.1:{broker.monitor_port}/jsz"
            with urllib.request.urlopen(url, timeout=2) as answer:
                return int(json.load(answer).get("consumers", 0))
        return await asyncio.to_thread(read)

    reads: list[float] = []
    await bus.ensure_fleet()
    durable = await consumers()  # the fleet's own, before the watch's
    seen, task = _followed(bus.watch("fw-t-desired", "n1.*", heartbeat=lambda: 0.5,
                                     spread=lambda: spread_s))
    try:
        async with asyncio.timeout(30):
            while await seen.get() is not None:
                pass
        assert await consumers() == durable + 1
        before = bus.reconnects
        await broker.kill()
        await asyncio.sleep(2.5)  # five heartbeats: nats-py's check would have fired twice
        await broker.start()
        await wait_until(lambda: asyncio.sleep(0, bus.reconnects), lambda n: n > before,
                         timeout=30, what="the client's reconnect", interval=0.02)
        assert await consumers() == durable  # none asked for at the reconnect
        await asyncio.sleep(0.5)
        await broker.kill()  # again, during the spread: it ends while the client is away
        await asyncio.sleep(spread_s)
        await broker.start()
        await wait_until(lambda: asyncio.sleep(0, bus.reconnects), lambda n: n > before + 1,
                         timeout=30, what="the client's second reconnect", interval=0.02)
        reconnected = time.monotonic()
        assert await consumers() == durable  # none asked for at the reconnect
        await asyncio.sleep(max(0.0, reconnected + spread_s - 1.0 - time.monotonic()))
        assert await consumers() == durable  # nor until the spread's end is near
        async with asyncio.timeout(30):
            while await seen.get() is not None:
                pass
        reads.append(time.monotonic())
        assert reads[0] - reconnected >= spread_s - 0.5
        assert await consumers() == durable + 1  # the watch's one consumer, back
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
        await broker.stop()


async def test_a_watch_whose_consumer_is_lost_starts_again_within_its_spread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer can go while its client stays connected (on a cluster, the server holding it
    dies and the client's own lives on; here it is deleted): nats-py made it again after two
    missed heartbeats, every watch of a fleet at once. A watch given a spread notices the
    silence itself and starts again within its spread: no consumer is asked for before it."""
    import protocol.bus as bus_mod

    monkeypatch.setattr(bus_mod.random, "uniform", lambda a, b: b)
    spread_s = 5.0
    async with Broker(store_dir=tmp_path / "js") as broker:
        bus = await Bus.connect(broker.url, "t")
        other = await Bus.connect(broker.url, "t")
        await bus.ensure_fleet()
        stream = "KV_fw-t-desired"
        seen, task = _followed(bus.watch("fw-t-desired", "n1.*", heartbeat=lambda: 1.0,
                                         spread=lambda: spread_s))
        try:
            async with asyncio.timeout(30):
                while await seen.get() is not None:
                    pass
            [consumer] = await other.js.consumers_info(stream)
            deleted = time.monotonic()
            await other.delete_consumer(stream, consumer.name)
            await asyncio.sleep(spread_s)  # nats-py's own check made it again within 4 s
            assert await other.js.consumers_info(stream) == []
            async with asyncio.timeout(30):
                while await seen.get() is not None:
                    pass
            assert time.monotonic() - deleted >= spread_s + 2.0  # silence noticed, then spread
            assert len(await other.js.consumers_info(stream)) == 1 and bus.lost_watches >= 1
            await other.kv_put("fw-t-desired", "n1.web", b"back")
            await _expect(seen, b"back")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await bus.close()
            await other.close()


def _followed(watch: AsyncIterator[Entry | None],
              ) -> tuple[asyncio.Queue[Entry | None], asyncio.Task[None]]:
    """A task putting everything ``watch`` yields on a queue (the test cancels it)."""
    seen: asyncio.Queue[Entry | None] = asyncio.Queue()

    async def follow() -> None:
        async for e in watch:
            await seen.put(e)

    return seen, asyncio.create_task(follow())


async def _expect(q: asyncio.Queue[Entry | None], value: bytes) -> None:
    async with asyncio.timeout(20):
        while True:
            e = await q.get()
            if e is not None:
                assert e.key.startswith("n1.")
                if e.value == value:
                    return


async def test_flush_returns_once_the_server_took_what_was_sent_before_it(tmp_path: Path) -> None:
    """``Bus.flush`` is a barrier: the server has processed every command sent before it. A
    nats-server that traces what it reads shows the order: the subscriptions come before
    the flush's PING. nats-py's own ``flush()`` (2.16) writes its PING ahead of the queued
    SUBs: its PONG then comes before they are in place, and a publisher on another
    connection finds no subscriber (test_a_burst_of_messages... lost its whole burst so)."""
    log = tmp_path / "trace.log"
    async with tracing_server(log) as port:
        bus = await Bus.connect(f"nats://127.0.0.1:{port}", "t")
        try:
            for i in range(3):
                await bus.nc.subscribe(f"order.{i}")  # queued for nats-py's flusher task
            await bus.flush()
            read = [line.split("<<- [", 1)[1].rstrip("]").split()[:2]
                    for line in log.read_text().splitlines() if "<<- [" in line]
            subs = [i for i, op in enumerate(read) if op[0] == "SUB" and op[1][:6] == "order."]
            pings = [i for i, op in enumerate(read) if op[0] == "PING"]
            assert len(subs) == 3 and pings and max(subs) < pings[-1], read
        finally:
            await bus.close()


@contextlib.asynccontextmanager
async def tracing_server(log: Path) -> AsyncIterator[int]:
    """A bare nats-server on a free loopback port (its port), tracing what it reads to
    ``log``; stopped on the way out."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-V", "-l", str(log),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        yield port
    finally:
        server.terminate()
        await server.wait()


async def test_a_burst_of_messages_leaves_the_loop_its_turns(broker: Broker) -> None:
    """nats-py runs a subscription's callbacks back to back while messages are queued: a burst
    handled by callbacks that never suspend (50,000 registrations) kept every other task, the
    lease's renewal among them, waiting for seconds. ``Bus.subscribe`` gives the loop a turn at
    least every ``YIELD_EVERY`` of them: here 400 callbacks of 1 ms each (0.4 s) with a task
    beside them that should run about 80 times; without the turns it ran a few times."""
    bus = await Bus.connect(broker.url, "t")
    sender = await Bus.connect(broker.url, "t")
    handled = 0
    turns_during = 0
    done = asyncio.Event()

    async def busy(subject: str, data: bytes) -> None:
        nonlocal handled
        handled += 1
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:  # work that never suspends, as a decode and a log do
            pass
        if handled == 400:
            done.set()

    async def beside() -> None:
        nonlocal turns_during
        while not done.is_set():
            if 0 < handled < 400:
                turns_during += 1
            await asyncio.sleep(0)

    try:
        await bus.subscribe("burst.x", busy)
        await bus.flush()
        for i in range(400):  # queued on the socket before any is handled
            await sender.publish("burst.x", b"%d" % i)
        other = asyncio.create_task(beside())
        await sender.flush()
        async with asyncio.timeout(30):
            await done.wait()
        await other
        assert turns_during >= 40, f"the loop had {turns_during} turns during 400 callbacks"
    finally:
        await bus.close()
        await sender.close()


async def test_a_watch_whose_consumer_is_gone_starts_again(broker: Broker) -> None:
    """nats-py re-creates a watch's ordered consumer in a task whose failure it only reports; a
    ``verify``ing watch asks the server for its consumer and starts a new watch without it.
    Here the consumer is deleted and nats-py's own recovery stopped: the change after that
    still arrives, after a new snapshot (``None``)."""
    bus = await Bus.connect(broker.url, "t")
    writer = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        await writer.kv_put("fw-t-observed", "n1.web", b"1")
        seen, task = _followed(bus.watch("fw-t-observed", ">", verify=0.2))
        async with asyncio.timeout(10):
            assert (await seen.get()) is not None and (await seen.get()) is None
        [w] = list(bus._watchers)
        w._sub._sub._jsi._hbtask.cancel()  # nats-py will not notice, as when its re-creation failed
        await bus.js.delete_consumer(w._sub._stream, w._sub._consumer)
        await writer.kv_put("fw-t-observed", "n1.web", b"2")
        async with asyncio.timeout(10):
            while (e := await seen.get()) is None or e.value != b"2":
                pass
        assert bus.lost_watches == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await bus.close()
        await writer.close()


async def test_a_renewed_watch_asks_its_heartbeat_again(broker: Broker) -> None:
    """A watch asks its ``heartbeat`` at every start: renewed (``renew`` set), it starts again
    with a full read on a new consumer that asks the new heartbeat, the old consumer gone from
    its watcher, and changes still arrive."""
    bus = await Bus.connect(broker.url, "t")
    writer = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        await writer.kv_put("fw-t-desired", "n1.web", b"1")
        beat, renew = [1.0], asyncio.Event()
        seen, task = _followed(bus.watch("fw-t-desired", "n1.*", heartbeat=lambda: beat[0],
                                         renew=renew))
        async with asyncio.timeout(10):
            assert (await seen.get()) is not None and (await seen.get()) is None
        [w] = list(bus._watchers)
        info = await w._sub.consumer_info()
        assert info.config.idle_heartbeat == 1.0
        beat[0] = 3.0
        renew.set()
        async with asyncio.timeout(10):  # the full read again
            e = await seen.get()
            assert e is not None and e.value == b"1" and (await seen.get()) is None
        [w2] = list(bus._watchers)
        assert w2 is not w and not renew.is_set()
        info = await w2._sub.consumer_info()
        assert info.config.idle_heartbeat == 3.0
        await writer.kv_put("fw-t-desired", "n1.web", b"2")
        await _expect(seen, b"2")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await bus.close()
        await writer.close()


async def test_create_is_a_lock(broker: Broker) -> None:
    """kv_create succeeds once; the second writer gets Conflict."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        rev = await bus.kv_create("fw-t-locks", "svc", b"r1")
        with pytest.raises(Conflict):
            await bus.kv_create("fw-t-locks", "svc", b"r2")
        await bus.kv_update("fw-t-locks", "svc", b"r1b", rev)
        with pytest.raises(Conflict):
            await bus.kv_update("fw-t-locks", "svc", b"r1c", rev)
    finally:
        await bus.close()


async def test_no_server_is_not_reachable() -> None:
    """Connecting where no server listens fails fast with the fix in the message."""
    with pytest.raises(NotReachable, match="fleetwave broker"):
        await Bus.connect(f"nats://127.0.0.1:{free_port()}", "t", connect_deadline=0.5)


async def test_request_without_coordinator(broker: Broker) -> None:
    """A request nobody serves says that no coordinator answers and how to start one."""
    bus = await Bus.connect(broker.url, "t")
    try:
        with pytest.raises(NotReachable, match="fleetwave coordinator"):
            await bus.request("fw.t.api.nodes", b"{}")
    finally:
        await bus.close()


@pytest.mark.parametrize("ask", ["request", "ping"])
async def test_a_request_cancelled_as_its_answer_arrives_is_cancelled(broker: Broker,
                                                                     ask: str) -> None:
    """A task cancelled in the turns between its answer's arrival and its waking up is
    cancelled, not handed the answer: on Python 3.11, nats-py's wait_for dropped such a
    cancellation and the task went on (a benchmark ran on after SIGTERM). Cancelled 0..5 turns
    after the answer came in, every request either ended before (and returned it) or raises
    CancelledError."""
    bus = await Bus.connect(broker.url, "t")
    other = await Bus.connect(broker.url, "t")

    async def answer(msg: Any) -> None:
        await msg.respond(b"ok")

    try:
        await other.nc.subscribe("q", cb=answer)
        await other.flush()
        asks = {"request": lambda: bus.request("q", b"x", timeout=5),
                "ping": lambda: bus.ping("q", timeout=5)}
        outcomes = []
        for turns in [t for t in range(6) for _ in range(5)]:
            came = bus.nc.stats["in_msgs"]
            task = asyncio.create_task(asks[ask]())
            async with asyncio.timeout(5):
                while bus.nc.stats["in_msgs"] == came:  # noqa: ASYNC110 (turns are the point)
                    await asyncio.sleep(0)  # until the answer is in: it was read
            for _ in range(turns):
                await asyncio.sleep(0)
            if task.done():
                outcomes.append((turns, "answered first", await task))
                continue
            task.cancel()
            try:
                outcomes.append((turns, "went on after cancel()", await task))
            except asyncio.CancelledError:
                outcomes.append((turns, "cancelled", None))
        assert not [o for o in outcomes if o[1] == "went on after cancel()"], outcomes
        assert {o[1] for o in outcomes} == {"answered first", "cancelled"}, outcomes
    finally:
        await bus.close()
        await other.close()


async def test_a_retried_event_is_stored_once(broker: Broker) -> None:
    """The same event published twice (a retry after a lost ack) is one message in the stream."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        await bus.js_publish("fw.t.evt.x", b'{"id": "e1"}')
        await bus.js_publish("fw.t.evt.x", b'{"id": "e1"}')
        await bus.js_publish("fw.t.evt.x", b'{"id": "e2"}')
        stored = [m async for m in bus.stream_messages("FW_t_EVENTS", "fw.t.evt.>")]
    finally:
        await bus.close()
    assert stored == [b'{"id": "e1"}', b'{"id": "e2"}']


async def test_pipelined_compare_and_sets_report_each_write(broker: Broker) -> None:
    """kv_update_all: per write its new revision, or a Conflict when its revision was stale;
    the stale write changes nothing and the others land."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        bucket = "fw-t-desired"
        revs = {k: await bus.kv_create(bucket, k, b"v1") for k in ("a.x", "b.x", "c.x")}
        results = await bus.kv_update_all(
            bucket, [("a.x", b"v2", revs["a.x"]), ("b.x", b"v2", revs["b.x"] - 1),
                     ("c.x", b"v2", revs["c.x"])])
        assert isinstance(results[0], int) and results[0] > max(revs.values())
        assert isinstance(results[1], Conflict)
        assert isinstance(results[2], int) and results[2] > results[0]
        got = {k: await bus.kv_get(bucket, k) for k in revs}
        assert {k: e.value for k, e in got.items() if e is not None} == {
            "a.x": b"v2", "b.x": b"v1", "c.x": b"v2"}
        assert got["a.x"] is not None and got["a.x"].revision == results[0]
    finally:
        await bus.close()


async def test_pipelined_events_are_stored_once_in_order(broker: Broker) -> None:
    """js_publish_events stores every message in order, in atomic batches of EVENTS_BATCH;
    publishing some again (a retry after lost acks, an outbox published again), alone or with
    new ones (the server refuses such an atomic batch whole), adds only the new ones."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        batch = [("fw.t.evt.x", f'{{"id": "e{i}"}}'.encode()) for i in range(1200)]
        assert await bus.js_publish_events(batch[:1100]) == [None] * 1100
        assert await bus.js_publish_events(batch[:10]) == [None] * 10
        assert await bus.js_publish_events(batch[1090:]) == [None] * 110
        stored = [m async for m in bus.stream_messages("FW_t_EVENTS", "fw.t.evt.>")]
        config = (await bus.js.stream_info("FW_t_EVENTS")).config
    finally:
        await bus.close()
    assert stored == [data for _, data in batch]
    assert config.allow_atomic


async def test_pipelined_publishes_without_a_broker_fail_in_bounded_time(tmp_path: Path) -> None:
    """With the broker gone, every message of the batch comes back as a BusError within the
    timeout (no ack is waited for forever)."""
    port = free_port()
    broker = Broker(port=port, store_dir=tmp_path / "js")
    await broker.start()
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        await broker.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await bus.js_publish_events([("fw.t.evt.x", b"{}")] * 5, timeout=1.0)
        assert loop.time() - started < 5.0
        assert len(results) == 5 and all(isinstance(r, BusError) for r in results)
    finally:
        await bus.close()


async def test_a_snapshot_holds_every_live_key_and_no_deleted_one(broker: Broker) -> None:
    """kv_entries lists the stream's keys before reading (a watch's caught-up marker can come
    early, nats-py #842) and ends once each was delivered: deleted keys count as delivered and
    are left out, keys outside the pattern are never waited for."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        bucket = "fw-t-desired"
        for i in range(300):
            await bus.kv_put(bucket, f"n{i}.hello", b"v")
        await bus.kv_put(bucket, "n0.other", b"v")
        for i in range(0, 300, 7):
            await bus.kv_delete(bucket, f"n{i}.hello")
        want = {f"n{i}.hello" for i in range(300) if i % 7}
        for _ in range(3):
            got = await bus.kv_entries(bucket, "*.hello")
            assert {e.key for e in got} == want
    finally:
        await bus.close()



async def test_a_keys_history_is_every_revision_the_bucket_keeps_oldest_first(
        broker: Broker) -> None:
    """kv_history: the revisions of one key the bucket keeps (the desired bucket: 5), oldest
    first, a delete as None; none of another key, even one it is a prefix of; [] for none."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        bucket = "fw-t-desired"
        for v in (b"1", b"2", b"3"):
            await bus.kv_put(bucket, "n1.hello", v)
        await bus.kv_delete(bucket, "n1.hello")
        await bus.kv_put(bucket, "n1.hello", b"4")
        await bus.kv_put(bucket, "n1.hello2", b"other")
        got = await bus.kv_history(bucket, "n1.hello")
        assert [e.value for e in got] == [b"1", b"2", b"3", None, b"4"]
        assert [e.revision for e in got] == sorted(e.revision for e in got)
        for v in (b"5", b"6"):
            await bus.kv_put(bucket, "n1.hello", v)
        assert [e.value for e in await bus.kv_history(bucket, "n1.hello")] == [
            b"3", None, b"4", b"5", b"6"]
        assert await bus.kv_history(bucket, "n9.hello") == []
    finally:
        await bus.close()

async def test_a_watch_is_caught_up_only_after_the_entries_the_bucket_held(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server counts a message sent once it queued it, and its consumer-info reply can
    reach us before the messages (nats-py #842). nats-py's watch then marked itself caught up
    (``None``) before the bucket's entries, and a snapshot ended there was empty. Here every
    consumer-info reply comes at once saying nothing is pending (the race, made certain): the
    watch still delivers every entry before its marker, and the snapshot holds them all."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        for i in range(50):
            await bus.kv_put("fw-t-observed", f"n{i}.web", b"1")

        async def all_sent(*args: Any, **kwargs: Any) -> Any:
            return types.SimpleNamespace(num_pending=0)

        monkeypatch.setattr(JetStreamManager, "consumer_info", all_sent)
        seen, task = _followed(bus.watch("fw-t-observed", ">"))
        try:
            async with asyncio.timeout(10):
                first = [await seen.get() for _ in range(51)]
            assert first[-1] is None and {e.key for e in first[:-1] if e} == {
                f"n{i}.web" for i in range(50)}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        got = await bus.kv_entries("fw-t-observed", "*.web")
        assert len(got) == 50
    finally:
        await bus.close()


async def test_the_events_stream_is_bounded(tmp_path: Path) -> None:
    """The events stream has a byte budget (oldest dropped first) and a size cap per event, and a
    fleet made before it had them gets them at the next ensure_fleet."""
    broker = Broker(store_dir=tmp_path / "js")
    await broker.start()
    bus = await Bus.connect(broker.url, "t")
    try:
        # A stream as older releases made it: no limits but its age.
        await bus.js.add_stream(name="FW_t_EVENTS", subjects=["fw.t.evt.>"],
                                max_age=EVENTS_MAX_AGE)
        await bus.ensure_fleet()
        info = await bus.js.stream_info("FW_t_EVENTS")
        assert info.config.max_bytes == EVENTS_MAX_BYTES
        assert info.config.max_msg_size == EVENTS_MAX_EVENT
        assert info.config.discard == DiscardPolicy.OLD
        assert info.config.subjects == ["fw.t.evt.>"]
        await bus.js_publish("fw.t.evt.slot.started", b"{}")
        with pytest.raises(BusError, match="maximum"):
            await bus.js_publish("fw.t.evt.slot.started", b"x" * (EVENTS_MAX_EVENT + 1))
        await bus.ensure_fleet()  # again: nothing to change, nothing fails
    finally:
        await bus.close()
        await broker.stop()


async def test_one_server_gets_one_replica_and_refuses_more(broker: Broker) -> None:
    """On a single server the fleet is made with 1 replica, and asking for 3 is TooFewServers
    (saying what to do) before any stream of the fleet exists."""
    bus = await Bus.connect(broker.url, "solo")
    try:
        with pytest.raises(TooFewServers, match="single one; use --replicas 1"):
            await bus.ensure_fleet(3, raise_existing=True)
        assert [s async for s in _streams(bus)] == []
        assert (await bus.ensure_fleet()).replicas == 1
        assert (await bus.ensure_fleet(raise_existing=True)).raised == []
    finally:
        await bus.close()


async def test_a_coordinator_refuses_a_server_without_atomic_batches(broker: Broker) -> None:
    """A server older than 2.12 (its INFO's version, the one thing the check reads) is refused
    by the coordinator's set-up, saying why and what to do, before any stream exists; tools,
    which write nothing fenced, go on."""
    bus = await Bus.connect(broker.url, "old")
    try:
        real = bus.nc._server_info["version"]
        bus.nc._server_info["version"] = "2.11.9"
        with pytest.raises(ServerTooOld, match=r"^nats-server 2\.11\.9 at nats://127\.[0-9.]+:"
                           r"\d+ is older than 2\.12: .* upgrade the server \(every server of a "
                           r"cluster\) to 2\.12 or later"):
            await bus.ensure_fleet(raise_existing=True)
        assert [s async for s in _streams(bus)] == []
        assert (await bus.ensure_fleet()).replicas == 1  # a tool's set-up
        bus.nc._server_info["version"] = real
        assert (await bus.ensure_fleet(raise_existing=True)).raised == []
    finally:
        await bus.close()


async def _streams(bus: Bus) -> AsyncIterator[str]:
    for info in await bus.js.streams_info():
        yield info.config.name or ""


async def test_the_coordinators_events_limits_apply_to_an_existing_stream(tmp_path: Path) -> None:
    """The limits given (the coordinator's --events-max-age/--events-max-bytes) are set on an
    existing stream, and a later ensure_fleet without them (a tool) leaves them as they are."""
    broker = Broker(store_dir=tmp_path / "js")
    await broker.start()
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        limits = EventsLimits(max_age=7 * 86400.0, max_bytes=256 * 2**20)
        await bus.ensure_fleet(raise_existing=True, events=limits)
        info = await bus.js.stream_info("FW_t_EVENTS")
        assert (info.config.max_age, info.config.max_bytes) == (7 * 86400.0, 256 * 2**20)
        await bus.ensure_fleet()
        info = await bus.js.stream_info("FW_t_EVENTS")
        assert (info.config.max_age, info.config.max_bytes) == (7 * 86400.0, 256 * 2**20)
        await bus.ensure_fleet(raise_existing=True, events=EventsLimits())  # back to defaults
        info = await bus.js.stream_info("FW_t_EVENTS")
        assert (info.config.max_age, info.config.max_bytes) == (EVENTS_MAX_AGE, EVENTS_MAX_BYTES)
    finally:
        await bus.close()
        await broker.stop()


async def test_the_observed_bucket_is_kept_in_memory_and_an_old_one_on_disk_is_moved(
    broker: Broker,
) -> None:
    """A new fleet's observed bucket is a memory stream, every other bucket a file stream. A
    fleet made before (its observed bucket on disk) keeps it through a tool's ensure_fleet and
    gets it made again in memory by the coordinator's (``raise_existing``); writes go on."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        info = await bus.js.stream_info("KV_fw-t-observed")
        assert info.config.storage == StorageType.MEMORY
        for b in ("desired", "rollouts", "nodes", "locks", "lease", "cordons"):
            assert (await bus.js.stream_info(f"KV_fw-t-{b}")).config.storage == StorageType.FILE

        old = await Bus.connect(broker.url, "u")
        try:
            await old.js.create_key_value(bucket="fw-u-observed", history=1,
                                          storage=StorageType.FILE)
            await old.kv_put("fw-u-observed", "n1.web", b"before")
            assert (await old.ensure_fleet()).moved == []  # a tool leaves it
            assert (await old.js.stream_info("KV_fw-u-observed")).config.storage == \
                StorageType.FILE
            assert (await old.kv_get("fw-u-observed", "n1.web")) is not None
            setup = await old.ensure_fleet(raise_existing=True)
            assert setup.moved == ["KV_fw-u-observed"]
            assert (await old.js.stream_info("KV_fw-u-observed")).config.storage == \
                StorageType.MEMORY
            assert await old.kv_get("fw-u-observed", "n1.web") is None  # the agents say it again
            await old.kv_put("fw-u-observed", "n1.web", b"after")
            got = await old.kv_get("fw-u-observed", "n1.web")
            assert got is not None and got.value == b"after"
            assert (await old.ensure_fleet(raise_existing=True)).moved == []  # once only
        finally:
            await old.close()
    finally:
        await bus.close()


async def test_a_watch_makes_its_missing_memory_bucket_again_after_a_restart(
    tmp_path: Path,
) -> None:
    """A single server keeps no memory stream over a restart: the coordinator's observed watch
    (``on_missing=ensure_observed``) makes the bucket again, empty, and delivers what agents
    write to it afterwards; a write before that fails and is the writer's to retry."""
    broker = Broker(store_dir=tmp_path / "js")
    await broker.start()
    bus = await Bus.connect(broker.url, "t")
    writer = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        await writer.kv_put("fw-t-observed", "n1.web", b"1")
        seen, task = _followed(bus.watch("fw-t-observed", ">", on_missing=bus.ensure_observed))
        async with asyncio.timeout(10):  # the snapshot: the entry, then its end
            assert (e := await seen.get()) is not None and e.value == b"1"
            assert await seen.get() is None
        await broker.kill()
        await broker.start()
        async with asyncio.timeout(20):  # the empty bucket's snapshot: made again
            while (await seen.get()) is not None:
                pass
        info = await bus.js.stream_info("KV_fw-t-observed")
        assert info.config.storage == StorageType.MEMORY and info.state.messages == 0
        await writer.kv_put("fw-t-observed", "n1.web", b"2")
        await _expect(seen, b"2")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await bus.close()
        await writer.close()
        await broker.stop()


async def test_a_full_memory_store_fails_observed_writes_saying_what_to_raise(
    tmp_path: Path,
) -> None:
    """Past the servers' max_memory_store every write to the observed bucket fails, even one
    replacing a key (measured), with one line naming max_memory_store; the disk buckets still
    take writes, so desired states and records are never held by it."""
    broker = Broker(store_dir=tmp_path / "js", max_memory="1MB")
    await broker.start()
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        with pytest.raises(BusError, match="raise max_memory_store") as caught:
            for i in range(10_000):  # ~1,400 of 700 B fill 1 MB
                await bus.kv_put("fw-t-observed", f"n{i}.web", b"x" * 700)
        assert "out of room" in str(caught.value)
        with pytest.raises(BusError, match="max_memory_store"):
            await bus.kv_put("fw-t-observed", "n1.web", b"y" * 700)
        assert await bus.kv_put("fw-t-desired", "n1.web", b"wanted") > 0
    finally:
        await bus.close()
        await broker.stop()


async def test_closing_a_bus_whose_handler_is_stuck_leaves_no_stray_error(broker: Broker) -> None:
    """A coordinator stopping while a subscription still has messages queued behind a handler
    that does not return (an overloaded leader, deposed): the drain gives up within its bound
    and leaves nothing behind. nats-py's drain, cancelled from outside, left a gather whose
    CancelledError nobody retrieved: "_GatheringFuture exception was never retrieved" and a
    traceback in the log of a coordinator that stopped cleanly."""
    bus = await Bus.connect(broker.url, "default")
    stuck = asyncio.Event()

    async def handler(subject: str, data: bytes) -> None:
        await stuck.wait()  # never set: the handler holds its queue until the drain gives up

    await bus.subscribe("fw.default.test.stuck", handler)
    for _ in range(50):
        await bus.publish("fw.default.test.stuck", b"x")
    await bus.flush()
    loop = asyncio.get_running_loop()
    strays: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: strays.append(context))
    try:
        async with asyncio.timeout(30):
            await bus.close()
        assert bus.nc.is_closed
        gc.collect()  # a stray is reported as its future is collected, from within collect()
    finally:
        loop.set_exception_handler(None)
    assert not strays, [str(c.get("message")) for c in strays]


async def test_closing_without_a_drain_asks_the_server_nothing_and_sends_what_was_queued(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-shot command's close (``drain=False``, the CLI's): no drain and no round trip to
    the server, subscriptions or not; a message it queued and never flushed still arrives."""
    bus = await Bus.connect(broker.url, "default")
    other = await Bus.connect(broker.url, "default")
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def heard(subject: str, data: bytes) -> None:
        await got.put(data)

    async def nothing(subject: str, data: bytes) -> None:
        pass

    try:
        await other.subscribe("fw.default.test.queued", heard)
        await other.flush()
        await bus.subscribe("fw.default.test.mine", nothing)
        asked: list[str] = []

        async def drain() -> None:
            asked.append("drain")

        async def flush(timeout: float = 10) -> None:
            asked.append("flush")

        monkeypatch.setattr(bus.nc, "drain", drain)
        monkeypatch.setattr(bus.nc, "flush", flush)
        await bus.nc.publish("fw.default.test.queued", b"last words")  # queued, not flushed
        async with asyncio.timeout(10):
            await bus.close(drain=False)
        assert bus.nc.is_closed and asked == []
        assert await asyncio.wait_for(got.get(), 10) == b"last words"
    finally:
        await other.close()


async def _consumers(bus: Bus, stream: str, n: int) -> list[str]:
    """Make ``n`` push consumers on ``stream`` as n agents' watches would (raw API, 200 at a
    time); the server's errors, if any."""
    gate = asyncio.Semaphore(200)

    async def make(i: int) -> str:
        async with gate:
            config = {"deliver_subject": f"_FWN.node-{i}.w", "ack_policy": "none",
                      "deliver_policy": "last_per_subject", "mem_storage": True,
                      "filter_subject": f"$KV.{stream.removeprefix('KV_')}.node-{i}.>",
                      "inactive_threshold": 600 * 10**9}
            raw = await bus.nc.request(f"$JS.API.CONSUMER.CREATE.{stream}",
                                       json.dumps({"stream_name": stream,
                                                   "config": config}).encode(), timeout=30)
            return str(json.loads(raw.data).get("error", {}).get("description", ""))

    return [e for e in await asyncio.gather(*(make(i) for i in range(n))) if e]


async def test_more_than_a_thousand_agents_can_watch_their_desired_keys(broker: Broker) -> None:
    """nats-server 2.15 caps a stream at 1,000 consumers unless it sets a limit of its own; each
    agent watches through a consumer on the desired bucket, so the fleet's per-node streams get
    FLEET_MAX_CONSUMERS: 1,500 watches are made. A fleet made before gets the limit from the
    coordinator's next ensure_fleet, not from a tool's; an operator's own limit stays."""
    bus = await Bus.connect(broker.url, "t")
    try:
        old = await Bus.connect(broker.url, "u")
        try:
            await old.js.create_key_value(bucket="fw-u-desired", history=1)
            assert await _consumers(old, "KV_fw-u-desired", 1001) == \
                ["maximum consumers limit reached"]  # the server's default cap, without ours
            await old.ensure_fleet()  # a tool's (release push): what exists stays, no update
            info = await old.js.stream_info("KV_fw-u-desired")  # (an operator may not ask one)
            assert info.config.max_consumers == -1
            await old.ensure_fleet(raise_existing=True)  # the coordinator's
            info = await old.js.stream_info("KV_fw-u-desired")
            assert info.config.max_consumers == FLEET_MAX_CONSUMERS
        finally:
            await old.close()
        await bus.ensure_fleet()
        for stream in ("KV_fw-t-desired", "OBJ_fw-t-releases"):
            assert (await bus.js.stream_info(stream)).config.max_consumers == FLEET_MAX_CONSUMERS
        assert await _consumers(bus, "KV_fw-t-desired", 1500) == []
        chosen = (await bus.js.stream_info("OBJ_fw-t-releases")).config
        chosen.max_consumers = 300_000
        await bus.js.update_stream(chosen)
        await bus.ensure_fleet(raise_existing=True)
        assert (await bus.js.stream_info("OBJ_fw-t-releases")).config.max_consumers == 300_000
    finally:
        await bus.close()


async def test_snapshots_leave_no_consumers_piling_up(broker: Broker) -> None:
    """Every snapshot (``kv_entries``: what the ``nodes`` verb's cordons read is, a request)
    reads through a consumer. They must not outlive it for minutes: a stream takes 1,000
    consumers (nats-server 2.15's default), and a coordinator polled for ``nodes`` ran out
    ('maximum consumers limit reached'). After 1,200 snapshots of a bucket, one more is read."""
    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        await bus.kv_put("fw-t-cordons", "n1", b"1")
        for _ in range(12):
            await asyncio.gather(*(bus.kv_entries("fw-t-cordons") for _ in range(100)))
            await asyncio.sleep(SNAPSHOT_INACTIVE / 4)  # (a poller's pace: the server reaps)
        assert [e.key for e in await bus.kv_entries("fw-t-cordons")] == ["n1"]
    finally:
        await bus.close()


async def test_a_fleet_set_up_meanwhile_by_another_client_is_taken_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two clients setting a new fleet up at once (two release pushes, a coordinator starting
    beside a tool): both read its streams as missing, the other made them first and set their
    limits, so this one's creates meet streams of another config (10058). That is the fleet
    it wanted: set up, no error (it failed one concurrent push in a CI run: "stream name
    already in use with a different configuration")."""
    async with Broker(store_dir=tmp_path / "js") as broker:
        other = await Bus.connect(broker.url, "t")
        bus = await Bus.connect(broker.url, "t")
        try:
            await other.ensure_fleet()

            async def read_before_the_other_made_them(name: str) -> None:
                return None

            monkeypatch.setattr(bus, "_stream_config", read_before_the_other_made_them)
            setup = await bus.ensure_fleet()
            assert setup.replicas == 1
            await bus.kv_put("fw-t-desired", "n1.web", b"1")  # and the fleet works
            # A coordinator that lost the race to a tool reads what the tool made and brings
            # it up as it asks (here its events' limits), as it would have found it made.
            real = Bus._stream_config.__get__(bus)
            reads = 0

            async def missing_in_the_first_pass(name: str) -> Any:
                nonlocal reads
                reads += 1
                return None if reads <= len(bus.fleet_streams()) else await real(name)

            monkeypatch.setattr(bus, "_stream_config", missing_in_the_first_pass)
            await bus.ensure_fleet(raise_existing=True,
                                   events=EventsLimits(max_age=3600.0, max_bytes=2**30))
            assert reads == 2 * len(bus.fleet_streams())  # read again after the first pass
            info = await other.js.stream_info("FW_t_EVENTS")
            assert (info.config.max_age, info.config.max_bytes) == (3600.0, 2**30)
        finally:
            await bus.close()
            await other.close()


async def test_a_flush_that_timed_out_leaves_the_connection_whole(tmp_path: Path) -> None:
    """A flush whose PONG comes after its timeout (a server that stalled a moment): nats-py
    kept the PING's future, cancelled, in its queue, and the late PONG broke its read loop
    (InvalidStateError), which reconnected the client. The connection now stays as it was and
    the next flush is answered."""
    import os
    import signal

    async with Broker(store_dir=tmp_path / "js") as broker:
        bus = await Bus.connect(broker.url, "t")
        try:
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGSTOP)
            await _stopped(broker.pid)  # every thread: a running one could still answer a PING
            try:
                with pytest.raises(NotReachable, match="did not confirm a flush"):
                    await bus.flush(0.5)
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            # Its PONG follows the late one, so that one has been read (a broken read loop
            # answers no flush at all).
            await bus.flush(5.0)
            assert bus.reconnects == 0 and bus.connected
            await bus.flush(5.0)
        finally:
            await bus.close()


async def _stopped(pid: int) -> None:
    """Wait until every thread of process ``pid`` is stopped (SIGSTOP is taken by each thread
    as it next runs; kill() returns before)."""
    def states() -> set[str]:
        out = set()
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out.add(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue
        return out

    from tests.integration.procs import wait_until

    await wait_until(lambda: asyncio.to_thread(states), lambda got: got <= {"T", "t"},
                     timeout=10, what=f"every thread of {pid} stopped", interval=0.01)


async def test_a_watch_whose_bucket_lookup_fails_backs_off_and_starts_later(
    broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A watch whose bucket's info goes unanswered (a server that cannot keep up: at a fleet's
    cold start the info requests of 20,000 watches at once overflowed its API queue, which
    drops every request it holds) counts a failed start and tries again after its backoff,
    drawn within its spread; before, the BusError ended the watch (half of 20,000 never
    started). A missing bucket still ends it (the agent waits for a coordinator)."""
    import protocol.bus as bus_mod

    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        real = bus._bucket
        failing = [2]

        async def unanswered(bucket: str) -> Any:
            if failing[0]:
                failing[0] -= 1
                raise BusError(f"cannot open bucket {bucket}: nats: timeout")
            return await real(bucket)

        delays: list[tuple[int, float]] = []
        real_delay = bus_mod.retry_delay

        def recorded(failures: int, spread: float = 0.0) -> float:
            delays.append((failures, spread))
            return min(0.05, real_delay(failures, spread))

        await bus.kv_put("fw-t-desired", "n1.web", b"1")
        bus._kv.clear()  # looked up again by the watch
        monkeypatch.setattr(bus, "_bucket", unanswered)
        monkeypatch.setattr(bus_mod, "retry_delay", recorded)
        seen, task = _followed(bus.watch("fw-t-desired", "n1.*", spread=lambda: 40.0))
        try:
            await _expect(seen, b"1")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert delays == [(1, 40.0), (2, 40.0)] and failing == [0]

        async def missing(bucket: str) -> Any:
            raise bus_mod.MissingBucket(f"bucket {bucket} does not exist")

        monkeypatch.setattr(bus, "_bucket", missing)
        with pytest.raises(bus_mod.MissingBucket):
            async with asyncio.timeout(10):
                async for _ in bus.watch("fw-t-desired", "n1.*", spread=lambda: 40.0):
                    pass
    finally:
        await bus.close()


async def _first_read(bus: Bus, spread: float) -> float:
    """Seconds from a fleet's watch (``spread``) being asked to its first full read."""
    began = time.monotonic()
    async with asyncio.timeout(30):
        async for e in bus.watch("fw-t-desired", "n1.*", spread=lambda: spread):
            if e is None:
                return time.monotonic() - began
    raise AssertionError("the watch ended")


async def test_a_client_that_waited_for_its_server_starts_a_fleets_watch_within_its_spread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent whose first connect waited for the server (the broker down at its start: a
    power cut, where the whole fleet waits with it) starts its fleet's watch at a moment
    drawn within the spread, as after a reconnect; one that found its server at once starts
    its watch at once (one agent restarted on a healthy fleet)."""
    import protocol.bus as bus_mod

    monkeypatch.setattr(bus_mod.random, "uniform", lambda a, b: b)  # the spread's end
    port = free_port("127.0.0.1")
    broker = Broker(store_dir=tmp_path / "js", port=port)
    connecting = asyncio.create_task(
        Bus.connect(f"nats://127.0.0.1:{port}", "t", connect_deadline=30))
    # The server's absence is the scenario: it comes up after the agent began connecting.
    await asyncio.sleep(2 * bus_mod.WAITED_FOR_SERVER)
    await broker.start()
    waited = await connecting
    prompt = await Bus.connect(broker.url, "t")
    try:
        assert waited.waited and not prompt.waited
        await prompt.ensure_fleet()
        await prompt.kv_put("fw-t-desired", "n1.web", b"1")
        spread = 3.0
        at_once, spread_out = await asyncio.gather(_first_read(prompt, spread),
                                                   _first_read(waited, spread))
        assert at_once < spread <= spread_out, (at_once, spread_out)
    finally:
        await waited.close()
        await prompt.close()
        await broker.stop()


async def test_a_client_told_its_fleet_starts_at_once_starts_a_fleets_watch_within_its_spread(
    broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``crowded`` (an agent that heard the leader's pace say many agents register at once)
    starts its fleet's watch at a moment drawn within the spread, as ``waited`` does; a client
    not told so starts at once."""
    import protocol.bus as bus_mod

    monkeypatch.setattr(bus_mod.random, "uniform", lambda a, b: b)  # the spread's end
    crowded = await Bus.connect(broker.url, "t")
    prompt = await Bus.connect(broker.url, "t")
    try:
        crowded.crowded = True
        await prompt.ensure_fleet()
        await prompt.kv_put("fw-t-desired", "n1.web", b"1")
        spread = 3.0
        at_once, spread_out = await asyncio.gather(_first_read(prompt, spread),
                                                   _first_read(crowded, spread))
        assert at_once < spread <= spread_out, (at_once, spread_out)
    finally:
        await crowded.close()
        await prompt.close()


async def test_an_agent_binds_its_buckets_without_asking_their_info(broker: Broker) -> None:
    """An agent's bus is blind with or without credentials: its buckets are bound without a
    STREAM.INFO each (at a fleet's cold start, 20,000 of them at once overflowed the server's
    JetStream API queue, which then drops every request it holds); a tool's is not."""
    from agent.daemon import Agent, AgentOptions

    agent = Agent(AgentOptions(node_id="node-1", nats_url=broker.url, fleet="t"))
    bus = await agent._connect(asyncio.Event())
    tool = await Bus.connect(broker.url, "t")
    try:
        assert bus is not None and bus.blind and not tool.blind
    finally:
        if bus is not None:
            await bus.close()
        await tool.close()


async def test_a_slow_write_verb_holds_up_no_other_request(broker: Broker) -> None:
    """``serve`` (the coordinator's writing verbs, one queue group) answers each request in a
    task of its own, as ``respond`` does: a request behind a slow one (a standby forwarding to
    a frozen leader) is answered at once. nats.micro awaited each handler inline, and every
    request queued behind a slow one timed out."""
    server = await Bus.connect(broker.url, "t")
    client = await Bus.connect(broker.url, "t")
    release, held = asyncio.Event(), asyncio.Event()

    async def handler(_subject: str, data: bytes) -> bytes:
        if data == b"slow":
            held.set()
            await release.wait()
        return b"done " + data

    try:
        await server.serve("svc", "1.0.0", {"w": ("t.write", handler)})
        await server.flush()
        slow = asyncio.ensure_future(client.request("t.write", b"slow", timeout=10))
        async with asyncio.timeout(10):
            await held.wait()  # the slow one is in its handler
        assert await client.request("t.write", b"fast", timeout=2) == b"done fast"
        release.set()
        assert await slow == b"done slow"
    finally:
        release.set()
        await client.close()
        await server.close()


async def test_a_read_to_the_stream_end_that_stalls_is_not_taken_for_the_end(
        broker: Broker) -> None:
    """``stream_records`` without follow reads to the last message the stream held: the server
    stopped for 1 s mid-read (SIGSTOP), every message still comes (a read that took the first
    quiet half-second for the end returned 1,602 of 20,000, no error: ``events --last N``
    then showed older events as the last ones)."""
    import os
    import signal

    bus = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        n = 3000
        stored = await bus.js_publish_events(
            [(f"fw.t.evt.x.{i}", b"%06d" % i * 100) for i in range(n)])
        assert not any(stored)
        assert broker.pid is not None
        got = 0
        async for _subject, _data in bus.stream_records("FW_t_EVENTS", "fw.t.evt.>"):
            got += 1
            if got == 200:
                os.kill(broker.pid, signal.SIGSTOP)
                asyncio.get_running_loop().call_later(1.0, os.kill, broker.pid, signal.SIGCONT)
        assert got == n
        # and a filtered read ends once nothing more matches, not at the stream's end
        only = [d async for _s, d in bus.stream_records("FW_t_EVENTS", "fw.t.evt.x.7")]
        assert only == [b"000007" * 100]
    finally:
        await bus.close()


async def test_a_connection_closed_for_good_ends_the_watches_and_says_so(tmp_path: Path) -> None:
    """nats-py closes a client for good (it reconnects no more, even with reconnect_forever)
    on a server's -ERR it does not retry: here a message whose headers take it past
    max_payload. Every watch then raises BusError and ``gone`` is set for the owner (a
    daemon ends, its supervisor starts it again); before, a watch waited for ever and the log
    said "reconnecting"."""
    broker = Broker(store_dir=tmp_path / "js", max_payload="1MB")
    await broker.start()
    bus = await Bus.connect(broker.url, "t", reconnect_forever=True)
    try:
        await bus.ensure_fleet()

        async def read() -> None:
            async for _ in bus.watch("fw-t-desired", "n1.*"):
                pass

        from tests.integration.procs import wait_until

        watching = asyncio.ensure_future(read())
        await wait_until(lambda: asyncio.sleep(0, len(bus._watchers)), lambda n: n == 1,
                         timeout=10, what="the watch started")
        await bus.nc.publish("fw.t.x", b"x" * (bus.max_payload - 10), headers={"Pad": "p" * 200})
        async with asyncio.timeout(10):
            await bus.gone.wait()
            with pytest.raises(BusError, match="closed"):
                await watching
    finally:
        await bus.close()
        await broker.stop()


async def test_a_daemon_waiting_for_its_first_connect_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """A daemon's first connect (reconnect_forever: retried for ever) says once at once that it
    waits for NATS and where, not every retry; before, an agent given a wrong URL or started
    before its broker said nothing at all."""
    port = free_port("127.0.0.1")
    caplog.set_level("WARNING", logger="fleetwave.bus")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2.5):
            await Bus.connect(f"nats://127.0.0.1:{port}", "t", connect_deadline=3600,
                              reconnect_forever=True)
    said = [r.getMessage() for r in caplog.records if "waiting for NATS" in r.getMessage()]
    assert len(said) == 1 and f"127.0.0.1:{port}" in said[0], said


async def test_a_read_loop_that_stops_while_connected_is_reconnected_at_once(
    broker: Broker, caplog: pytest.LogCaptureFixture,
) -> None:
    """nats-py ends its read loop, without a reconnect, on an exception it does not expect
    (nats.py PR #914: "read() called while another coroutine is already waiting..."): the
    client stays connected and hears nothing until its pings run out (about 20 s). The bus
    notices the loop ended while connected, reconnects at once and says so; messages arrive
    again on the subscriptions it had."""
    bus = await Bus.connect(broker.url, "t")
    sender = await Bus.connect(broker.url, "t")
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def heard(msg: Any) -> None:
        await got.put(msg.data)

    try:
        await bus.nc.subscribe("t.heard", cb=heard)
        await bus.flush()
        parser = bus.nc._ps
        parse = parser.parse

        async def broken(data: bytes) -> None:
            parser.parse = parse  # once
            raise RuntimeError("read() called while another coroutine is already waiting "
                               "for incoming data")

        reconnected = asyncio.Event()
        was = bus._reconnected

        def on_reconnect() -> None:
            was()
            reconnected.set()

        bus._reconnected = on_reconnect  # type: ignore[method-assign]
        parser.parse = broken
        await sender.nc.publish("t.heard", b"lost with the read that failed")
        await sender.flush()
        async with asyncio.timeout(10):  # (without the bus's guard: ~20 s, the pings' limit)
            await reconnected.wait()
        assert bus.revived == 1 and bus.connected
        assert "stopped reading while connected" in caplog.text
        await sender.nc.publish("t.heard", b"after")
        await sender.flush()
        async with asyncio.timeout(10):
            assert await got.get() == b"after"
    finally:
        await bus.close()
        await sender.close()


async def test_a_consumer_delivering_onto_a_subscribed_subject_reaches_no_handler(
    broker: Broker,
) -> None:
    """A push consumer's deliver subject is not permission-checked: one made by a client that
    may read a stream delivers its messages onto any subject of the account, keeping the
    subject each was stored under. A review delivered release bytes onto the pace every agent
    obeys, and a release-index value an operator wrote onto the coordinator's
    ``node.forgotten`` (the events stream stored it; the dashboard showed it as the
    coordinator's event). A subscription hands on only what was published on its subject; the
    events' readers refuse what the stream stored under another subject."""
    from protocol import subjects
    from protocol.codec import encode
    from protocol.events import received
    from protocol.messages import Event
    from tests.integration.procs import wait_until

    bus = await Bus.connect(broker.url, "t")
    rogue = await Bus.connect(broker.url, "t")
    heard: list[tuple[str, bytes]] = []
    got = asyncio.Event()

    async def on(subject: str, data: bytes) -> None:
        heard.append((subject, data))
        got.set()

    try:
        await bus.ensure_fleet()
        forged = encode(Event(id="f" * 32, time=time.time(), fleet="t", kind="node.forgotten",
                              node="n1", who="bob", message="FORGED"))
        index = subjects.release_index_bucket("t")
        await rogue.kv_put(index, "zz", forged)
        await bus.subscribe(subjects.pace("t"), on)
        await bus.subscribe(subjects.event("t", "node.forgotten"), on)
        await bus.flush()
        jsm = JetStreamManager(rogue.nc)
        for target in (subjects.pace("t"), subjects.event("t", "node.forgotten")):
            await jsm.add_consumer(subjects.kv_stream(index), deliver_subject=target,
                                   filter_subject=f"$KV.{index}.zz")
        await rogue.flush()
        # Delivered meanwhile (and dropped); a real publish on each subject comes after them.
        async def dropped() -> int:
            return bus.astray

        await wait_until(dropped, lambda n: n >= 2, timeout=10, what="both deliveries dropped")
        await rogue.publish(subjects.pace("t"), b"real")
        async with asyncio.timeout(10):
            await got.wait()
        assert heard == [(subjects.pace("t"), b"real")]
        # The events stream stored the delivery under the release index's subject: refused.
        stored = await rogue.js.get_last_msg(subjects.events_stream("t"), f"$KV.{index}.zz")
        with pytest.raises(ProtocolError, match="not an events subject"):
            received("t", stored.subject, stored.data)
    finally:
        await bus.close()
        await rogue.close()


async def test_a_watch_whose_consumer_is_re_pointed_starts_again(
    broker: Broker, caplog: pytest.LogCaptureFixture,
) -> None:
    """Anyone with JetStream rights over the stream can update a consumer by name (a create with
    its name: the filter in the subject, the rest in the body): a review re-pointed the
    coordinator's watch of the observed states at no key, and every rollout failed waiting for
    reports. The watchdog sees the filter is no longer the watch's and starts a new watch."""
    bus = await Bus.connect(broker.url, "t")
    rogue = await Bus.connect(broker.url, "t")
    try:
        await bus.ensure_fleet()
        seen, task = _followed(bus.watch("fw-t-observed", "n1.*", verify=0.2))
        await rogue.kv_put("fw-t-observed", "n1.web", b"1")
        await _expect(seen, b"1")
        stream = "KV_fw-t-observed"
        ((name, _),) = await rogue.push_consumers(stream)
        jsm = JetStreamManager(rogue.nc)
        info = await jsm.consumer_info(stream, name)
        config = info.config
        config.filter_subject = "$KV.fw-t-observed.nobody.*"
        await jsm.add_consumer(stream, config)  # an update: the same name, another filter
        assert (await jsm.consumer_info(stream, name)).config.filter_subject.endswith("nobody.*")
        await rogue.kv_put("fw-t-observed", "n1.web", b"2")
        await _expect(seen, b"2")  # (from the new watch's full read, or its updates)
        assert "was changed on the server" in caplog.text
        assert bus.lost_watches >= 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await bus.close()
        await rogue.close()


@pytest.mark.parametrize("how", ["--tls-ca", "tls://"])
async def test_told_to_use_tls_a_client_sends_nothing_to_a_server_that_does_not_start_it(
    tmp_path: Path, how: str,
) -> None:
    """nats-py upgrades to TLS only when the server's INFO asks for it: an impostor (or a relay
    to the real broker) that does not got our CONNECT in clear, the nonce signature of our
    credentials with it (a review's ``fleetwave --tls-ca ca.pem nodes`` listed a plain server's
    nodes). Refused in one line before the CONNECT: the server's trace shows none."""
    import datetime as dt

    from coordinator.auth.pki import make_ca
    from protocol.errors import AccessDenied

    ca = tmp_path / "ca.pem"
    ca.write_bytes(make_ca("t", dt.datetime.now(dt.UTC)).cert)
    log = tmp_path / "trace.log"
    async with tracing_server(log) as port:
        plain = await Bus.connect(f"nats://127.0.0.1:{port}", "t")  # up, and it traces
        await plain.close()
        before = log.read_text().count("CONNECT")
        url = f"tls://127.0.0.1:{port}" if how == "tls://" else f"nats://127.0.0.1:{port}"
        with pytest.raises(AccessDenied, match="does not speak TLS"):
            await Bus.connect(url, "t", connect_deadline=3.0,
                              tls_ca=str(ca) if how == "--tls-ca" else None)
        assert log.read_text().count("CONNECT") == before
