"""The daemon's node table is judged only on what the coordinator could hear: silence after the
last answer the bus gave it (this host cut off, its connection still looking open) is not the
nodes'."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from types import SimpleNamespace

import msgspec
import pytest

from coordinator.core.lines import BURST, WINDOW
from coordinator.runtime.daemon import GC_THRESHOLDS, Coordinator, tune_gc
from coordinator.runtime.runner import STARTUP_GRACE
from protocol import subjects
from protocol.codec import decode, encode
from protocol.errors import BusError
from protocol.messages import (
    ApiReply,
    Cordon,
    Event,
    Heartbeat,
    NodeInfo,
    NodesRequest,
    Pace,
)
from protocol.testing import FakeBus, FakeClock


def coordinator(wall: FakeClock, heard_ago: float) -> Coordinator:
    c = Coordinator("nats://127.0.0.1:4222", "default", clock=wall)
    c.lease = SimpleNamespace(heard=time.monotonic() - heard_ago,  # type: ignore[assignment]
                              leader=None)
    return c


async def beat(c: Coordinator, node: str) -> None:
    await c._on_heartbeat(f"fw.default.hb.{node}",
                          encode(Heartbeat(node=node, time=c._clock(), interval=0.5)))


async def test_nodes_silent_only_since_the_bus_last_answered_stay_online() -> None:
    """Cut off 5 s ago (no lease call answered since), a node that beat 4 s ago is not
    judged offline: 4 s ago the coordinator was already deaf."""
    wall = FakeClock()
    c = coordinator(wall, heard_ago=5.0)
    wall.t -= 4.0
    await beat(c, "node-1")
    wall.t += 4.0
    assert c._heard_until() <= wall.t - 5.0
    assert c.table.tick(c._heard_until()) == []
    assert c.table.view()[0].online


async def test_nodes_silent_while_the_bus_answered_go_offline() -> None:
    """Heard a moment ago, a node silent for 4 s (8 beats of 0.5 s) is offline."""
    wall = FakeClock()
    c = coordinator(wall, heard_ago=0.0)
    wall.t -= 4.0
    await beat(c, "node-1")
    wall.t += 4.0
    [went] = c.table.tick(c._heard_until())
    assert went.kind == "node.offline" and went.node == "node-1"


async def test_only_the_leader_records_node_events() -> None:
    """Every coordinator sees the same heartbeats; a standby's node events would be copies in
    the audit log. Before any leader is known (at the start) they are recorded."""
    wall = FakeClock()
    c = coordinator(wall, heard_ago=0.0)
    await beat(c, "node-1")
    assert [e.kind for e in c.events.pending()] == ["node.online"]
    c.lease.leader = SimpleNamespace(holder="someone-else")  # type: ignore[union-attr]
    await beat(c, "node-2")
    assert c.events.pending() == []
    c.lease.leader = SimpleNamespace(holder=c.id)  # type: ignore[union-attr]
    await beat(c, "node-3")
    assert [e.node for e in c.events.pending()] == ["node-3"]


class Forwarded:
    """A bus that records the requests a standby forwards, and answers ok."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        self.sent.append((subject, data))
        return encode(ApiReply(ok=True))


async def not_here(subject: str, data: bytes) -> bytes:
    raise AssertionError("a standby carried out a write")


async def test_a_standby_forwards_a_write_naming_the_same_caller() -> None:
    """A write that reached a standby goes to the leader's own subject with the caller of the
    subject it came on, never the standby's identity nor a name from the body."""
    c = coordinator(FakeClock(), heard_ago=0.0)
    c.lease.leader = SimpleNamespace(holder="lead01", host="h", pid=1)  # type: ignore[union-attr]
    bus = Forwarded()
    handler = c._forwarding(bus, "pause", not_here)  # type: ignore[arg-type]
    body = b'{"id": "r1", "who": "mallory"}'
    assert decode(ApiReply, await handler("fw.default.api.alice.pause", body)).ok
    assert bus.sent == [("fw.default.coord.lead01.api.alice.pause", body)]


