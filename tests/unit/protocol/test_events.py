"""The event publisher: one queue, one retry policy, for the coordinator and the agent alike."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import msgspec
import pytest

from protocol import subjects
from protocol.codec import decode, encode
from protocol.errors import BusError, ProtocolError
from protocol.events import (
    EVENT_ATTEMPTS,
    PACK,
    PUBLISH_TIMEOUT,
    EventPublisher,
    pack,
    received,
    received_all,
    unpacked,
)
from protocol.messages import Event
from protocol.testing import FLEET, PUBLISH, FakeBus, FakeClock


def event(i: int, *, rollout: str = "r1", node: str = "") -> Event:
    return Event(id=f"e{i}", time=float(i), fleet=FLEET, kind="node.done", message=f"m{i}",
                 node=node, rollout=rollout)


async def test_events_are_published_in_order_on_their_subjects(fake_bus: FakeBus) -> None:
    """Everything queued goes out in queue order, each on fw.<fleet>.evt.<kind>."""
    bus, pub = fake_bus, EventPublisher(FLEET)
    for i in range(3):
        pub.put(event(i))
    await pub.publish(bus, pub.pending(expand=False))
    assert [s for s, _ in bus.published] == [subjects.event(FLEET, "node.done")] * 3
    assert [decode(Event, d).id for _, d in bus.published] == ["e0", "e1", "e2"]


async def test_an_agents_events_go_on_subjects_naming_each_events_node(
    fake_bus: FakeBus,
) -> None:
    """With agent=True each event goes on fw.<fleet>.evt.agent.<node>.<kind> (the simulated
    agent publishes for many nodes through one publisher)."""
    pub = EventPublisher(FLEET, agent=True)
    await pub.publish(fake_bus, [event(1, node="node-1"), event(2, node="node-2")])
    assert [s for s, _ in fake_bus.published] == [
        f"fw.{FLEET}.evt.agent.node-1.node.done", f"fw.{FLEET}.evt.agent.node-2.node.done"]
    assert subjects.agent_event_node(FLEET, fake_bus.published[1][0]) == "node-2"
    assert subjects.agent_event_node(FLEET, subjects.event(FLEET, "rollout.started")) is None


def test_a_reader_refuses_an_event_naming_another_node_than_its_subject() -> None:
    """received: an event on node-1's subject that names node-2 is a forgery; the same event
    on node-2's subject, or a coordinator's event naming any node, is accepted."""
    crashed = msgspec.structs.replace(event(1, node="node-2"), kind="slot.crashed")
    forged = encode(crashed)
    with pytest.raises(ProtocolError, match="subject names node 'node-2'"):
        received(FLEET, subjects.agent_event(FLEET, "node-1", "slot.crashed"), forged)
    assert received(FLEET, subjects.agent_event(FLEET, "node-2", "slot.crashed"), forged).id == "e1"
    assert received(FLEET, subjects.event(FLEET, "slot.crashed"), forged).node == "node-2"


@pytest.mark.parametrize("kind", ["gate.failed", "rollout.succeeded", "wave.passed",
                                  "node.done", "bluegreen.switched_back"])
def test_a_reader_refuses_a_coordinators_kind_on_a_nodes_subject(kind: str) -> None:
    """A node's credentials may publish any body on its own subject: a gate verdict or a
    rollout's end there is a forgery (a node's gate.failed drew invented error rates on the
    dashboard's chart), refused; an agent's own kinds pass."""
    on_node = subjects.agent_event(FLEET, "node-1", kind)
    forged = msgspec.structs.replace(event(1, node="node-1"), kind=kind)
    with pytest.raises(ProtocolError, match="an agent reports only"):
        received(FLEET, on_node, encode(forged))
    assert received(FLEET, subjects.event(FLEET, kind), encode(forged)).kind == kind
    for own in ("slot.started", "router.closing", "release.failed", "agent.refused"):
        mine = msgspec.structs.replace(forged, kind=own)
        assert received(FLEET, subjects.agent_event(FLEET, "node-1", own), encode(mine)).kind == own


def test_a_reader_refuses_a_who_on_a_nodes_subject() -> None:
    """Who asked is the coordinator's to say (from the subject the server let an operator's
    request through): a node's event claiming an operator is refused."""
    claimed = Event(id="e1", time=1.0, fleet=FLEET, kind="slot.crashed", node="node-1",
                    who="alice")
    with pytest.raises(ProtocolError, match="asked by 'alice'"):
        received(FLEET, subjects.agent_event(FLEET, "node-1", "slot.crashed"), encode(claimed))


