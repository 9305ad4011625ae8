"""The node verbs of the coordinator's API that hold nodes out: ``cordon`` and ``uncordon``;
and ``forget``, which drops decommissioned nodes from the fleet.

    cordon    CordonRequest(node | selector, drain, grace) → {"nodes": [row]}
    uncordon  CordonRequest(node | selector)               → {"nodes": [row]}
    forget    ForgetRequest(nodes)                         → {"nodes": [{"node", "forgotten"}]}

where a row is ``{"node", "cordoned", "drained", "changed", "by", "time", "grace"}``
(``changed`` False: it already was so). ``fleetwave drain NODE`` is ``cordon`` with ``drain``:
one node at a time, by id (taking many nodes' routers out of service at once is not a
maintenance, it is an outage).

Refused as usage (exit 2, nothing changed): no node and no selector, or both; a node the fleet
has never seen; a selector matching no node; a grace outside 0-3600 s. ``forget`` refuses (the
whole request, nothing changed) a node not in the fleet, one online (stop its agent first: it
would register again at once), and one not heard yet (a coordinator that has just started
cannot tell it offline); and, Conflict, one a live rollout targets. The writes themselves are
the runner's (``coordinator.runtime.cordons``), which records the caller as ``who``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from coordinator.api.verbs import Api
from coordinator.errors import UsageError
from protocol import subjects
from protocol.messages import CordonRequest, ForgetRequest, NodeView

MAX_GRACE = 3600.0


class Holder(Protocol):
    """What the verbs need of the leading coordinator's runner."""

    async def cordon(self, nodes: list[str], *, drain: bool, grace: float,
                     who: str) -> list[dict[str, Any]]: ...
    async def uncordon(self, nodes: list[str], *, who: str) -> list[dict[str, Any]]: ...
    async def forget(self, nodes: list[str], *, who: str) -> list[dict[str, Any]]: ...


class CordonsApi:
    """The handlers; ``register(api)`` adds them to the coordinator's Api. ``nodes(selector)``
    is the node table's view: every node ever registered, online or not."""

    def __init__(self, holder: Holder, *, fleet: str,
                 nodes: Callable[[Mapping[str, str] | None], list[NodeView]],
                 forgotten: Callable[[str], object] = lambda node: None) -> None:
        self.holder = holder
        self.fleet = fleet
        self._nodes = nodes
        self._forgotten = forgotten  # this coordinator's node table drops it (Fleet.forget)

    def register(self, api: Api) -> None:
        api.add("cordon", CordonRequest, self.cordon)
        api.add("uncordon", CordonRequest, self.uncordon)
        api.add("forget", ForgetRequest, self.forget)

    async def cordon(self, req: CordonRequest, caller: str) -> dict[str, Any]:
        if req.drain and not req.node:
            raise UsageError("drain one node at a time, by name: 'fleetwave drain NODE'")
        if not 0.0 <= req.grace <= MAX_GRACE:
            raise UsageError(f"drain grace {req.grace:g}s is out of range; give 0 to "
                             f"{MAX_GRACE:g} seconds (e.g. --grace 30s)")
        nodes = self._targets(req, "cordon")
        return {"nodes": await self.holder.cordon(nodes, drain=req.drain, grace=req.grace,
                                                  who=caller)}

    async def uncordon(self, req: CordonRequest, caller: str) -> dict[str, Any]:
        return {"nodes": await self.holder.uncordon(self._targets(req, "uncordon"), who=caller)}

    async def forget(self, req: ForgetRequest, caller: str) -> dict[str, Any]:
        if not req.nodes:
            raise UsageError("name the nodes to forget: 'fleetwave forget NODE...' (offline "
                             "nodes; list them with 'fleetwave nodes')")
        names = sorted({subjects.check_name("node", n) for n in req.nodes})
        known = {v.id: v for v in self._nodes(None)}
        for node in names:
            view = known.get(node)
            if view is None:
                raise UsageError(f"no node {node!r} in fleet {self.fleet!r}; nothing forgotten "
                                 "(list them with 'fleetwave nodes')")
            if view.online:
                raise UsageError(f"node {node} is online: stop its agent first (a node that "
                                 "beats registers again); nothing forgotten")
            if view.unheard:
                raise UsageError(f"node {node} is not heard from yet (this coordinator has just "
                                 "started): try again once it shows offline; nothing forgotten")
        rows = await self.holder.forget(names, who=caller)
        for node in names:
            self._forgotten(node)
        return {"nodes": rows}

    def _targets(self, req: CordonRequest, verb: str) -> list[str]:
        """The nodes ``req`` names; UsageError (nothing changes) when it names none."""
        if bool(req.node) == bool(req.selector):
            raise UsageError(f"name one node or give --selector KEY=VALUE: 'fleetwave {verb} "
                             f"NODE' or 'fleetwave {verb} --selector zone=a'")
        if req.node:
            node = subjects.check_name("node", req.node)
            if not any(v.id == node for v in self._nodes(None)):
                raise UsageError(f"no node {node!r} in fleet {self.fleet!r}; list them with "
                                 "'fleetwave nodes'")
            return [node]
        matched = [v.id for v in self._nodes(req.selector)]
        if not matched:
            where = ",".join(f"{k}={v}" for k, v in sorted(req.selector.items()))
            raise UsageError(f"no node matches selector {where}; check the labels with "
                             "'fleetwave nodes'")
        return matched
