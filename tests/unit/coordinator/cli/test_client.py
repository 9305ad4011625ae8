"""``client.call``: what a request that got no answer says. A writing verb's request may have
reached a frozen coordinator that carries it out once it resumes, so its timeout says to look
before retrying; a reading verb's keeps saying to check the coordinator."""

from __future__ import annotations

from typing import Any

import pytest

import coordinator.cli.client as client
from coordinator.cli.base import Ctx
from protocol import subjects
from protocol.errors import NoResponders, NotReachable
from protocol.messages import (
    CordonRequest,
    DeployRequest,
    ForgetRequest,
    ListRolloutsRequest,
    RollbackRequest,
    RolloutRequest,
    RolloutSpec,
)

SILENT = ("the coordinator of fleet 'f' did not answer within 5s; check that it is running and "
          "not overloaded")  # what protocol.bus says when a request times out


class SilentBus:
    """A connection on which every request times out (a coordinator frozen, or swamped), or
    fails with ``error``; ``asked``: the verb of each request, in order."""

    fleet = "f"

    def __init__(self, error: NotReachable | None = None) -> None:
        self.error = error or NotReachable(SILENT)
        self.asked: list[str] = []

    async def request(self, subject: str, data: bytes, timeout: float = 5.0) -> bytes:
        self.asked.append(subject.rsplit(".", 1)[-1])
        raise self.error


async def unanswered(verb: str, request: Any, bus: SilentBus | None = None) -> str:
    bus = bus or SilentBus()
    with pytest.raises(NotReachable) as info:
        await client.call(Ctx(nats_url="nats://x", fleet="f"), verb, request, timeout=5.0,
                          bus=bus)  # type: ignore[arg-type]  # a stand-in for Bus
    return str(info.value)


@pytest.mark.parametrize(
    ("verb", "request_", "look"),
    [
        ("deploy", DeployRequest(spec=RolloutSpec(service="hello", version="2")),
         "check 'fleetwave rollouts --service hello' (or 'fleetwave status') before you retry"),
        ("rollback", RollbackRequest(service="hello"),
         "check 'fleetwave rollouts --service hello' (or 'fleetwave status') before you retry"),
        ("pause", RolloutRequest(id="hello-r1"), "check 'fleetwave status hello-r1'"),
        ("resume", RolloutRequest(id="hello-r1"), "check 'fleetwave status hello-r1'"),
        ("abort", RolloutRequest(id="hello-r1"), "check 'fleetwave status hello-r1'"),
        ("promote", RolloutRequest(id="hello-r1", full=True), "check 'fleetwave status hello-r1'"),
        ("cordon", CordonRequest(node="node-1", drain=True), "check 'fleetwave nodes'"),
        ("uncordon", CordonRequest(node="node-1"), "check 'fleetwave nodes'"),
        ("forget", ForgetRequest(nodes=["node-1"]), "check 'fleetwave nodes'"),
    ],
)
async def test_a_writing_request_that_timed_out_may_still_be_carried_out(
        verb: str, request_: Any, look: str) -> None:
    """Every writing verb's timeout says the coordinator may still carry it out and where to
    look before a retry; no longer that it is merely not running."""
    assert verb in subjects.WRITE_VERBS
    said = await unanswered(verb, request_)
    assert said.startswith("the coordinator of fleet 'f' did not answer within 5s; "), said
    assert "it may still carry the request out" in said and look in said, said
    assert "not overloaded" not in said and "\n" not in said


async def test_a_reading_request_that_timed_out_says_what_it_said() -> None:
    """A reading verb changes nothing, so its timeout keeps the bus's words."""
    assert await unanswered("rollouts", ListRolloutsRequest()) == SILENT
    assert await unanswered("status", RolloutRequest(id="hello-r1")) == SILENT


async def test_no_responders_is_no_maybe() -> None:
    """Nobody subscribed (no coordinator at all): the request went nowhere, which the answer
    keeps saying, how to start one."""
    bus = SilentBus(NoResponders("no coordinator answers for fleet 'f'; start one with "
                                 "'fleetwave coordinator' (or 'fleetwave dev up')"))
    said = await unanswered("pause", RolloutRequest(id="hello-r1"), bus)
    assert said.startswith("no coordinator answers") and "may still" not in said
    assert bus.asked == ["leader", "pause"]  # asked the leader, then the queue group


class TakeoverBus:
    """The leader ``old`` frozen (its subject answers nothing), then ``new`` leading: the first
    "leader" answer names ``old``, the next ones ``new``; ``asked``: every subject asked."""

    fleet = "f"

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def request(self, subject: str, data: bytes, timeout: float = 5.0) -> bytes:
        from protocol.codec import encode
        from protocol.messages import ApiReply

        self.asked.append(subject)
        if subject.endswith(".leader"):
            holder = "new" if any(s.endswith(".leader") for s in self.asked[:-1]) else "old"
            return encode(ApiReply(ok=True, data={"holder": holder}))
        if ".old." in subject:
            raise NotReachable(SILENT)
        return encode(ApiReply(ok=True, data={"id": "hello-r1", "state": "paused"}))


async def test_a_write_to_a_leader_frozen_mid_takeover_reaches_the_new_one() -> None:
    """The leader named froze (SIGSTOP): its direct subject times out. The CLI asks who leads
    again and, another leading now, sends it there (it failed 'check that it is running', and
    the same command a moment later succeeded)."""
    bus = TakeoverBus()
    got = await client.call(Ctx(nats_url="nats://x", fleet="f"), "pause",
                            RolloutRequest(id="hello-r1"), timeout=5.0,
                            bus=bus)  # type: ignore[arg-type]  # a stand-in for Bus
    assert got == {"id": "hello-r1", "state": "paused"}
    direct = [s for s in bus.asked if not s.endswith(".leader")]
    assert len(direct) == 2 and ".old." in direct[0] and ".new." in direct[1], bus.asked
