"""Remove: take a service off the selected nodes, in waves, as any rollout.

The target of every node is the signed "nothing here" desired state: no slots, no weights, a new
generation (``core.targets.empty_target``). Agents ignore a deleted desired key, so a removal is
always written, never a deletion. On each node the agent closes the router first (it stops
accepting, finishes the requests in flight, exits: clients then get a refused connection) and
then drains and stops the slots; the release stays in the node's cache for a fast re-deploy.

Targets: the selected nodes whose current desired state has a slot (``targets``); none is a usage
error (the service is not on those nodes: nothing to remove, and nothing is changed). Waves are
rolling's: ``min(batch, max_unavailable)`` nodes each, in order, so at most max-unavailable
target nodes are mid-removal at once. A wave has no traffic of its own to judge: it passes once
every node has converged (router gone, slots stopped); the next wave starts at once.

Failure and undo: a node that fails or does not converge by the progress deadline fails the wave,
and ``--on-failure`` follows as for any rollout (rollback writes every touched node's previous
desired state again: the service comes back where it was removed). ``fleetwave rollback SERVICE``
after a finished removal deploys the version it removed (``coordinator.api.rollouts``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from coordinator.core import gates as gatelib
from coordinator.core import staging
from coordinator.core.planning import Wave, WaveKind
from coordinator.core.targets import empty_target
from coordinator.errors import UsageError
from coordinator.strategies import rolling
from coordinator.strategies.waves import Ordinary
from protocol.messages import DesiredState, NodeProgress, RolloutSpec, WaveRecord

if TYPE_CHECKING:  # the engine imports the strategies; the hooks only need its type
    from coordinator.core.engine_step import Step

# The settings a removal has no use for, as the deploy flags name them.
_UNUSED = (("steps", "--steps"), ("weights", "--weights"), ("mirror", "--mirror"),
           ("then", "--then"))


def validate(spec: RolloutSpec) -> None:
    """A removal names no version and takes no canary or shadow settings."""
    if spec.version:
        raise UsageError(f"a removal takes no version (got {spec.version!r}); write "
                         f"'fleetwave remove {spec.service}'")
    for field, flag in _UNUSED:
        if getattr(spec, field):
            raise UsageError(f"{flag} means nothing to a removal; leave it out")
    staging.refuse(spec.prestage, "remove", "a removal starts no new slot")


def prestage(spec: RolloutSpec) -> int:
    """Nothing to stage: a removal starts nothing."""
    return 0


def targets(
    selected: list[str], spec: RolloutSpec, current: Mapping[str, DesiredState],
) -> list[str]:
    """The selected nodes that have the service (a desired state with a slot); UsageError if
    none has it: nothing to remove, and nothing is changed."""
    found = [n for n in selected if (d := current.get(n)) is not None and d.slots]
    if not found:
        where = ",".join(f"{k}={v}" for k, v in sorted(spec.selector.items()))
        raise UsageError(
            f"service {spec.service!r} is not deployed on any node"
            + (f" matching {where}" if where else "")
            + " (offline nodes are not targeted): nothing to remove; see 'fleetwave nodes'")
    return found


def plan(selected: list[str], spec: RolloutSpec) -> list[Wave]:
    """Rolling's waves: ``min(batch, max_unavailable)`` nodes each, in order."""
    return rolling.plan(selected, spec)


class RemovalWave(Ordinary):
    """A wave of a removal: its nodes get the empty desired state; done when converged on it;
    passes at once (nothing serves to judge); nothing to retire when the rollout succeeds."""

    kind: WaveKind = "remove"
    bakes = False

    def target(self, step: Step, p: NodeProgress, wave: WaveRecord) -> DesiredState:
        return empty_target(fleet=step.fleet, node=p.node, service=step.spec.service,
                            generation=step.next_generation(p), rollout=step.r.id, now=step.now)

    def stage(self, step: Step, p: NodeProgress, wave: WaveRecord) -> DesiredState | None:
        return None  # nothing new to start

    def verdict(self, step: Step, wave: WaveRecord) -> gatelib.Verdict:
        return gatelib.Verdict("pass", (), {"removed": len(wave.nodes)})

    def succeed(self, step: Step) -> None:
        pass  # every node's target is already empty


REMOVAL = RemovalWave()


def wave(spec: RolloutSpec, index: int) -> RemovalWave:
    """Every wave of a removal removes."""
    return REMOVAL
