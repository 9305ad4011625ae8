"""Rolling: fixed-size waves over the selected nodes, in order.

Formula: ``size = min(batch, max_unavailable)`` where both are resolved against the number of
selected nodes ``n`` (see ``planning`` for rounding); waves are ``ceil(n / size)`` consecutive
chunks, the last one possibly smaller. Capping the wave at max-unavailable means that a wave whose
every node is mid-update can never exceed the bound; the engine still checks the bound against
nodes that are offline, failed or unhealthy on their own before it starts each node
(``engine_step.down_why``).
"""

from __future__ import annotations

from coordinator.core import staging
from coordinator.core.amounts import batch_size, max_unavailable
from coordinator.core.planning import Wave
from coordinator.strategies.waves import ORDINARY, Ordinary, every
from protocol.messages import RolloutSpec


def wave_size(total: int, spec: RolloutSpec) -> int:
    """Nodes per rolling wave: the batch, capped by max-unavailable."""
    return min(batch_size(spec.batch, total), max_unavailable(spec.max_unavailable, total))


def validate(spec: RolloutSpec) -> None:
    """Nothing of its own to refuse before the fleet is known: the amounts are checked by every
    spec, and the settings only other strategies read (``--weights``, ``--mirror``, ...) are
    refused by ``spec.check_meaning``."""


def wave(spec: RolloutSpec, index: int) -> Ordinary:
    """Every rolling wave is an ordinary one."""
    return ORDINARY


def prestage(spec: RolloutSpec) -> int:
    """One wave ahead unless told otherwise: the next wave's start-up is hidden behind this
    wave's switch and bake, with one wave's worth of extra processes (``core.staging``)."""
    return staging.waves_ahead(spec.prestage, 1)


targets = every  # every selected node: a release goes to each


def plan(selected: list[str], spec: RolloutSpec) -> list[Wave]:
    """Consecutive chunks of ``wave_size`` nodes, each moved fully (weight 100)."""
    size = wave_size(len(selected), spec)
    return [
        Wave(i, tuple(selected[start:start + size]))
        for i, start in enumerate(range(0, len(selected), size))
    ]
