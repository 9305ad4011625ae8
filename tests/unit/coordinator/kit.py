"""Helpers over the coordinator's engine, shared by its unit tests (built on ``protocol.testing``).

- ``rollout(n, ...)``  a planned rollout of ``hello`` 2.0.0 over ``node-1..n``, each node on 1.0.0
                       at generation 7 (``protocol.testing.desired``).
- ``writes(cmds)``, ``kinds(cmds)``, ``events(cmds, kind)``  what a step's commands write and emit.
- ``report(record)``  a record's report as its JSON holds it.
- ``hist(b3=10, ...)``  a latency histogram (``NB`` buckets) with counts at bucket indexes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from coordinator.core.engine import Command, EmitEvent, Rollout, WriteDesired, new_record
from protocol.messages import LATENCY_BOUNDS_MS, DesiredState, NodeView, RolloutRecord
from protocol.testing import FLEET, NEW, desired, spec

NB = len(LATENCY_BOUNDS_MS) + 1  # buckets of a router's latency histogram


def hist(**at: int) -> list[int]:
    """A histogram with counts at bucket indexes given as b<index>=count."""
    h = [0] * NB
    for key, count in at.items():
        h[int(key[1:])] = count
    return h


def rollout(n: int = 3, *, id: str = "r1", who: str = "", **spec_fields: Any) -> Rollout:
    """A rollout of ``spec(**spec_fields)`` planned over ``n`` nodes, not started, deployed by
    ``who``."""
    nodes = [NodeView(id=f"node-{i}") for i in range(1, n + 1)]
    rec = new_record(id=id, spec=spec(**spec_fields), release=NEW, nodes=nodes,
                     current={v.id: desired(v.id) for v in nodes}, now=0.0, who=who)
    return Rollout(rec, fleet=FLEET)


def writes(cmds: list[Command]) -> list[DesiredState]:
    """The desired states ``cmds`` write, in order."""
    return [c.desired for c in cmds if isinstance(c, WriteDesired)]


def kinds(cmds: list[Command]) -> list[str]:
    """The kinds of the events ``cmds`` emit, in order."""
    return [c.kind for c in cmds if isinstance(c, EmitEvent)]


def events(cmds: list[Command], kind: str) -> list[EmitEvent]:
    """The events of ``kind`` that ``cmds`` emit."""
    return [c for c in cmds if isinstance(c, EmitEvent) and c.kind == kind]


def report(record: RolloutRecord) -> dict[str, Any]:
    """The record's report as plain data: what its JSON in KV holds."""
    out: dict[str, Any] = msgspec.to_builtins(record.report)
    return out
