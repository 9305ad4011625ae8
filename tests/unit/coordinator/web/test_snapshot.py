"""The dashboard's snapshot over a stand-in coordinator: what it asks the API for (a page of
node rows) and how often it reads a finished rollout's status (settled: not at every poll)."""

from __future__ import annotations

import asyncio
from typing import Any

from coordinator.web.feed import Feed
from coordinator.web.handlers import PAGE_NODES, Dashboard
from protocol.codec import decode
from protocol.messages import ApiReply, NodesRequest, RolloutRequest


class Api:
    def __init__(self, state: str) -> None:
        self.state = state
        self.asked: list[tuple[str, Any]] = []

    async def reply(self, verb: str, data: bytes, caller: str) -> ApiReply:
        if verb == "nodes":
            self.asked.append((verb, decode(NodesRequest, data)))
            return ApiReply(ok=True, data={"nodes": [], "node_count": 9, "online": 7, "unheard": 1})
        if verb == "rollouts":
            return ApiReply(ok=True, data=[{"id": "r1", "service": "hello",
                                            "state": self.state}])
        self.asked.append((verb, decode(RolloutRequest, data)))
        return ApiReply(ok=True, data={"id": "r1", "state": self.state, "nodes": {}})


class Coordinator:
    def __init__(self, state: str) -> None:
        self.api = Api(state)
        self.ready = asyncio.Event()
        self.ready.set()
        self.fleet_name, self.id, self.runner = "default", "c1", None


async def snapshots(state: str, polls: int) -> tuple[Api, dict[str, Any]]:
    coord = Coordinator(state)
    feed = Feed(coord)  # type: ignore[arg-type]
    board = Dashboard(coord, feed, None)  # type: ignore[arg-type]
    snap: dict[str, Any] = {}
    for _ in range(polls):
        feed.serial += 1  # an event between polls (a node's heartbeat news, say)
        snap = await board.snapshot("", "")
    return coord.api, snap


async def test_a_snapshot_asks_for_a_page_of_rows_and_counts() -> None:
    api, snap = await snapshots("running", 1)
    nodes = [r for verb, r in api.asked if verb == "nodes"]
    statuses = [r for verb, r in api.asked if verb == "status"]
    assert [r.max_nodes for r in nodes] == [PAGE_NODES]
    assert [(r.id, r.max_nodes) for r in statuses] == [("r1", PAGE_NODES)]
    assert (snap["node_count"], snap["nodes_online"], snap["nodes_unheard"]) == (9, 7, 1)


async def test_a_finished_rollouts_status_is_read_once_across_polls_and_events() -> None:
    """Its stored pages take seconds to read at 50,000 nodes; a running one is read anew after
    each event, as before."""
    done, _ = await snapshots("succeeded", 5)
    running, _ = await snapshots("running", 5)
    assert sum(verb == "status" for verb, _ in done.asked) == 1
    assert sum(verb == "status" for verb, _ in running.asked) == 5


async def test_a_failed_read_of_a_finished_rollouts_status_is_not_kept() -> None:
    """A settled answer is kept; a failure (no leader for a moment, a page unreadable) is
    asked again at the next poll."""
    coord = Coordinator("succeeded")
    feed = Feed(coord)  # type: ignore[arg-type]
    board = Dashboard(coord, feed, None)  # type: ignore[arg-type]
    answer = coord.api.reply

    async def failing(verb: str, data: bytes, caller: str) -> ApiReply:
        if verb == "status":
            coord.api.asked.append((verb, None))
            return ApiReply(ok=False, code="internal", error="page unreadable")
        return await answer(verb, data, caller)

    coord.api.reply = failing  # type: ignore[method-assign]
    for _ in range(3):
        await board.snapshot("", "")
    coord.api.reply = answer  # type: ignore[method-assign]
    for _ in range(3):
        await board.snapshot("", "")
    assert sum(verb == "status" for verb, _ in coord.api.asked) == 4
