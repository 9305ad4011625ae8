"""The manager's events: stamped with this node, published by the shared publisher."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.manager.events import NodeEvents
from protocol import subjects
from protocol.codec import decode
from protocol.errors import BusError
from protocol.events import EVENT_ATTEMPTS, EventPublisher
from protocol.messages import Event
from protocol.testing import FLEET, PUBLISH, FakeBus, FakeClock


async def drain(events: NodeEvents) -> None:
    """Run the publishing task until what is queued is out, then cancel it."""
    task = asyncio.create_task(events.run())
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_emitted_event_is_stamped_and_published_on_its_nodes_subject(
    fake_bus: FakeBus, fake_clock: FakeClock,
) -> None:
    """emit names this node, the service and the clock's time, leaves None values out, and goes
    out on the subject naming this node (the only one its credentials may publish on)."""
    events = NodeEvents(fake_bus, FLEET, "node-1", clock=fake_clock)
    events.emit("slot.started", "hello", "slot a started", slot="a", pid=42, last_exit=None)
    await drain(events)
    [(subject, data)] = fake_bus.published
    ev = decode(Event, data)
    assert subject == subjects.agent_event(FLEET, "node-1", "slot.started")
    assert (ev.fleet, ev.node, ev.service, ev.kind, ev.message, ev.time) == (
        FLEET, "node-1", "hello", "slot.started", "slot a started", fake_clock.t)
    assert ev.data == {"slot": "a", "pid": 42} and ev.id


async def test_events_go_out_in_the_order_they_were_emitted(fake_bus: FakeBus) -> None:
    """Refusals and slot events of one node reach the stream in emission order."""
    events = NodeEvents(fake_bus, FLEET, "node-1")
    for i in range(3):
        events.emit("agent.refused", "hello", f"refusal {i}", generation=i)
    await drain(events)
    assert [decode(Event, d).message for _, d in fake_bus.published] == [
        "refusal 0", "refusal 1", "refusal 2"]


async def test_the_agent_retries_under_the_shared_policy(
    fake_bus: FakeBus, caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream that stays away costs EVENT_ATTEMPTS publications, then one error line."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    events = NodeEvents(fake_bus, FLEET, "node-1",
                        publisher=EventPublisher(FLEET, sleep=sleep))
    fake_bus.faults[(PUBLISH, PUBLISH)] = BusError("JetStream away")
    fake_bus.fault_count[(PUBLISH, PUBLISH)] = EVENT_ATTEMPTS
    events.emit("release.failed", "hello", "digest mismatch", version="2.0.0")
    with caplog.at_level(logging.ERROR):
        await drain(events)
    assert fake_bus.published == [] and delays == [0.5, 1.0, 2.0, 4.0]
    assert "event release.failed of node-1 not recorded: JetStream away" in caplog.text


def test_emit_never_waits_and_a_full_queue_drops_the_oldest(
    fake_bus: FakeBus, caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a running publisher emit still returns at once; past the bound the oldest go."""
    publisher = EventPublisher(FLEET, queue=2)
    events = NodeEvents(fake_bus, FLEET, "node-1", publisher=publisher)
    with caplog.at_level(logging.ERROR):
        for i in range(3):
            events.emit("slot.failed", "hello", f"m{i}")
    assert [e.message for e in publisher.pending()] == ["m1", "m2"]
    assert "event queue full (2 events): dropped 1, oldest first (1 slot.failed; the last " \
        "slot.failed of node-1)" in caplog.text
