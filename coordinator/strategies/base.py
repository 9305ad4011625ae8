"""The shapes every strategy has: what the planner, the engine, the CLI and the API call.

A strategy is a module (``rolling``, ``canary``, ``blue_green``, ``shadow``, ``remove``) with the
functions of ``Strategy``; ``coordinator.strategies.STRATEGIES`` maps each name to its module.
What a wave does is a ``WavePolicy``, which the strategy gives per wave: the engine asks the
policy of a wave at each point where waves differ and never tests a strategy's name or a wave's
kind. A policy follows the wave, not the strategy: a shadow followed by ``--then blue-green`` ends
with blue-green's switch wave, ``--then rolling`` with ordinary waves.

The policies (``waves.Ordinary``, ``blue_green.Stage`` and ``Switch``, ``shadow.Shadow``) keep
their state in the rollout record's report through the engine's ``Step`` (typed Structs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from coordinator.core import gates as gatelib
from coordinator.core.evidence import Evidence
from coordinator.core.planning import Wave, WaveKind
from protocol.messages import (
    DesiredState,
    Gates,
    MirrorSpec,
    NodeProgress,
    ObservedState,
    RolloutSpec,
    WaveRecord,
)

if TYPE_CHECKING:  # the engine imports the strategies; the hooks only need its type
    from coordinator.core.engine_step import Step


class Strategy(Protocol):
    """Plans waves, gives each wave its policy, and refuses a spec it cannot carry out."""

    def validate(self, spec: RolloutSpec) -> None:
        """Refuse (UsageError) what this strategy's settings make impossible, before a fleet
        is known; what depends on the nodes is refused by ``plan``."""
        ...

    def targets(
        self, selected: list[str], spec: RolloutSpec, current: Mapping[str, DesiredState],
    ) -> list[str]:
        """Which of the ``selected`` nodes (ordered, non-empty) the rollout targets, given each
        node's current desired state of the service; UsageError if none."""
        ...

    def plan(self, selected: list[str], spec: RolloutSpec) -> list[Wave]:
        """The waves over ``selected`` (ordered, non-empty), each node's last at weight 100."""
        ...

    def wave(self, spec: RolloutSpec, index: int) -> WavePolicy:
        """What wave ``index`` does."""
        ...

    def prestage(self, spec: RolloutSpec) -> int:
        """How many waves ahead of the running one have their nodes staged (``core.staging``;
        0: none, as for a strategy whose waves stage by themselves)."""
        ...


class WavePolicy(Protocol):
    """What one wave does where waves differ; the engine asks, the policy answers or acts.

    Attributes say how the engine treats the wave; methods are called at fixed points of the
    engine's step (``core.engine_progress``, ``engine_bake``, ``engine_rollback``).
    """

    @property
    def kind(self) -> WaveKind:
        """The wave's name in the ``wave.started`` event ("" for an ordinary wave)."""
        ...

    @property
    def stages(self) -> bool:
        """The new release goes beside the old one at weight 0: the previous traffic window
        starts with the wave, a node already running the release is done whatever the wave's
        weight, and a failure ends the rollout (nothing serves the new release to pause for)."""
        ...

    @property
    def bounded(self) -> bool:
        """Starting a node can stop it serving, so max-unavailable bounds the wave."""
        ...

    @property
    def bakes(self) -> bool:
        """The wave bakes for ``--bake`` before its gates; if not, it is judged at once."""
        ...

    def started(self, step: Step, wave: WaveRecord) -> None:
        """The wave started (its nodes are waiting)."""
        ...

    def mirror(self, spec: RolloutSpec, slot: str) -> MirrorSpec | None:
        """What a node's router mirrors to the new ``slot`` in this wave, if anything."""
        ...

    def target(self, step: Step, p: NodeProgress, wave: WaveRecord) -> DesiredState:
        """What a node of this wave is given when it starts (a new generation); sets
        ``p.slot`` if the target has a new slot, which must then turn healthy."""
        ...

    def stage(self, step: Step, p: NodeProgress, wave: WaveRecord) -> DesiredState | None:
        """What a node of this wave is given ahead of the wave's turn (``--prestage``): its
        new slot at weight 0, serving nothing (sets ``p.slot``); None if this wave's nodes
        cannot be staged ahead. ``target`` then switches that same slot in."""
        ...

    def converged(self, step: Step, wave: WaveRecord) -> None:
        """Every node of the wave is done; its bake starts next."""
        ...

    def verdict(self, step: Step, wave: WaveRecord) -> gatelib.Verdict | None:
        """The wave's own verdict, or None for the gates over the slots' traffic (``Bake``)."""
        ...

    def gates(self, gates: Gates) -> Gates:
        """The thresholds that judge this wave's traffic, from the spec's."""
        ...

    def old_traffic(
        self, step: Step, wave: WaveRecord, old: list[gatelib.Window],
        evidence: Evidence,
    ) -> tuple[list[gatelib.Window], str]:
        """The old release's traffic to compare the new slots with (``old``: the old slots' in
        the bake window), and where it is from ("" for the window itself)."""
        ...

    def observed(self, step: Step, p: NodeProgress, seen: ObservedState) -> None:
        """A target node reported ``seen`` (asked of every policy of the rollout). ``p`` may
        be the committed record's own (``peek_node``): read it, never edit it."""
        ...

    def keep_warm(self, step: Step) -> bool:
        """Asked of the last wave once it passed: whether to wait before succeeding."""
        ...

    def succeed(self, step: Step) -> None:
        """Asked of the last wave: write what the rollout leaves behind when it succeeds."""
        ...

    def rollback_target(self, step: Step, p: NodeProgress) -> DesiredState | None:
        """What a touched node is rolled back to, if not its previous desired state (asked of
        every policy of the rollout, the first answer wins)."""
        ...

    def rollback_started(self, step: Step) -> None:
        """Every touched node was given its rollback target (asked of every policy)."""
        ...

    def rollback_advanced(self, step: Step) -> None:
        """The rollback phase checked its nodes (asked of every policy)."""
        ...
