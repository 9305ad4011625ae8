"""Blue-green: stage the new release beside the old one everywhere, switch every node at once,
keep the old slot warm for a while, then retire it.

Phases, as waves (``wave`` gives their policies, ``StageWave`` and ``SwitchWave``):

- wave 0, ``stage``: every selected node gets the new release in its idle slot at weight 0, in one
  batch (max-unavailable does not bound it: a staged slot carries no traffic, so no node stops
  serving). A node that fails to stage (the agent reports failure, it goes offline, or it has not
  converged by the progress deadline) blocks the switch for all: nothing is switched, the staged
  slots are retired and the rollout ends rolled back, naming the node. Once every node is staged,
  ``--min-healthy`` is judged on the staged slots (an agent calls a slot healthy only after the
  release's ``validate`` hook passed).
- wave 1, ``switch``: every node's weights go to the staged slot in one batch of writes (new 100,
  old 0, both slots kept). A node's *switch time* is the time of its first observed state whose
  weights show the switch; ``record.report.switch`` keeps them with the *spread* (last - first)
  and the *lag* (last - decision). The wave then bakes for ``--bake`` under the usual gates; since
  the old slots carry no traffic after the switch, ``--max-p99-ratio`` compares with the old slots'
  traffic from the previous wave's start up to the switch.
- *warm*: the old slot keeps running until ``switch decision + --scale-down-delay`` (and at least
  until the gates passed). A failed gate or a rollback inside that window is a *switch back*:
  weights only (old 100, new 0), both slots kept, so no process starts; once a node has switched
  back its new slot is retired (its previous desired state again). After the window the old slots
  are retired and the rollout succeeds; a rollback after that is a new rollout. ``promote`` in the
  window retires now.

Everything here is a function of the engine's working ``Step`` (no IO, time is ``step.now``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec import UNSET

from coordinator.core import gates as gatelib
from coordinator.core import staging
from coordinator.core.evidence import Evidence, listed
from coordinator.core.node_table import converged, peek, peek_node
from coordinator.core.planning import Wave, WaveKind
from coordinator.core.targets import serving_slot
from coordinator.errors import UsageError
from coordinator.strategies.waves import Ordinary, every, retire_old
from protocol.durations import format_duration
from protocol.messages import (
    DesiredState,
    Gates,
    NodeProgress,
    ObservedState,
    RolloutSpec,
    WaveRecord,
)
from protocol.report import OldTraffic, Switch, SwitchBack

if TYPE_CHECKING:  # the engine imports the strategies; this module only needs its type
    from coordinator.core.engine_step import Step  # all these hooks use of it


def validate(spec: RolloutSpec) -> None:
    """A scale-down delay must not be negative; ``--prestage`` has no meaning."""
    staging.refuse(spec.prestage, "blue-green", "its stage wave already starts every node's "
                   "new slot at weight 0 before the one switch")
    if spec.scale_down_delay < 0:
        raise UsageError(
            f"--scale-down-delay {spec.scale_down_delay:g}s is negative; give a duration like "
            "5m (0 retires the old slots as soon as the gates passed)"
        )


class StageWave(Ordinary):
    """The stage wave: the new release beside the old at weight 0 on every node at once, judged
    at once on ``--min-healthy`` only (staged slots carry no traffic)."""

    kind: WaveKind = "stage"
    stages = True
    bounded = False
    bakes = False

    def gates(self, gates: Gates) -> Gates:
        return Gates(min_healthy=gates.min_healthy)

    def old_traffic(
        self, step: Step, wave: WaveRecord, old: list[gatelib.Window],
        evidence: Evidence,
    ) -> tuple[list[gatelib.Window], str]:
        return old, ""


class SwitchWave(Ordinary):
    """The switch wave: every node's traffic to the staged slot at once (max-unavailable does
    not bound it: the staged slot is healthy), its spread recorded, judged against the old
    slots' traffic up to the switch; the old slots kept warm, and switched back to on rollback.
    Also the last wave of a shadow ``--then blue-green`` (``after_shadow``)."""

    kind: WaveKind = "switch"
    bounded = False

    def started(self, step: Step, wave: WaveRecord) -> None:
        start_switch(step, wave.index)

    def converged(self, step: Step, wave: WaveRecord) -> None:
        switched(step, wave.index)

    def old_traffic(
        self, step: Step, wave: WaveRecord, old: list[gatelib.Window],
        evidence: Evidence,
    ) -> tuple[list[gatelib.Window], str]:
        # After the switch the old slots get no traffic.
        evidence.add(old_untrusted(step))
        return [old_window(step)], ""

    def observed(self, step: Step, p: NodeProgress, seen: ObservedState) -> None:
        note(step, p, seen)

    def keep_warm(self, step: Step) -> bool:
        return keep_warm(step)

    def succeed(self, step: Step) -> None:
        retire_old(step)  # after the warm window (``keep_warm``), unlike a rolling wave

    def rollback_target(self, step: Step, p: NodeProgress) -> DesiredState | None:
        return rollback_target(step, p)

    def rollback_started(self, step: Step) -> None:
        if switching_back(step):
            step.emit("bluegreen.switching_back", "switching every node back to the old slots",
                      at=step.now)

    def rollback_advanced(self, step: Step) -> None:
        switched_back(step)


def prestage(spec: RolloutSpec) -> int:
    """Nothing staged ahead: the stage wave stages every node."""
    return 0


STAGE = StageWave()
SWITCH = SwitchWave()
SWITCH_AFTER_SHADOW = SwitchWave(after_shadow=True)


def wave(spec: RolloutSpec, index: int) -> Ordinary:
    """Wave 0 stages the new release at weight 0; wave 1 switches every node to it."""
    return STAGE if index == 0 else SWITCH


targets = every  # every selected node: a release goes to each


def plan(selected: list[str], spec: RolloutSpec) -> list[Wave]:
    """Two waves over every selected node: stage at weight 0, then switch to weight 100."""
    validate(spec)
    nodes = tuple(selected)
    return [Wave(0, nodes, 0), Wave(1, nodes, 100)]


# -- pure arithmetic -------------------------------------------------------------------------------


def shows_switch(seen: ObservedState, slot: str) -> bool:
    """Whether observed weights give ``slot`` traffic and every other slot none."""
    return seen.weights.get(slot, 0) > 0 and all(
        w <= 0 for s, w in seen.weights.items() if s != slot
    )


def spread(times: Mapping[str, float], at: float) -> dict[str, Any]:
    """Summary of per-node switch times: first, last, ``spread = last - first``, ``lag = last -
    at`` (``at``: when the switch was decided); None figures when no node reported yet."""
    if not times:
        return {"first": None, "last": None, "spread": None, "lag": None, "nodes": {}}
    first, last = min(times.values()), max(times.values())
    return {"first": first, "last": last, "spread": round(last - first, 6),
            "lag": round(last - at, 6), "nodes": dict(sorted(times.items()))}


def switch_back_target(
    target: DesiredState, *, serving: str, generation: int, now: float,
) -> DesiredState:
    """``target`` with all of the traffic back on ``serving``: weights only, both slots kept."""
    weights = dict.fromkeys(target.slots, 0) | {serving: 100}
    return msgspec.structs.replace(
        target, weights=weights, mirror=None, generation=generation, time=now, cohort=UNSET,
    )


# -- the engine's hooks ----------------------------------------------------------------------------


def _switch(step: Step) -> Switch | None:
    switch = step.r.report.switch
    return None if switch is UNSET else switch


def _switch_back(step: Step) -> SwitchBack | None:
    back = step.r.report.switch_back
    return None if back is UNSET else back


def _summarize(state: Switch | SwitchBack, times: Mapping[str, float],
               at: float) -> dict[str, Any]:
    """Put the spread of ``times`` into ``state`` (and its sorted times); return the summary."""
    summary = spread(times, at)
    state.first, state.last = summary["first"], summary["last"]
    state.spread, state.lag = summary["spread"], summary["lag"]
    return summary


def start_switch(step: Step, index: int) -> None:
    """Record the switch decision and the old slots' traffic since the previous wave started."""
    r = step.r
    before = r.waves[index - 1].baseline if index > 0 else {}
    evidence = Evidence()
    old = gatelib.total(
        gatelib.window(before.get(n), seen.router, serving)
        for n, p in peek(r.nodes)
        if (serving := _old_slot(p)) is not None and (seen := step.obs.get(n)) is not None
        and evidence.admits(n, before.get(n), seen.router)
    )
    step.r.report.switch = Switch(
        at=step.now, wave=index, nodes={},
        old=OldTraffic(requests=old.requests, errors=old.errors, latency=list(old.latency),
                       untrusted=listed(evidence.untrusted)),
    )
    step.emit("bluegreen.switching", f"switching {len(r.waves[index].nodes)} nodes to "
              f"{r.release.version} at once", wave=index, at=step.now)


