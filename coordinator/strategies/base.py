"""The one shape every strategy has: what the planner, the engine, the CLI and the API call.

A strategy is a module (``rolling``, ``canary``, ``blue_green``, ``shadow``) with these functions;
``coordinator.strategies.STRATEGIES`` maps each ``--strategy`` name to its module.
"""

from __future__ import annotations

from typing import Protocol

from coordinator.core.planning import Wave, WaveKind
from protocol.messages import RolloutSpec


class Strategy(Protocol):
    """Plans waves, says what each wave does, and refuses a spec it cannot carry out."""

    def validate(self, spec: RolloutSpec) -> None:
        """Refuse (UsageError) what this strategy's settings make impossible, before a fleet
        is known; what depends on the nodes is refused by ``plan``."""
        ...

    def plan(self, selected: list[str], spec: RolloutSpec) -> list[Wave]:
        """The waves over ``selected`` (ordered, non-empty), each node's last at weight 100."""
        ...

    def wave_kind(self, spec: RolloutSpec, index: int) -> WaveKind:
        """What wave ``index`` does (``core.planning.WaveKind``); "" for an ordinary wave."""
        ...
