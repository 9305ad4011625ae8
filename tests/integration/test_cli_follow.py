"""``deploy`` follows its rollout on one connection and reads its status again as soon as one of
its events is heard, not only every ``POLL``: here a stand-in coordinator on a real broker
accepts the deploy and says "running" until the rollout's terminal event is published, and the
follower, whose polling is set to an hour, ends within moments of that event."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from coordinator.cli import rollout_cmds
from coordinator.cli.base import Ctx
from coordinator.dev.broker import Broker
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import encode
from protocol.events import PACK, pack
from protocol.messages import ApiReply, Event, RolloutSpec
from tests.integration.procs import fleetwave
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

    async def accept(subject: str, data: bytes) -> bytes:
        return encode(ApiReply(ok=True, data={"id": "hello-r1"}))

    async def no_leader(subject: str, data: bytes) -> bytes:
        return encode(ApiReply(ok=True, data={}))  # the request goes to the queue group

    try:
        await coordinator.respond(subjects.api(FLEET, "*", "status"), answer)
        await coordinator.respond(subjects.api(FLEET, "*", "deploy"), accept)
        await coordinator.respond(subjects.api(FLEET, "*", "leader"), no_leader)
        following = asyncio.create_task(rollout_cmds.deploy_and_follow(
            Ctx(nats_url=broker.url, fleet=FLEET), RolloutSpec(service="hello", version="2.0.0"),
            wait="done", detach=False, output="json"))
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


async def test_events_shows_each_event_of_a_pack_and_last_counts_events(broker: Broker) -> None:
    """``fleetwave events`` expands the coordinator's packs (``protocol.events.pack``): every
    node event in stream order, ``--last N`` the last N events, not messages; a pack on a
    node's own subject is skipped, saying why."""
    bus = await Bus.connect(broker.url, FLEET)
    try:
        await bus.ensure_fleet()

        def one(i: int, kind: str, node: str = "") -> Event:
            return Event(id=f"e{i}", time=float(i), fleet=FLEET, kind=kind, message=f"m{i}",
                         node=node, service="hello", rollout="hello-r1")

        packed = pack([one(i, "node.updating", f"node-{i}") for i in range(2, 7)])
        forged = pack([one(8, "node.done", "node-1"), one(9, "node.done", "node-2")])
        sent = [(subjects.event(FLEET, "wave.started"), encode(one(1, "wave.started"))),
                (subjects.event(FLEET, PACK), encode(packed)),
                (subjects.agent_event(FLEET, "node-1", PACK), encode(forged)),
                (subjects.event(FLEET, "rollout.succeeded"), encode(one(7, "rollout.succeeded")))]
        assert await bus.js_publish_events(sent) == [None] * len(sent)
    finally:
        await bus.close()
    code, out, err = await fleetwave("--fleet", FLEET, "events", "-o", "json", nats_url=broker.url)
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == [f"e{i}" for i in range(1, 8)]
    assert "only the coordinator packs events" in err
    code, out, err = await fleetwave("--fleet", FLEET, "events", "-o", "json", "--last", "3",
                                     nats_url=broker.url)
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["e5", "e6", "e7"]