def old_window(step: Step) -> gatelib.Window:
    """The old slots' traffic recorded when the switch was decided (the p99 comparison)."""
    old = switch.old if (switch := _switch(step)) is not None else OldTraffic()
    return gatelib.Window(old.requests, old.errors, tuple(old.latency))


def old_untrusted(step: Step) -> dict[str, str]:
    """The nodes whose figures were left out of ``old_window``, with why."""
    switch = _switch(step)
    return dict(switch.old.untrusted) if switch is not None else {}


def note(step: Step, p: NodeProgress, seen: ObservedState) -> None:
    """Record when a node's observed weights first show the switch, or the switch back."""
    switch = _switch(step)
    if switch is None or not p.slot:
        return
    if step.r.phase == "forward":
        if shows_switch(seen, p.slot):
            switch.nodes.setdefault(p.node, seen.time)
        return
    back = _switch_back(step)
    old = _old_slot(p)
    if back is not None and old is not None and p.node in switch.nodes and shows_switch(
            seen, old):
        back.nodes.setdefault(p.node, seen.time)


def switched(step: Step, index: int) -> None:
    """Every node converged on the switch: put the spread in the report and announce it."""
    switch = _switch(step)
    assert switch is not None, "switched before start_switch"
    summary = _summarize(switch, switch.nodes, switch.at)
    switch.nodes = summary["nodes"]
    step.emit("bluegreen.switched", f"all nodes switched; spread {_ms(summary['spread'])} "
              f"(first to last), lag {_ms(summary['lag'])} after the decision", wave=index,
              at=switch.at, first=summary["first"], last=summary["last"],
              spread=summary["spread"], lag=summary["lag"])