async def test_an_older_clis_write_is_refused_where_callers_are_proven() -> None:
    """With credentials (the server proves every caller), a write on an older CLI's subject,
    which names no caller, is refused with the fix; on an open bus it goes on as "unknown"."""
    c = coordinator(FakeClock(), heard_ago=0.0)
    c.lease.leader = SimpleNamespace(holder="lead01", host="h", pid=1)  # type: ignore[union-attr]
    bus = Forwarded()
    handler = c._forwarding(bus, "abort", not_here)  # type: ignore[arg-type]
    c.proven = True
    reply = decode(ApiReply, await handler("fw.default.api.abort", b"{}"))
    assert (reply.ok, reply.code) == (False, "usage") and "upgrade fleetwave" in reply.error
    assert bus.sent == []
    c.proven = False
    assert decode(ApiReply, await handler("fw.default.api.abort", b"{}")).ok
    assert bus.sent == [("fw.default.coord.lead01.api.unknown.abort", b"{}")]


async def test_nodes_shows_cordons_and_as_last_read_when_jetstream_is_away() -> None:
    """``nodes`` carries each node's cordon from the cordons bucket; with JetStream away it
    still answers from the node table, with the cordons as last read."""
    wall = FakeClock()
    c = coordinator(wall, heard_ago=0.0)
    await beat(c, "node-1")
    await beat(c, "node-2")
    bus = FakeBus(fleet="default")
    c.bus = bus  # type: ignore[assignment]
    cordon = Cordon(node="node-2", by="alice", time=1.0)
    bus.set("put", subjects.cordons_bucket("default"), "node-2", encode(cordon))
    rows = await c._nodes(NodesRequest(), "bob")
    assert [(r.id, r.cordon) for r in rows] == [("node-1", None), ("node-2", cordon)]
    bus.faults[("entries", subjects.cordons_bucket("default"))] = BusError("JetStream away")
    rows = await c._nodes(NodesRequest(), "bob")
    assert [(r.id, r.cordon) for r in rows] == [("node-1", None), ("node-2", cordon)]


async def test_a_just_started_coordinator_shows_nodes_it_has_not_heard_as_not_heard_yet() -> None:
    """Nodes known from the bucket are *not heard yet* for the startup grace (the runner's),
    not offline: a standby started a moment before showed a live fleet all offline."""
    wall = FakeClock()
    c = coordinator(wall, heard_ago=0.0)
    bus = FakeBus(fleet="default")
    for node in ("node-1", "node-2"):
        bus.set("put", subjects.nodes_bucket("default"), node, encode(NodeInfo(id=node)))
    wall.t += 60.0  # it waited a minute for its bus: the grace counts from when it hears
    await c._load_known(bus)  # type: ignore[arg-type]
    c._hearing()
    c.bus = bus  # type: ignore[assignment]
    wall.t += 3.0  # past the cold answer's wait, within the grace (STARTUP_GRACE)
    await beat(c, "node-1")
    page = await c._nodes(NodesRequest(max_nodes=5), "bob")
    assert isinstance(page, dict)
    assert (page["node_count"], page["online"], page["unheard"]) == (2, 1, 1)
    assert [(r.id, r.online, r.unheard) for r in page["nodes"]] == [
        ("node-1", True, False), ("node-2", False, True)]
    wall.t = c.started + STARTUP_GRACE
    c.table.tick(wall.t)
    assert [(r.online, r.unheard) for r in await c._nodes(NodesRequest(), "bob")] == [
        (False, False), (False, False)]  # node-1 beat 7 s before (every 0.5 s); node-2 never


async def test_the_leader_paces_the_nodes_that_beat_not_the_offline_ones() -> None:
    """Ten nodes known, four online: the pace is for four (every 2 s at 2 a second), not ten
    (every 5 s: each of the four judged offline 9 s later than it needs to be)."""
    wall = FakeClock()
    c = Coordinator("nats://127.0.0.1:4222", "default", clock=wall, heartbeat_rate=2.0)
    for i in range(1, 11):
        c.table.load(NodeInfo(id=f"node-{i}"))
    for i in range(1, 5):
        await c._on_heartbeat(f"fw.default.hb.node-{i}",
                              encode(Heartbeat(node=f"node-{i}", time=wall.t, interval=2.0)))
    published: list[tuple[str, bytes]] = []
    sent_one = asyncio.Event()

    class Bus:  # what the pace loop needs of the bus: a core publish
        async def publish(self, subject: str, data: bytes) -> None:
            published.append((subject, data))
            sent_one.set()

    loop = asyncio.create_task(c._pace_loop(Bus()))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            await sent_one.wait()
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    subject, data = published[0]
    sent = decode(Pace, data)
    assert subject == subjects.pace("default") and (sent.nodes, sent.interval) == (4, 2.0)