def test_a_pack_carries_node_events_whole_and_readers_get_each_back() -> None:
    """A pack says the fields its members share once; a reader gets every member back as the
    Event it was (id, time, kind, node, message, data, who), in order, on the pack's subject."""
    rid = "hello-20261204-095000-7d9a"
    members = [Event(id=f"e{i}", time=5.0 + (i == 2), fleet=FLEET, kind=k, message=f"m{i}",
                     node=f"node-{i}", service="hello", rollout=rid, data={"slot": "b"},
                     who="alice" if i == 1 else "coordinator")
               for i, k in enumerate(["node.updating", "node.staging", "node.done"])]
    packed = pack(members)
    assert packed.kind == PACK and packed.node == "node-0" and packed.rollout == rid
    assert unpacked(packed) == members
    wire = encode(packed)
    assert received_all(FLEET, subjects.event(FLEET, PACK), wire) == members
    assert len(wire) < sum(len(encode(m)) for m in members)
    lone = event(7)
    assert received_all(FLEET, subjects.event(FLEET, "node.done"), encode(lone)) == [lone]


def test_a_pack_on_a_nodes_subject_or_a_malformed_one_is_refused() -> None:
    """Only the coordinator packs: a pack on a node's own subject could name other nodes; a pack
    whose members are not node events, or not events at all, is refused in one line."""
    packed = pack([event(1, node="node-1"), event(2, node="node-2")])
    with pytest.raises(ProtocolError, match="only the coordinator packs"):
        received_all(FLEET, subjects.agent_event(FLEET, "node-1", PACK), encode(packed))
    for bad in ([{"id": "x", "time": 1.0, "kind": "rollout.succeeded", "node": "n"}],
                [{"id": "x", "time": 1.0, "kind": PACK, "node": "n"}], [{"id": "x"}], [], 5):
        forged = Event(id="p", time=1.0, fleet=FLEET, kind=PACK, data={"events": bad})
        with pytest.raises(ProtocolError, match="invalid event pack p"):
            received_all(FLEET, subjects.event(FLEET, PACK), encode(forged))


async def test_a_failed_publication_is_retried_until_it_is_stored() -> None:
    """Events not stored are published again, up to EVENT_ATTEMPTS times in all."""
    bus, pub = FakeBus(), EventPublisher(FLEET, sleep=Sleeps(FakeClock()))
    bus.faults[(PUBLISH, PUBLISH)] = BusError("JetStream away")
    bus.fault_count[(PUBLISH, PUBLISH)] = EVENT_ATTEMPTS - 1
    await pub.publish(bus, [event(1)])
    assert [decode(Event, d).id for _, d in bus.published] == ["e1"]


