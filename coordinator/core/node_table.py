"""Reading a rollout record's nodes: whether a node converged, the engine's working copy of the
node table, and the read-only walks over it. Kept apart from ``engine_types`` (its events and
commands are dataclasses, 6-9 ms to define) so that the strategies, which the CLI imports to
check a spec before it sends a deploy, need not load the engine's vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from protocol.messages import DesiredState, NodeProgress, ObservedState


def converged(seen: ObservedState, target: DesiredState) -> bool:
    """Whether a node has converged on ``target``: generation reached, traffic slots healthy and
    the weights applied as asked."""
    if seen.observed_generation < target.generation or seen.phase == "failed":
        return False
    for slot, weight in target.weights.items():
        status = seen.slots.get(slot)
        if weight > 0 and (status is None or status.status != "healthy"):
            return False
    return _positive(seen.weights) == _positive(target.weights)


def settled(seen: ObservedState, target: DesiredState, slot: str) -> bool:
    """Whether a node has done what ``target`` asks of its new ``slot``: converged on it with
    ``slot`` healthy; or, its old slot (the target's other one) not healthy, having seen the
    target with ``slot`` healthy on the release, and carrying traffic if the target gives it
    some. An agent converges once every slot it is given is healthy, so a node whose old slot
    hangs or crashes might never: it is judged by its new slot (its old one counts against
    max-unavailable by itself, and a node moved whole keeps no such slot:
    ``strategies.waves.warm``)."""
    s = seen.slots.get(slot)
    ref = target.slots.get(slot)
    if s is None or s.status != "healthy" or ref is None:
        return False
    if converged(seen, target):
        return True
    # (Its phase may say failed: the agent reports a crash-looping or failed slot of its
    # desired state so, and here that is the old one.)
    return (seen.generation >= target.generation and s.digest in ("", ref.digest)
            and bool(_olds_down(seen, target, slot))
            and (target.weights.get(slot, 0) == 0 or seen.weights.get(slot, 0) > 0))


def old_slot_failing(seen: ObservedState, target: DesiredState, slot: str) -> bool:
    """Whether a node's reported failure is its old slot's alone: every part of its error
    names another slot of ``target`` than the new ``slot`` (the agent's ``assess`` writes each
    as "slot S (VERSION) ..."; a router's or a fetch's failure is the node's), and that slot
    is not healthy. Such a node, whose old slot crash-loops or gave up, has failed nothing of
    what it was asked: it is judged by its new slot (``settled``), by the deadline at worst."""
    olds = _olds_down(seen, target, slot)
    parts = [part.strip() for part in seen.error.split(";") if part.strip()]
    return bool(olds and parts) and all(
        any(part.startswith(f"slot {k} (") for k in olds) for part in parts)


def _olds_down(seen: ObservedState, target: DesiredState, slot: str) -> list[str]:
    """The slots of ``target`` other than ``slot`` if there are some and ``seen`` has none of
    them healthy; else none."""
    olds = [k for k in target.slots if k != slot]
    down = all((o := seen.slots.get(k)) is None or o.status != "healthy" for k in olds)
    return olds if down else []


def _positive(weights: Mapping[str, int]) -> dict[str, int]:
    return {s: w for s, w in weights.items() if w > 0}


class NodeTable(dict[str, NodeProgress]):
    """A working copy's nodes: each NodeProgress is copied the first time a step takes it
    (``[]``, ``get``, ``values``, ``items``), so a step pays for the nodes it looks at rather
    than for the whole fleet (a copy of every node was a fifth of the coordinator's CPU at
    10,000 nodes). What a step only reads across the fleet goes through ``peek``, which copies
    nothing: a NodeProgress it yields belongs to the committed record and must not be edited.
    The entries themselves are a C-level dict copy; ``Rollout._step`` turns the table back into
    a plain dict before the record is committed."""

    __slots__ = ("_own",)

    def __init__(self, committed: Mapping[str, NodeProgress]) -> None:
        super().__init__(committed)
        self._own: set[str] = set()

    def __getitem__(self, node: str) -> NodeProgress:
        p = dict.__getitem__(self, node)
        if node not in self._own:
            p = msgspec.structs.replace(p)
            dict.__setitem__(self, node, p)
            self._own.add(node)
        return p

    def __setitem__(self, node: str, progress: NodeProgress) -> None:
        dict.__setitem__(self, node, progress)
        self._own.add(node)

    def get(self, node: str, default: Any = None) -> Any:
        return self[node] if node in self else default  # noqa: SIM401  (self.get is this)

    def taken(self) -> set[str]:
        """The nodes a step took (the only ones it can have changed)."""
        return self._own

    def values(self) -> list[NodeProgress]:  # type: ignore[override]
        return [self[n] for n in self]

    def items(self) -> list[tuple[str, NodeProgress]]:  # type: ignore[override]
        return [(n, self[n]) for n in self]


def peek_node(nodes: Mapping[str, NodeProgress], node: str) -> NodeProgress:
    """One node's progress, read only: no copy (``peek`` for one node). Never edit it."""
    return dict.__getitem__(nodes, node) if isinstance(nodes, dict) else nodes[node]


def peek(nodes: Mapping[str, NodeProgress]) -> Iterable[tuple[str, NodeProgress]]:
    """Every (node, progress) of a record's nodes, read only: no copy of a working copy's
    entries (``NodeTable``). Never edit what it yields."""
    return dict.items(nodes) if isinstance(nodes, dict) else nodes.items()
