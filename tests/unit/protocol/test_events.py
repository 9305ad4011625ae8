"""The event publisher: one queue, one retry policy, for the coordinator and the agent alike."""

from __future__ import annotations

import asyncio
import logging

import pytest

from protocol import events as events_mod
from protocol import subjects
from protocol.codec import decode
from protocol.errors import BusError
from protocol.events import EVENT_ATTEMPTS, EventPublisher
from protocol.messages import Event
from protocol.testing import FLEET, PUBLISH, FakeBus


def event(i: int, *, rollout: str = "r1", node: str = "") -> Event:
    return Event(id=f"e{i}", time=float(i), fleet=FLEET, kind="node.done", message=f"m{i}",
                 node=node, rollout=rollout)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries without waiting: the policy is the number of attempts, not the delays."""
    monkeypatch.setattr(events_mod, "RETRY_DELAY", 0.0)


async def test_events_are_published_in_order_on_their_subjects(fake_bus: FakeBus) -> None:
    """Everything queued goes out in queue order, each on fw.<fleet>.evt.<kind>."""
    bus, pub = fake_bus, EventPublisher(FLEET)
    for i in range(3):
        pub.put(event(i))
    await pub.publish(bus, pub.pending())
    assert [s for s, _ in bus.published] == [subjects.event(FLEET, "node.done")] * 3
    assert [decode(Event, d).id for _, d in bus.published] == ["e0", "e1", "e2"]


async def test_a_failed_publication_is_retried_until_it_is_stored() -> None:
    """Events not stored are published again, up to EVENT_ATTEMPTS times in all."""
    bus, pub = FakeBus(), EventPublisher(FLEET)
    bus.faults[(PUBLISH, PUBLISH)] = BusError("JetStream away")
    bus.fault_count[(PUBLISH, PUBLISH)] = EVENT_ATTEMPTS - 1
    await pub.publish(bus, [event(1)])
    assert [decode(Event, d).id for _, d in bus.published] == ["e1"]


async def test_an_event_that_is_never_stored_is_logged_and_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After EVENT_ATTEMPTS the event is dropped with an error naming it; nothing raises."""
    bus, pub = FakeBus(), EventPublisher(FLEET)
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
    assert "dropped node.done of rollout r1" in caplog.text


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