async def test_a_node_registering_while_the_pace_goes_out_is_told_by_the_next() -> None:
    """A registration that arrives while the pace is being published is a newcomer for the next
    pace, which goes out within a moment (HOLD and a look), not at the next REPEAT (30 s): the
    agent waits for its first pace before its first watch in a large fleet. Found by a review:
    the newcomers were cleared after the publish, that one with them."""
    wall = FakeClock()
    c = Coordinator("nats://127.0.0.1:4222", "default", clock=wall, heartbeat_rate=2.0)
    for node in ("node-1", "node-2"):  # node-2's agent restarts: it registers again
        c.table.load(NodeInfo(id=node))
        await c._on_heartbeat(f"fw.default.hb.{node}",
                              encode(Heartbeat(node=node, time=wall.t, interval=2.0)))
    published: list[bytes] = []
    sending, more = asyncio.Event(), asyncio.Event()
    release = asyncio.Event()

    class Bus:  # the first publish is held until a node has registered meanwhile
        async def publish(self, subject: str, data: bytes) -> None:
            published.append(data)
            if len(published) == 1:
                sending.set()
                await release.wait()
            else:
                more.set()

    loop = asyncio.create_task(c._pace_loop(Bus()))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            await sending.wait()
        await c._on_register(subjects.register("default", "node-2"),
                             encode(NodeInfo(id="node-2")))
        release.set()
        async with asyncio.timeout(5):
            await more.wait()
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert len(published) == 2


async def test_every_coordinator_drops_a_node_the_leader_forgot() -> None:
    """A standby hears node.forgotten and drops the (offline) node from its table; a malformed
    event is a complaint, nothing dropped; a node online again (its agent came back) stays."""
    wall = FakeClock()
    c = coordinator(wall, heard_ago=0.0)
    await beat(c, "node-1")
    await beat(c, "node-2")
    wall.t += 2.0
    c.table.tick(wall.t)  # both offline
    await beat(c, "node-1")  # node-1 is back
    subject = subjects.event("default", "node.forgotten")
    await c._on_forgotten(subject, b"not an event")
    assert [v.id for v in c.table.view()] == ["node-1", "node-2"] and c.malformed == 1
    event = Event(id="e1", time=wall.t, fleet="default", kind="node.forgotten",
                  message="node-2 forgotten by bob", node="node-2", who="bob")
    await c._on_forgotten(subject, encode(event))
    assert [v.id for v in c.table.view()] == ["node-1"]
    back = msgspec.structs.replace(event, id="e2", node="node-1")
    await c._on_forgotten(subject, encode(back))
    assert [v.id for v in c.table.view()] == ["node-1"]


def test_a_coordinator_process_collects_garbage_at_its_own_thresholds() -> None:
    """``tune_gc`` (called by ``fleetwave coordinator`` before its loop starts) sets
    GC_THRESHOLDS: full collections of a fleet-sized heap were 10 % of a rollout's CPU."""
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0] or before == GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)


async def online_at_once(caplog: pytest.LogCaptureFixture, n: int,
                         level: int) -> tuple[Coordinator, FakeClock]:
    """A coordinator whose bursts run in virtual time (moved by the clock returned), its log
    captured from ``level``, that has just heard ``n`` nodes beat for the first time."""
    mono = FakeClock()
    c = coordinator(FakeClock(), heard_ago=0.0)
    c._mono = mono
    caplog.set_level(level, logger="fleetwave.coordinator")
    for i in range(n):
        await beat(c, f"node-{i}")
    return c, mono


def lines_said(caplog: pytest.LogCaptureFixture, part: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and part in r.getMessage()]


async def test_a_fleet_coming_online_at_once_logs_a_burst_and_one_line_for_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 nodes online at once: every one is an event (the audit log), the first BURST are
    log lines, and the ticker's turn after the window closed says how many more there were."""
    c, mono = await online_at_once(caplog, 200, logging.DEBUG)
    assert len(c.events.pending()) == 200
    assert len(lines_said(caplog, "is online")) == BURST
    assert sum("is online" in r.getMessage() for r in caplog.records) == 200  # the rest: DEBUG
    c._say_bursts()
    assert lines_said(caplog, "more nodes came online") == []  # its window is still open
    mono.t += WINDOW
    c._say_bursts()
    [said] = lines_said(caplog, "more nodes came online")
    assert said.startswith(f"{200 - BURST} more nodes came online in 5s"), said
    c._say_bursts()
    assert len(lines_said(caplog, "more nodes came online")) == 1  # said once