async def test_an_event_that_is_never_stored_is_logged_and_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After EVENT_ATTEMPTS the event is dropped with an error naming it; nothing raises."""
    bus, pub = FakeBus(), EventPublisher(FLEET, sleep=Sleeps(FakeClock()))
    bus.faults[(PUBLISH, PUBLISH)] = BusError("JetStream away")
    bus.fault_count[(PUBLISH, PUBLISH)] = EVENT_ATTEMPTS
    with caplog.at_level(logging.ERROR):
        await pub.publish(bus, [event(1, rollout="", node="node-3")])
    assert bus.published == []
    assert "event node.done of node-3 not recorded: JetStream away" in caplog.text


def test_a_full_queue_drops_its_oldest_event(caplog: pytest.LogCaptureFixture) -> None:
    """Producers never wait: a full queue makes room by dropping (and logging) its oldest."""
    pub = EventPublisher(FLEET, queue=2)
    with caplog.at_level(logging.ERROR):
        for i in range(3):
            pub.put(event(i))
    assert [e.id for e in pub.pending()] == ["e1", "e2"]
    assert "dropped 1, oldest first (1 node.done; the last node.done of rollout r1)" in caplog.text


async def test_run_publishes_what_is_queued_while_it_runs() -> None:
    """The publisher task takes events as they come, batching what waits."""
    bus, pub = FakeBus(), EventPublisher(FLEET)
    task = asyncio.create_task(pub.run(bus))
    for i in range(5):
        pub.put(event(i))
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [decode(Event, d).id for _, d in bus.published] == [f"e{i}" for i in range(5)]


# -- the one retry policy, in virtual time ---------------------------------------------------------


class Sleeps:
    """The publisher's ``sleep``: records each delay and moves a FakeClock instead of waiting."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.clock.t += delay


class ScriptedSink:
    """A sink that fails the messages ``fail(attempt, subject_index)`` says, and records calls."""

    def __init__(self, fail: Callable[[int, int], BusError | None] = lambda a, i: None, *,
                 raises: BusError | None = None, hang: bool = False) -> None:
        self.fail = fail
        self.raises = raises
        self.hang = hang
        self.calls: list[tuple[list[str], float]] = []  # (event ids, timeout) per publication
        self.stored: list[str] = []

    async def js_publish_events(self, messages: Sequence[tuple[str, bytes]], *,
                                timeout: float = 5.0) -> list[BusError | None]:
        attempt = len(self.calls)
        ids = [decode(Event, d).id for _, d in messages]
        self.calls.append((ids, timeout))
        if self.hang:
            await asyncio.Event().wait()
        if self.raises is not None:
            raise self.raises
        results = [self.fail(attempt, i) for i in range(len(messages))]
        self.stored += [e for e, r in zip(ids, results, strict=True) if r is None]
        return results


async def test_retries_wait_half_a_second_doubling_between_attempts() -> None:
    """The one policy: EVENT_ATTEMPTS publications, 0.5 s, 1 s, 2 s, 4 s apart, none after."""
    clock = FakeClock(0.0)
    sleeps = Sleeps(clock)
    bus, pub = FakeBus(), EventPublisher(FLEET, sleep=sleeps)
    bus.faults[(PUBLISH, PUBLISH)] = BusError("JetStream away")
    bus.fault_count[(PUBLISH, PUBLISH)] = EVENT_ATTEMPTS
    await pub.publish(bus, [event(1)])
    assert EVENT_ATTEMPTS == 5
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0]
    assert clock.t == 7.5 and bus.published == []


async def test_only_the_events_not_stored_are_published_again() -> None:
    """A retry carries just the events the sink reported failed, still in queue order."""
    sleeps = Sleeps(FakeClock())
    sink = ScriptedSink(lambda attempt, i: BusError("no ack") if attempt == 0 and i != 1 else None)
    pub = EventPublisher(FLEET, sleep=sleeps)
    await pub.publish(sink, [event(0), event(1), event(2)])
    assert [ids for ids, _ in sink.calls] == [["e0", "e1", "e2"], ["e0", "e2"]]
    assert sink.stored == ["e1", "e0", "e2"] and sleeps.delays == [0.5]


