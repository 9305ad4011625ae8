"""Planning: which nodes a rollout targets, and in which waves.

Theory of operation: ``plan(nodes, spec)`` is pure. It selects the nodes whose labels carry every
pair of ``spec.selector``, orders them deterministically (by id, with digit runs compared as
numbers so that ``node-2`` comes before ``node-10``), and hands them to the spec's strategy
(``coordinator.strategies``), which cuts them into waves. The same inputs always give the same
waves, so a coordinator that restarts re-plans nothing: the waves are stored in the rollout record.

Vocabulary: an *amount* is what an operator writes for ``--batch`` and ``--max-unavailable``: a
count ``N`` or a percentage ``P%`` of the selected nodes. A *wave* is a set of nodes moved together
and gated together; ``weight`` is the share of traffic (0-100) their new slot receives.

Rounding (as Kubernetes does for surge and unavailability): a batch percentage rounds *up*, so
``10%`` of 5 nodes is a batch of 1, never 0; a max-unavailable percentage rounds *down*, since it is
a safety bound, but never below 1, since a bound of 0 would never let a node move.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from coordinator.errors import UsageError
from protocol.messages import RolloutSpec

_AMOUNT = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<pct>%?)$")
_DIGITS = re.compile(r"(\d+)")


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


@dataclass(frozen=True)
class Amount:
    """A parsed ``N`` or ``P%``."""

    value: float
    percent: bool

    def resolve(self, total: int, *, round_up: bool) -> int:
        """The number of nodes this amount means out of ``total``."""
        if not self.percent:
            return int(self.value)
        exact = self.value * total / 100.0
        # Guard against 0.1 * 30 = 3.0000000000000004 rounding up to 4.
        exact = round(exact, 9)
        return math.ceil(exact) if round_up else math.floor(exact)


def parse_amount(text: str, *, flag: str) -> Amount:
    """Parse ``N`` (a whole number >= 1) or ``P%`` (0 < P <= 100); raise UsageError saying why."""
    m = _AMOUNT.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise UsageError(
            f"{flag} {text!r} is not a count or a percentage; write a whole number like 2 or a "
            "percentage like 25%"
        )
    value = float(m["n"])
    if m["pct"]:
        if not 0 < value <= 100:
            raise UsageError(f"{flag} {text!r} is out of range; a percentage must be above 0% "
                             "and at most 100%")
        return Amount(value, True)
    if value != int(value):
        raise UsageError(f"{flag} {text!r} is not a whole number of nodes; write 2 or 25%")
    if value < 1:
        raise UsageError(f"{flag} {text!r} would never move a node; use at least 1")
    return Amount(value, False)


def batch_size(text: str, total: int) -> int:
    """Nodes per wave for ``--batch``: percentages round up, at least 1."""
    return max(1, parse_amount(text, flag="--batch").resolve(total, round_up=True))


def max_unavailable(text: str, total: int) -> int:
    """The bound of ``--max-unavailable``: percentages round down but never below 1."""
    return max(1, parse_amount(text, flag="--max-unavailable").resolve(total, round_up=False))


def natural_key(node_id: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key comparing digit runs as numbers: node-2 < node-10."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(node_id) if part
    )


def select(nodes: Iterable[NodeLike], selector: Mapping[str, str]) -> list[str]:
    """Ids of the nodes whose labels carry every selector pair, in deterministic order."""
    chosen = {
        n.id for n in nodes if all(n.labels.get(k) == v for k, v in selector.items())
    }
    return sorted(chosen, key=natural_key)


def plan(nodes: Iterable[NodeLike], spec: RolloutSpec) -> list[Wave]:
    """Select the target nodes of ``spec`` and cut them into waves with its strategy."""
    # Imported here because each strategy module imports this one for Wave and the amount parsers.
    from coordinator.strategies import plan_strategy

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
