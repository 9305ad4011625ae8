"""Planning: which nodes a rollout targets, and in which waves.

Theory of operation: ``select(nodes, selector)`` is pure. It picks the nodes whose labels carry
every pair of the selector and orders them deterministically (by id, with digit runs compared as
numbers so that ``node-2`` comes before ``node-10``); the spec's strategy then cuts them into waves
(``coordinator.strategies.plan``). The same inputs always give the same waves, so a coordinator
that restarts re-plans nothing: the waves are stored in the rollout record.

Cordoned nodes (``fleetwave cordon``) are held out here, the one place targets are chosen:
``hold_out(selected, cordoned)`` splits the selected nodes into those a new rollout targets and
those it skips (and says it skipped). A rollout already running keeps its cordoned targets: the
cordon is an operator's word about *new* rollouts, and a rollout half-way through would otherwise
be left with nodes it can neither finish nor roll back.

Vocabulary: a *wave* is a set of nodes moved together and gated together; ``weight`` is the share
of traffic (0-100) their new slot receives. A wave's *kind* (``WaveKind``) says what it does;
each strategy gives the policy of its waves (``coordinator.strategies.base.WavePolicy``). Amounts
(``--batch``, ``--max-unavailable``) are in ``core.amounts``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

_DIGITS = re.compile(r"(\d+)")
_NAMED_NUMBER = re.compile(r"(\D*)(\d+)")


class NodeLike(Protocol):
    """Anything with an id and labels: NodeView, NodeInfo, or a test double."""

    @property
    def id(self) -> str: ...

    @property
    def labels(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Wave:
    """Nodes moved and gated together; their new slot gets ``weight`` percent of the traffic."""

    index: int
    nodes: tuple[str, ...]
    weight: int = 100


def natural_key(node_id: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key comparing digit runs as numbers: node-2 < node-10."""
    if m := _NAMED_NUMBER.fullmatch(node_id):  # the usual shape, "web-12": half the time
        name, number = m.groups()
        return ((1, name), (0, int(number))) if name else ((0, int(number)),)
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(node_id) if part
    )


def select(nodes: Iterable[NodeLike], selector: Mapping[str, str]) -> list[str]:
    """Ids of the nodes whose labels carry every selector pair, in deterministic order."""
    chosen = {
        n.id for n in nodes if all(n.labels.get(k) == v for k, v in selector.items())
    }
    return sorted(chosen, key=natural_key)


def hold_out(selected: Iterable[str], cordoned: Collection[str]) -> tuple[list[str], list[str]]:
    """``selected`` split, order kept, into (the nodes a new rollout targets, the cordoned ones
    it skips)."""
    targets: list[str] = []
    skipped: list[str] = []
    for node in selected:
        (skipped if node in cordoned else targets).append(node)
    return targets, skipped


WaveKind = Literal["", "stage", "shadow", "switch", "remove"]