async def test_a_sink_that_raises_fails_the_whole_batch_and_nothing_escapes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A BusError raised by the sink counts as a failed attempt for every event of the batch."""
    sink = ScriptedSink(raises=BusError("not connected"))
    pub = EventPublisher(FLEET, sleep=Sleeps(FakeClock()))
    with caplog.at_level(logging.ERROR):
        await pub.publish(sink, [event(0), event(1)])
    assert len(sink.calls) == EVENT_ATTEMPTS
    assert all(ids == ["e0", "e1"] for ids, _ in sink.calls)
    assert caplog.text.count("not recorded: not connected") == 2


async def test_every_publication_is_bounded_by_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sink is given the timeout; a sink that never answers is given up all the same."""
    sink = ScriptedSink(hang=True)
    pub = EventPublisher(FLEET, timeout=0.001, attempts=2, sleep=Sleeps(FakeClock()))
    with caplog.at_level(logging.ERROR):
        await pub.publish(sink, [event(0, rollout="", node="node-3")])
    assert sink.calls == [(["e0"], 0.001)] * 2
    assert "event node.done of node-3 not recorded: timed out" in caplog.text


async def test_the_default_publication_timeout_is_the_buses() -> None:
    """Without a timeout the sink is given PUBLISH_TIMEOUT, the Bus's own OP_TIMEOUT."""
    sink = ScriptedSink()
    await EventPublisher(FLEET).publish(sink, [event(0)])
    assert sink.calls == [(["e0"], PUBLISH_TIMEOUT)] and PUBLISH_TIMEOUT == 10.0


# -- batches, and shutdown -------------------------------------------------------------------------


async def test_run_publishes_at_most_a_batch_per_publication() -> None:
    """What waits is taken in batches of at most ``batch`` events, in queue order."""
    sink, pub = ScriptedSink(), EventPublisher(FLEET, batch=2)
    for i in range(5):
        pub.put(event(i))
    task = asyncio.create_task(pub.run(sink))
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [ids for ids, _ in sink.calls] == [["e0", "e1"], ["e2", "e3"], ["e4"]]


async def test_cancelling_run_drops_the_batch_in_flight_and_keeps_the_queue() -> None:
    """Shutdown flushes nothing: the batch being retried is lost, what is queued stays queued."""
    gate = asyncio.Event()

    async def sleep(delay: float) -> None:
        await gate.wait()  # the backoff of the first batch: the task is cancelled here

    bus, pub = FakeBus(), EventPublisher(FLEET, sleep=sleep)
    bus.faults[(PUBLISH, PUBLISH)] = BusError("JetStream away")
    pub.put(event(0))
    task = asyncio.create_task(pub.run(bus))
    for _ in range(5):
        await asyncio.sleep(0)
    pub.put(event(1))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bus.published == []
    assert [e.id for e in pub.pending()] == ["e1"]


async def test_a_full_queue_drops_the_oldest_while_the_bus_is_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Producers go on queueing while a batch is retried; past the bound the oldest go, said in
    one error line a second at most, with the count and kinds dropped since the last one."""
    gate = asyncio.Event()
    clock = FakeClock()

    async def sleep(delay: float) -> None:
        await gate.wait()

    bus, pub = FakeBus(), EventPublisher(FLEET, queue=2, sleep=sleep, clock=clock)
    bus.faults[(PUBLISH, PUBLISH)] = BusError("JetStream away")
    pub.put(event(0))
    task = asyncio.create_task(pub.run(bus))
    for _ in range(5):
        await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR):
        for i in range(1, 6):
            pub.put(event(i))  # e3 drops e1 (said at once); e4 drops e2, e5 e3 (held back)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "dropped 1, oldest first (1 node.done" in lines[0], lines
        clock.t += 1.0
        pub.put(event(6))  # drops e4: a second has passed, so this line says the three
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [e.id for e in pub.pending()] == ["e5", "e6"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "dropped 3, oldest first (3 node.done; the last node.done" in lines[1]


def test_event_ids_are_32_hex_digits_and_unique() -> None:
    """``event_id`` (the coordinator's ids for its events): the shape of a uuid4's hex, never
    the same twice in a process, and another process's prefix."""
    import subprocess
    import sys

    from protocol.events import event_id

    ids = [event_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    other = subprocess.run([sys.executable, "-c", "from protocol.events import event_id; "
                            "print(event_id())"], capture_output=True, text=True, check=True)
    assert other.stdout.strip()[:20] != ids[0][:20]
