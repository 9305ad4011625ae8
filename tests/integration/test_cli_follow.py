"""``deploy`` follows its rollout on one connection and reads its status again as soon as one of
its events is heard, not only every ``POLL``: here a stand-in coordinator on a real broker says
"running" until the rollout's terminal event is published, and the follower, whose polling is
set to an hour, ends within moments of that event."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.cli import rollout_cmds
from coordinator.cli.base import Ctx
from coordinator.dev.broker import Broker
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import encode
from protocol.messages import ApiReply, Event
from tests.unit.coordinator.cli.test_deploy_wait import status

FLEET = "f"


async def test_the_terminal_event_ends_following_at_once(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollout_cmds, "POLL", 3600.0)
    coordinator = await Bus.connect(broker.url, FLEET)
    state = {"now": "running"}
    reads: list[str] = []
    first_read = asyncio.Event()

    async def answer(subject: str, data: bytes) -> bytes:
        reads.append(state["now"])
        first_read.set()
        doc: dict[str, Any] = status(state["now"], ("done", "done"))
        return encode(ApiReply(ok=True, data=doc))

    try:
        await coordinator.respond(subjects.api(FLEET, "*", "status"), answer)
        following = asyncio.create_task(rollout_cmds.follow(
            Ctx(nats_url=broker.url, fleet=FLEET), "hello-r1", output="json"))
        async with asyncio.timeout(10):
            await first_read.wait()  # it read "running" once and now waits
        state["now"] = "succeeded"
        event = Event(id="e1", time=0.0, fleet=FLEET, kind="rollout.succeeded",
                      message="succeeded", service="hello", rollout="hello-r1")
        await coordinator.publish(subjects.event(FLEET, "rollout.succeeded"), encode(event))
        async with asyncio.timeout(10):  # an hour without the event's kick
            assert await following == 0
        assert reads == ["running", "succeeded"]
    finally:
        await coordinator.close()
