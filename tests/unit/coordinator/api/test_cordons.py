"""The cordon verbs: which nodes a request names, and every way to name none (usage, nothing
asked of the runner)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from coordinator.api.cordons import CordonsApi
from coordinator.api.verbs import Api
from coordinator.core.fleet import matches
from protocol.codec import decode, encode
from protocol.messages import ApiReply, CordonRequest, ForgetRequest, NodeView

NODES = [NodeView(id="node-1", labels={"zone": "a"}), NodeView(id="node-2", labels={"zone": "b"}),
         NodeView(id="node-3", labels={"zone": "a"}, online=False)]


class Holder:
    """Records what the runner was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str], bool, float, str]] = []

    async def cordon(self, nodes: list[str], *, drain: bool, grace: float,
                     who: str) -> list[dict[str, Any]]:
        self.asked.append(("cordon", nodes, drain, grace, who))
        return [{"node": n} for n in nodes]

    async def uncordon(self, nodes: list[str], *, who: str) -> list[dict[str, Any]]:
        self.asked.append(("uncordon", nodes, False, 0.0, who))
        return [{"node": n} for n in nodes]

    async def forget(self, nodes: list[str], *, who: str) -> list[dict[str, Any]]:
        self.asked.append(("forget", nodes, False, 0.0, who))
        return [{"node": n, "forgotten": True} for n in nodes]


def view(selector: Mapping[str, str] | None) -> list[NodeView]:
    return [n for n in NODES if matches(selector or {}, n.labels)]


def ask(verb: str, req: CordonRequest) -> tuple[ApiReply, Holder]:
    holder, api = Holder(), Api(timeout=1.0)
    CordonsApi(holder, fleet="f", nodes=view).register(api)
    return decode(ApiReply, asyncio.run(api.handle(verb, encode(req), "alice"))), holder


@pytest.mark.parametrize(
    ("name", "verb", "req", "asked"),
    [
        ("one node", "cordon", CordonRequest(node="node-2"), ("cordon", ["node-2"], False, 15.0)),
        ("an offline node", "cordon", CordonRequest(node="node-3"),
         ("cordon", ["node-3"], False, 15.0)),
        ("a selector", "uncordon", CordonRequest(selector={"zone": "a"}),
         ("uncordon", ["node-1", "node-3"], False, 0.0)),
        ("a drain", "cordon", CordonRequest(node="node-1", drain=True, grace=30.0),
         ("cordon", ["node-1"], True, 30.0)),
    ],
)
def test_the_nodes_a_request_names_go_to_the_runner_with_the_caller(
        name: str, verb: str, req: CordonRequest, asked: tuple[Any, ...]) -> None:
    """A node by id (offline too) or every node a selector matches, for the caller."""
    reply, holder = ask(verb, req)
    assert reply.ok, (name, reply.error)
    assert holder.asked == [(*asked, "alice")], name


@pytest.mark.parametrize(
    ("name", "verb", "req", "says"),
    [
        ("unknown node", "cordon", CordonRequest(node="node-9"),
         "no node 'node-9' in fleet 'f'; list them with 'fleetwave nodes'"),
        ("unknown node to uncordon", "uncordon", CordonRequest(node="node-9"), "no node 'node-9'"),
        ("selector matching nothing", "cordon", CordonRequest(selector={"zone": "z"}),
         "no node matches selector zone=z"),
        ("neither", "cordon", CordonRequest(), "name one node or give --selector"),
        ("both", "uncordon", CordonRequest(node="node-1", selector={"zone": "a"}),
         "name one node or give --selector"),
        ("drain by selector", "cordon", CordonRequest(selector={"zone": "a"}, drain=True),
         "drain one node at a time"),
        ("negative grace", "cordon", CordonRequest(node="node-1", drain=True, grace=-1.0),
         "drain grace -1s is out of range"),
        ("bad node name", "cordon", CordonRequest(node="node 1"), "node"),
    ],
)
def test_a_request_naming_no_node_is_usage_and_asks_nothing(
        name: str, verb: str, req: CordonRequest, says: str) -> None:
    """Bad input: code usage (the CLI exits 2) with what and what to do; the runner is not
    asked, so nothing changes."""
    reply, holder = ask(verb, req)
    assert (reply.ok, reply.code) == (False, "usage"), name
    assert says in reply.error, (name, reply.error)
    assert holder.asked == [], name


FLEET = [NodeView(id="node-1", online=True), NodeView(id="node-2"), NodeView(id="node-5"),
         NodeView(id="node-3", unheard=True)]


def forget(nodes: list[str]) -> tuple[ApiReply, Holder, list[str]]:
    holder, api, dropped = Holder(), Api(timeout=1.0), []
    CordonsApi(holder, fleet="f", nodes=lambda selector: list(FLEET),
               forgotten=dropped.append).register(api)
    raw = asyncio.run(api.handle("forget", encode(ForgetRequest(nodes=nodes)), "alice"))
    return decode(ApiReply, raw), holder, dropped


def test_forget_drops_offline_nodes_for_the_caller_and_from_this_table() -> None:
    reply, holder, dropped = forget(["node-5", "node-2", "node-5"])
    assert reply.ok, reply.error
    assert holder.asked == [("forget", ["node-2", "node-5"], False, 0.0, "alice")]
    assert dropped == ["node-2", "node-5"]
    assert reply.data == {"nodes": [{"node": "node-2", "forgotten": True},
                                    {"node": "node-5", "forgotten": True}]}


@pytest.mark.parametrize(("nodes", "says"), [
    ([], "name the nodes to forget: 'fleetwave forget NODE...'"),
    (["node-9"], "no node 'node-9' in fleet 'f'; nothing forgotten"),
    (["node-2", "node-1"], "node node-1 is online: stop its agent first"),
    (["node-3"], "node node-3 is not heard from yet (this coordinator has just started)"),
    (["node 1"], "node name 'node 1' is not allowed"),
])
def test_forget_refuses_the_whole_request_for_a_node_it_must_not_drop(
        nodes: list[str], says: str) -> None:
    """Unknown, online, not heard yet, or a bad name: usage (exit 2), nothing asked, nothing
    dropped, not even the good nodes of the same request."""
    reply, holder, dropped = forget(nodes)
    assert (reply.ok, reply.code) == (False, "usage") and says in reply.error, reply.error
    assert holder.asked == [] and dropped == []