async def test_registrations_of_online_nodes_come_in_bursts_and_a_stop_says_what_is_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Agents re-register on every reconnect (a broker's restart: the whole fleet at once):
    a node already online logs "registered" in bursts; a coordinator that stops says what it
    still held back, its window open or not."""
    c, _ = await online_at_once(caplog, 50, logging.INFO)
    for i in range(50):
        await c._on_register(subjects.register("default", f"node-{i}"),
                             encode(NodeInfo(id=f"node-{i}")))
    assert len(lines_said(caplog, "registered (labels")) == BURST
    c._say_bursts(stopping=True)
    said = lines_said(caplog, " more ")
    assert any(s.startswith(f"{50 - BURST} more online nodes registered again") for s in said)
    assert any(s.startswith(f"{50 - BURST} more nodes came online") for s in said)


async def test_the_leader_names_the_services_its_running_rollouts_read() -> None:
    """``_reading``: None until the runner resumed its rollouts (a leader that has just taken
    over names none, so agents keep the last leader's word); then the services of running
    rollouts that read counters, not paused ones, not those without a bake. Every rollout
    event wakes the pace loop (``_observe``) and reaches the --http hook."""
    from coordinator.core.engine import Rollout, new_record
    from protocol.messages import Event, Gates, NodeView
    from protocol.testing import FLEET, NEW, spec

    def driver(service: str, state: str, **fields: object) -> SimpleNamespace:
        rec = new_record(id=f"r-{service}", spec=spec(service=service, **fields),  # type: ignore[arg-type]
                         release=msgspec.structs.replace(NEW, service=service),
                         nodes=[NodeView(id="node-1")], current={}, now=0.0)
        rec.state = state  # type: ignore[assignment]
        return SimpleNamespace(rollout=Rollout(rec, fleet=FLEET))

    c = Coordinator("nats://127.0.0.1:4222", "default", clock=FakeClock(1000.0))
    assert c._reading() is None  # not leading
    ready = asyncio.Event()
    c.runner = SimpleNamespace(ready=ready, drivers={  # type: ignore[assignment]
        "1": driver("web", "running", bake=30.0), "2": driver("api", "paused", bake=30.0),
        "3": driver("db", "running"), "4": driver("ui", "running",
                                                    gates=Gates(analysis="sequential"))})
    assert c._reading() is None  # still resuming its rollouts
    ready.set()
    assert sorted(c._reading() or []) == ["ui", "web"]
    told: list[str] = []
    c.on_event = lambda event, record: told.append(event.kind)
    c._observe(Event(id="1", time=1.0, kind="node.online", fleet="default"), None)
    assert not c._repace.is_set()
    c._observe(Event(id="2", time=2.0, kind="rollout.started", fleet="default"), None)
    assert c._repace.is_set() and told == ["node.online", "rollout.started"]


async def test_a_node_cannot_make_the_coordinators_decode_without_bound(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Every coordinator hears every heartbeat: a review's node sent 1 MB ones as fast as it
    could and the server cut the coordinator off as a slow consumer. A heartbeat over
    HEARTBEAT_MAX, or sooner than HEARTBEAT_MIN_GAP after the node's last, is dropped before it
    is decoded; junk from names the sender chooses is named once each up to COMPLAINED_MOST,
    then counted."""
    from coordinator.runtime import daemon as daemon_mod

    decoded: list[int] = []
    real = daemon_mod.decode

    def counting(tp: type, data: bytes) -> object:
        decoded.append(len(data))
        return real(tp, data)

    monkeypatch.setattr(daemon_mod, "decode", counting)
    wall = FakeClock()
    c = coordinator(wall, heard_ago=0.0)
    big = Heartbeat(node="node-1", time=wall.t, labels={"x": "y" * daemon_mod.HEARTBEAT_MAX})
    await c._on_heartbeat("fw.default.hb.node-1", encode(big))
    assert decoded == [] and c.malformed == 1 and not c.table.view()
    wall.t += 1.0
    await beat(c, "node-1")
    await beat(c, "node-1")  # at once: too soon
    assert len(decoded) == 1 and c.malformed == 2 and c.heartbeats == 1
    wall.t += 1.0
    await beat(c, "node-1")
    assert len(decoded) == 2 and c.heartbeats == 2
    monkeypatch.setattr(daemon_mod, "COMPLAINED_MOST", 5)
    for i in range(50):
        await c._on_heartbeat(f"fw.default.hb.x{i}", b"junk")
    assert caplog.text.count("ignored malformed heartbeat") == 5
    assert "malformed messages in all so far" in caplog.text
