"""What one node is told: the desired state of a node for a wave, a rollback or a retirement.

The coordinator only says what it wants; make-before-break happens on the agent. The new release
always goes to the node's idle slot, and the serving slot keeps the old release (at the remaining
weight) until the rollout is over, so that a rollback is a weight switch back to a warm slot. A
removal gives a node the empty desired state (``empty_target``).
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET

from protocol.messages import (
    CohortSpec,
    DesiredState,
    MirrorSpec,
    NodeProgress,
    ObservedState,
    ReleaseRef,
    RolloutSpec,
)

# How often a node in a wave judged by sequential analysis is asked to read its router: a bad
# release's first errors reach the gate a quarter second after they happen, not up to 2 s. Only
# the nodes of such a wave read this often (the agent's own period is 2 s, 0.5 s while splitting);
# 0.25 divides the agent's 2 s tick, so the reads stay on its grid.
JUDGED_STATS_EVERY = 0.25


def stats_every_for(spec: RolloutSpec) -> float:
    """What a wave's desired states ask of the agent's router reads (``stats_every``). That a
    rollout reads every node's counters at all (a bake: the old slots' traffic too) the
    leader's heartbeat pace says (``core.pace.reads_counters``), not the nodes' states: no
    write is needed to start or stop it, and it ends with the rollout however it ends."""
    return JUDGED_STATS_EVERY if spec.gates.analysis == "sequential" else 0.0


def serving_slot(desired: DesiredState | None) -> str | None:
    """The slot with the largest weight (ties: a before b), or the only slot; None if empty."""
    if desired is None:
        return None
    # Spelled out for the two slots (``SLOTS``): called per node per verdict and per plan.
    slots, weights = desired.slots, desired.weights
    if "a" in slots:
        return "b" if "b" in slots and weights.get("b", 0) > weights.get("a", 0) else "a"
    return "b" if "b" in slots else None


def serves_unhealthy(p: NodeProgress, seen: ObservedState | None) -> bool:
    """Whether a target node is unhealthy on its own: meant to serve (the state it was told
    before the rollout, or the one it reached: a removal's empty target and a first install
    serve nothing), waiting or done, and its latest report (``seen``; ``p.healthy`` is that
    report's) has no healthy slot with traffic. Not heard from in this rollout's engine (a
    coordinator just taken over): not judged until it reports."""
    return (seen is not None and not p.healthy and p.state in ("waiting", "done")
            and serving_slot(p.target if p.target is not None else p.previous) is not None)


def idle_slot(desired: DesiredState | None) -> str:
    """The slot that receives the new release: the one that is not serving."""
    serving = serving_slot(desired)
    return "b" if serving == "a" else "a"


def old_slot(desired: DesiredState | None, slot: str, release: ReleaseRef) -> str | None:
    """The slot of ``desired`` that serves the old release, if it is not ``slot`` (the one
    receiving the release); None when it already holds ``release`` (an aborted rollout left the
    node on it): its traffic is the new release's, not a baseline to compare with."""
    serving = serving_slot(desired)
    if desired is None or serving is None or serving == slot:
        return None
    return None if desired.slots[serving].digest == release.digest else serving


def runs(desired: DesiredState | None, release: ReleaseRef) -> bool:
    """Whether ``desired`` already serves ``release`` with all of the traffic."""
    serving = serving_slot(desired)
    if desired is None or serving is None:
        return False
    positive = {s for s, w in desired.weights.items() if w > 0 and s in desired.slots}
    return positive == {serving} and desired.slots[serving].digest == release.digest


def cohort_for(spec: RolloutSpec, *, slot: str, rollout: str, weight: int) -> CohortSpec | None:
    """The cohort rule a node's router gets for a wave at ``weight`` with the new release in
    ``slot``, or None. The rollout id is the salt: one user, one bucket on every node and every
    step of this rollout. None at weight 100 (everyone is on the new release; a deny list
    cannot hold without the old slot serving) and when the spec asks for no rule."""
    if weight >= 100 or not (spec.cohort_key or spec.allow or spec.deny or spec.preview):
        return None
    return CohortSpec(
        key=spec.cohort_key, salt=rollout, new=slot, fallback=spec.cohort_fallback,
        allow=list(spec.allow), deny=list(spec.deny), preview=list(spec.preview),
        assign_cookie=spec.assign_cookie,
    )


def forward_target(
    previous: DesiredState | None, *, fleet: str, node: str, release: ReleaseRef, slot: str,
    weight: int, generation: int, rollout: str, now: float, mirror: MirrorSpec | None = None,
    stats_every: float = 0.0, cohort: CohortSpec | None = None, keep_old: bool = True,
) -> DesiredState:
    """The new release in ``slot`` at ``weight`` percent, the old serving slot kept for the rest
    (unless not ``keep_old``: a node at weight 100 with no healthy old slot to keep warm);
    ``mirror`` (shadow) copies a share of the requests to ``slot``; ``stats_every``: how often
    the agent should read the router while the wave is judged (0: its own periods); ``cohort``
    makes the weight a share of users, or adds allow/deny/preview rules (``cohort_for``)."""
    slots: dict[str, ReleaseRef] = {}
    weights: dict[str, int] = {}
    serving = serving_slot(previous)
    if previous is not None and serving is not None and serving != slot and keep_old:
        slots[serving] = previous.slots[serving]
        weights[serving] = 100 - weight
    slots[slot] = release
    weights[slot] = weight
    return DesiredState(
        fleet=fleet, node=node, service=release.service, generation=generation, slots=slots,
        weights=weights, mirror=mirror, rollout=rollout, time=now, stats_every=stats_every,
        cohort=cohort if cohort is not None else UNSET,
    )


def restore_target(
    previous: DesiredState | None, *, fleet: str, node: str, service: str, generation: int,
    rollout: str, now: float,
) -> DesiredState:
    """The node's previous desired state again, under a new generation (no slots if none)."""
    if previous is None:
        return empty_target(fleet=fleet, node=node, service=service, generation=generation,
                            rollout=rollout, now=now)
    return msgspec.structs.replace(previous, generation=generation, rollout=rollout, time=now,
                                   stats_every=0.0, cohort=UNSET)


def retire_target(
    target: DesiredState, *, slot: str, generation: int, now: float,
) -> DesiredState:
    """Only the new release's slot, with all of the traffic: the old slot is stopped."""
    return msgspec.structs.replace(
        target, slots={slot: target.slots[slot]}, weights={slot: 100}, mirror=None,
        generation=generation, time=now, stats_every=0.0, cohort=UNSET,
    )


def empty_target(
    *, fleet: str, node: str, service: str, generation: int, rollout: str, now: float,
) -> DesiredState:
    """The signed "nothing here": no slots, no weights. The agent closes the service's router
    and stops its slots (a removal; also the rollback of a node's first deploy)."""
    return DesiredState(
        fleet=fleet, node=node, service=service, generation=generation, rollout=rollout, time=now,
    )