def keep_warm(step: Step) -> bool:
    """Whether the rollout must still wait, its switch passed, before retiring the old slots."""
    r = step.r
    switch = _switch(step)
    if switch is None:
        return False
    until = switch.at + step.spec.scale_down_delay
    if r.promote:
        r.promote = ""
        step.emit("bluegreen.promoted", "promoted: retiring the old slots now", until=until)
        return False
    if step.now >= until:
        return False
    if switch.warm_until is UNSET:
        switch.warm_until = until
        step.emit("bluegreen.warm", f"old slots stay warm for "
                  f"{format_duration(until - step.now)} so that a rollback is an instant "
                  "switch back", until=until)
    return True


def rollback_target(step: Step, p: NodeProgress) -> DesiredState | None:
    """The switch back for a node whose target gives the new slot traffic and still holds its
    old serving slot; None where a plain restore of the previous state is right."""
    t = p.target
    old = _old_slot(p)
    if t is None or old is None or p.previous is None or t.weights.get(p.slot, 0) <= 0:
        return None
    if t.slots.get(old) != p.previous.slots[old]:
        return None  # the old release is no longer there: only a restore can bring it back
    back = _switch_back(step)
    if back is None:
        back = SwitchBack(at=step.now, nodes={}, expect=[])
        step.r.report.switch_back = back
    back.expect.append(p.node)
    return switch_back_target(t, serving=old, generation=step.next_generation(p), now=step.now)


def switched_back(step: Step) -> None:
    """Put the switch back's spread in the report once every switched node is back."""
    back = _switch_back(step)
    if back is None or back.spread is not UNSET:
        return
    # From the first node not yet seen back: a node once back stays counted (its router was
    # back), so a step reads the nodes still switching, not all 10,000 again.
    start = 0 if back.confirmed is UNSET else back.confirmed
    for i in range(start, len(back.expect)):
        p = peek_node(step.r.nodes, back.expect[i])
        if (p.state != "failed" and p.target is not None and p.target.slots.get(p.slot) is not None
                and not _back_on(step, p.node, p.target)):
            if i:
                back.confirmed = i
            return  # still switching back (then its new slot is retired)
    back.confirmed = len(back.expect)
    summary = _summarize(back, back.nodes, back.at)
    back.nodes = summary["nodes"]
    step.emit("bluegreen.switched_back", f"traffic back on the old slots; spread "
              f"{_ms(summary['spread'])}", at=back.at, spread=summary["spread"],
              lag=summary["lag"])


def _back_on(step: Step, node: str, target: DesiredState) -> bool:
    """Whether ``node`` reported it runs its switch-back ``target``: its router is back."""
    seen = step.obs.get(node)
    return seen is not None and converged(seen, target)


def switching_back(step: Step) -> bool:
    """Whether the rollback switches nodes back to their warm old slots."""
    return _switch_back(step) is not None


def _old_slot(p: NodeProgress) -> str | None:
    """The slot that served before the rollout, if it is not the one receiving the release."""
    serving = serving_slot(p.previous)
    return serving if serving != p.slot else None


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f}ms"
