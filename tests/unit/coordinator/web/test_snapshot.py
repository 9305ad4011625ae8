"""The dashboard's snapshot over a stand-in coordinator: what it asks the API for (a page of
node rows) and how often it reads a finished rollout's status (settled: not at every poll)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.web.feed import Feed
from coordinator.web.handlers import PAGE_NODES, Dashboard
from protocol.codec import decode, encode
from protocol.messages import ApiReply, Event, NodesRequest, RolloutRequest


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


async def test_the_feed_keeps_a_bounded_part_of_each_event_and_of_them_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A node may publish any size on its own subject (up to max_payload): 100 events of 200 KB
    made every snapshot of the rollout 20 MB (sent twice a second a page) and the leader 700 MB
    with six pages open. The feed keeps a message's first MESSAGE_CHARS and no data past
    DATA_BYTES (saying so), and drops its oldest events past KEEP_BYTES in all."""
    from coordinator.web import feed as feed_module
    from protocol.messages import Event

    feed = Feed(Coordinator("running"))  # type: ignore[arg-type]
    huge = [Event(id=f"e{i}", time=float(i), fleet="default", kind="slot.crashed",
                  node="node-2", rollout="r1", message="m" * 200_000,
                  data={"blob": "d" * 200_000}) for i in range(100)]
    await feed._keep(huge)
    kept = feed.of("r1", last=300)
    assert len(kept) == 100
    assert all(len(e.message) < feed_module.MESSAGE_CHARS + 100 for e in kept)
    assert all("characters in all" in e.message and "dropped" in e.data for e in kept)
    assert sum(len(encode(e)) for e in kept) < 100 * (feed_module.DATA_BYTES // 2)
    small = Event(id="s", time=1e9, fleet="default", kind="gate.passed", rollout="r1",
                  message="ok", data={"error_rate": 0.0})
    await feed._keep([small])
    assert feed.of("r1", last=1) == [small]  # kept as it came
    monkeypatch.setattr(feed_module, "KEEP_BYTES", 10_000)
    await feed._keep([Event(id="t", time=2e9, fleet="default", kind="gate.passed",
                            rollout="r1", message="last")])
    assert feed._bytes <= 10_000 and feed.of("r1", last=1)[0].id == "t"
    assert len(feed.of("r1", last=300)) < 10


async def test_a_pack_whose_members_share_an_id_leaves_the_feed_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One entry per id, its size counted once: a pack of 120 members sharing an id (anyone may
    publish on an open bus) counted 120 sizes against one entry; the eviction then emptied the
    list and failed on the empty dict at every later event: no event showed again."""
    import coordinator.web.feed as feed_mod

    monkeypatch.setattr(feed_mod, "KEEP_BYTES", 50_000)
    feed = Feed(None)  # type: ignore[arg-type]  # _keep reads no coordinator
    same = [Event(id="dup", time=float(i), fleet="f", kind="node.online", node="n1",
                  message="m" * 1000) for i in range(120)]
    for _ in range(3):
        await feed._keep(same)
    assert list(feed._events) == ["dup"]
    fresh = Event(id="new", time=200.0, fleet="f", kind="node.online", node="n1")
    await feed._keep([fresh])
    assert list(feed._events) == ["dup", "new"]
    assert feed._bytes == sum(feed._sizes.values())
