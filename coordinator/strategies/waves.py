"""The ordinary wave: the policy of every rolling and canary wave, and what the other policies
do where they do nothing special.

An ordinary wave moves its nodes to the new release at the wave's weight, within max-unavailable,
bakes for ``--bake`` and is judged by the gates against the old slots' traffic in the same
window. The last wave of a rolling or canary rollout leaves no old slot serving, so then the
comparison is with the old traffic of the latest earlier window that had enough of it
(``gates.old_floor``; kept in ``record.report.old_window``), or failing that with the old slots'
counters up to this bake (since their routers started): no old traffic in the window must not
make a healthy last step inconclusive, and the few requests still in flight at the switch (the
slowest) must not set the p99 a regression is compared with. When the rollout succeeds, every
node's old slot is retired: a second desired write per node, off the rollout's path (its
success is decided before), and one that an idle copy of the old release on every host for every
service would cost more than (issue 17 asked for one write; a host running a 2 GB service twice
for ever is the worse trade).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec
from msgspec import UNSET

from coordinator.core import gates as gatelib
from coordinator.core.evidence import Evidence
from coordinator.core.node_table import peek
from coordinator.core.planning import WaveKind
from coordinator.core.targets import (
    cohort_for,
    forward_target,
    idle_slot,
    old_slot,
    retire_target,
    serving_slot,
    stats_every_for,
)
from protocol.messages import (
    DesiredState,
    Gates,
    MirrorSpec,
    NodeProgress,
    ObservedState,
    RolloutSpec,
    WaveRecord,
)
from protocol.report import OldWindow

if TYPE_CHECKING:  # the engine imports the strategies; the hooks only need its type
    from coordinator.core.engine_step import Step


class Ordinary:
    """The policy of an ordinary wave (``base.WavePolicy``); ``after_shadow``: a ``--then``
    wave of a shadow, which serves live traffic, so no mismatch gate judges it."""

    kind: WaveKind = ""
    stages = False
    bounded = True
    bakes = True

    def __init__(self, *, after_shadow: bool = False) -> None:
        self.after_shadow = after_shadow

    def started(self, step: Step, wave: WaveRecord) -> None:
        pass

    def mirror(self, spec: RolloutSpec, slot: str) -> MirrorSpec | None:
        return None

    def target(self, step: Step, p: NodeProgress, wave: WaveRecord) -> DesiredState:
        if not p.slot:
            p.slot = idle_slot(p.previous)
        return forward_target(
            p.previous, fleet=step.fleet, node=p.node, release=step.r.release, slot=p.slot,
            weight=wave.weight, generation=step.next_generation(p), rollout=step.r.id,
            now=step.now, mirror=self.mirror(step.spec, p.slot),
            stats_every=stats_every_for(step.spec),
            cohort=cohort_for(step.spec, slot=p.slot, rollout=step.r.id, weight=wave.weight),
            keep_old=wave.weight < 100 or warm(p, step.obs.get(p.node)),
        )

    def stage(self, step: Step, p: NodeProgress, wave: WaveRecord) -> DesiredState | None:
        # No cohort rule and no mirror: at weight 0 nothing but the health probes reaches the
        # slot (an --allow rule would send users to it before its wave).
        if not p.slot:
            p.slot = idle_slot(p.previous)
        return forward_target(
            p.previous, fleet=step.fleet, node=p.node, release=step.r.release, slot=p.slot,
            weight=0, generation=step.next_generation(p), rollout=step.r.id, now=step.now,
        )

    def converged(self, step: Step, wave: WaveRecord) -> None:
        pass

    def verdict(self, step: Step, wave: WaveRecord) -> gatelib.Verdict | None:
        return None

    def gates(self, gates: Gates) -> Gates:
        if self.after_shadow:
            # After a shadow, --then waves serve live traffic: nothing is mirrored any more.
            return msgspec.structs.replace(gates, max_mismatch_rate=None)
        return gates

    def old_traffic(
        self, step: Step, wave: WaveRecord, old: list[gatelib.Window],
        evidence: Evidence,
    ) -> tuple[list[gatelib.Window], str]:
        total = gatelib.total(old)
        # (Sequential analysis weighs the old slots' counts over the same span as the new
        # slots', however few: its bounds allow for small samples.)
        gates = step.spec.gates
        if total.requests and (gates.analysis == "sequential"
                               or total.requests >= gatelib.old_floor(gates)):
            step.r.report.old_window = OldWindow(
                wave=wave.index, requests=total.requests, errors=total.errors,
                latency=list(total.latency))
            return old, ""
        kept = step.r.report.old_window
        if kept is not UNSET:
            return [gatelib.Window(kept.requests, kept.errors, tuple(kept.latency))], \
                f"wave {kept.wave + 1}"
        before = []
        for n, p in peek(step.r.nodes):  # read only
            baseline = wave.baseline.get(n)
            if baseline is None:
                continue  # no counters: no traffic, nothing to distrust
            serving = old_slot(p.previous, p.slot, step.r.release)
            if serving is not None and evidence.admits(n, None, baseline):
                before.append(gatelib.window(None, baseline, serving))
        return before, "old slots before this bake"

    def observed(self, step: Step, p: NodeProgress, seen: ObservedState) -> None:
        pass

    def keep_warm(self, step: Step) -> bool:
        return False

    def succeed(self, step: Step) -> None:
        retire_old(step)

    def rollback_target(self, step: Step, p: NodeProgress) -> DesiredState | None:
        return None

    def rollback_started(self, step: Step) -> None:
        pass

    def rollback_advanced(self, step: Step) -> None:
        pass


def warm(p: NodeProgress, seen: ObservedState | None) -> bool:
    """Whether a node's old serving slot is worth keeping warm when the node is moved whole:
    not if its latest report has it other than healthy with the old release (hung, crashing,
    gone). Kept at weight 0 it would hold the node's convergence (an agent converges once
    every slot it is given is healthy) until it healed, if ever, and a release fixing it could
    never pass; stopped instead, and started again by a rollback, as it was. Not heard from:
    kept."""
    old = serving_slot(p.previous)
    if seen is None or old is None or p.previous is None or old == p.slot:
        return True
    s = seen.slots.get(old)
    return (s is not None and s.status == "healthy"
            and s.digest in ("", p.previous.slots[old].digest))


def retire_old(step: Step) -> None:
    """Stop every node's old slot: its target again with the new slot only."""
    nodes = step.r.nodes
    for n in [n for n, p in peek(nodes) if p.target is not None and len(p.target.slots) > 1]:
        p = nodes[n]  # taken (copied) only when written: ``NodeTable``
        if p.target is not None:
            step.write(p, retire_target(
                p.target, slot=p.slot, generation=step.next_generation(p), now=step.now))


def every(
    selected: list[str], spec: RolloutSpec, current: Mapping[str, DesiredState],
) -> list[str]:
    """The targets of a rollout that deploys a release: every selected node."""
    return selected


ORDINARY = Ordinary()
AFTER_SHADOW = Ordinary(after_shadow=True)
