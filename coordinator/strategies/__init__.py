"""One module per strategy; each cuts the selected nodes into waves (``planning.Wave``).

``plan(nodes, spec)`` selects the target nodes (``core.planning.select``) and hands them to
``plan_strategy(selected, spec)``, which dispatches on ``spec.strategy``. Every strategy returns
waves that together hold every selected node, each node's final wave with weight 100. The desired
state one node is given for a wave, a rollback or the retirement of its old slot is built by
``core.targets``.
"""

from __future__ import annotations

from collections.abc import Iterable

from coordinator.core.amounts import max_unavailable
from coordinator.core.planning import NodeLike, Wave, select
from coordinator.errors import UsageError
from coordinator.strategies import blue_green, canary, rolling, shadow
from protocol.messages import RolloutSpec


def plan_strategy(selected: list[str], spec: RolloutSpec) -> list[Wave]:
    """The waves of ``spec.strategy`` over ``selected`` (already ordered, non-empty)."""
    if spec.strategy == "rolling":
        return rolling.plan(selected, spec)
    if spec.strategy == "canary":
        return canary.plan(selected, spec)
    if spec.strategy == "blue-green":
        return blue_green.plan(selected, spec)
    if spec.strategy == "shadow":
        return shadow.plan(selected, spec)
    raise UsageError(
        f"strategy {spec.strategy!r} is not supported by this coordinator; "
        "use --strategy rolling, canary, blue-green or shadow"
    )


def plan(nodes: Iterable[NodeLike], spec: RolloutSpec) -> list[Wave]:
    """Select the target nodes of ``spec`` and cut them into waves with its strategy."""
    selected = select(nodes, spec.selector)
    if not selected:
        where = ",".join(f"{k}={v}" for k, v in sorted(spec.selector.items())) or "(any)"
        raise UsageError(
            f"no node matches selector {where}; check the labels with "
            "'fleetwave nodes' or start an agent with matching --label"
        )
    max_unavailable(spec.max_unavailable, len(selected))  # every strategy honours it: check it now
    waves = plan_strategy(selected, spec)
    return [Wave(i, w.nodes, w.weight) for i, w in enumerate(waves)]
