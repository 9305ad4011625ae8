"""The bake of the engine's step: how a converged wave waits, and how its gates judge it.

Theory of operation: when every node of a wave is done, ``start_bake`` snapshots every node's router
counters (the wave's *baseline*) and the wave bakes for ``spec.bake`` seconds (unless its policy
says it does not bake: a stage wave carries no traffic and is judged at once). Meanwhile ``bake``
fails any node whose new slot stops being healthy, and hands a node that goes offline to ``Lost``
(``engine_lost``): under ``on_node_lost`` fail it fails, under wait the verdict waits for it (up
to ``--progress-deadline`` past the bake's end). Once the bake is over and
every node's counters cover it (``window_covers_bake``, or ``STATS_GRACE`` later at most;
later still under the fleet's excuse, ``Rollout.excuse``: counters held while the bus was away
predate the outage, and a verdict on them would judge part of the bake),
``verdict`` measures the new slots' traffic since the baseline against the old slots' (or the old
traffic the wave's policy names: ``WavePolicy.old_traffic``) and ``core.gates`` decides, with the
thresholds the policy gives (a shadow wave's policy judges by its own verdict): pass → the next
wave; fail → ``on_failure``; inconclusive → pause. An operator's promote skips the gates of one wave
or of all.

Under ``--analysis sequential`` (``core.sequential``) the evidence counts from the moment the new
slots take traffic, and is weighed each time fresh router counters come in, while the wave is
still updating as well as during its bake (``early``): a wave whose evidence of a regression
crosses 1/alpha fails at once, with the usual ``on_failure``; the evidence so far is kept in
``wave.gates`` (outcome: the wave's state) for ``status`` to show. Its pass is judged at the bake's
end only. To count from the switch, a sequential wave that carries traffic snapshots every node's
counters when it starts, before any weight moves (``count_from_here``: ``wave.evidence_from``), and
its windows start there rather than at the bake's baseline (a node missing from that snapshot, at
the bake's baseline as before); ``window_covers_bake`` still reads the bake's baseline, so the bake
still ends on counters read after it. A brand-new slot has no counters before the snapshot, so
every request it answers, the first ones too, is in the window; the old slots' window is the same
span of time (the old release's traffic meanwhile, more of it than the bake alone), and the
latency reference is the old slots' history before it. Weighing before the bake is sound: at
every moment the e-value is at most a test martingale over the requests counted so far
(``core.sequential``), and Ville's inequality bounds the chance that it *ever* reaches 1/alpha
under the null, so stopping at the first crossing, whenever it comes (the node's switch, a lost
node, a slow convergence: any stopping time), keeps false rollbacks below alpha. The pass needs
no such argument: it is one look, at the bake's end, with the fixed-sample bounds. A retried
wave (resumed after a failure) is a new test from the resume on; an inconclusive one resumed
bakes anew on its own window, as under threshold.
"""

from __future__ import annotations

from msgspec import UNSET

from coordinator.core import gates as gatelib
from coordinator.core import sequential
from coordinator.core.cohorts import NodeWindow, cohort_figures
from coordinator.core.engine_lost import Lost
from coordinator.core.engine_rollback import Rollback
from coordinator.core.engine_step import Step
from coordinator.core.engine_types import move_wave, peek
from coordinator.core.evidence import Evidence, short, unread
from coordinator.core.targets import old_slot as old_slot_of
from coordinator.core.targets import serving_slot
from protocol.durations import format_duration
from protocol.messages import WaveRecord

# How long past its end a bake waits for router counters that cover it (window_covers_bake)
# before its gates judge what they have; agents read the counters every 2 s.
STATS_GRACE = 10.0
# Sequential analysis weighs the evidence at most this often (the runner's tick): the agents of a
# big wave report one by one, and each weighing reads every node and persists the record.
EVIDENCE_EVERY = 0.2


class Bake:
    """The bake of a converged wave and its gates' verdict, over one working ``Step``; a failed
    wave goes to ``rollback.on_failure``, a lost node to ``lost``."""

    def __init__(self, step: Step, rollback: Rollback, lost: Lost) -> None:
        self.step = step
        self.rollback = rollback
        self.lost = lost

    def start_bake(self, wave: WaveRecord) -> None:
        move_wave(wave, "baking")
        if self.unchanged(wave) or not self.step.policy(wave).bakes:
            # Nothing to bake (staged slots carry no traffic): the gates judge now; the baseline
            # taken at the wave's start is kept for the next wave.
            wave.bake_until = self.step.now
            return
        wave.bake_until = self.step.now + self.step.spec.bake
        wave.baseline = self.step.snapshot()
        if self.step.spec.bake:
            self.step.emit("wave.baking", f"wave {wave.index + 1}: baking for "
                           f"{format_duration(self.step.spec.bake)}", wave=wave.index)

    def bake(self, wave: WaveRecord) -> None:
        r = self.step.r
        lost = self.lost.judge(wave, baking=True)
        for n in wave.nodes:
            p = r.nodes[n]
            seen = self.step.obs.get(n)
            if not p.online or p.state == "failed":
                pass  # lost and waited for, or failed as lost just now
            elif seen is not None and seen.generation > p.generation:
                pass  # someone else wrote a newer desired state; judged by the gates' figures
            elif p.target is None:
                pass  # already ran the release: nothing was written to it, no new slot to watch
            elif p.slot not in p.target.slots:
                pass  # a removal: no new slot to keep healthy
            elif seen is not None and seen.observed_generation >= p.generation:
                slot = seen.slots.get(p.slot)
                status = slot.status if slot is not None else "empty"
                if seen.phase == "failed" or status != "healthy":
                    why = seen.error or (slot.reason if slot is not None else "")
                    self.step.fail_node(p, f"new slot {p.slot} is {status} during the bake"
                                        + (f": {why}" if why else ""))
        failed = [r.nodes[n] for n in wave.nodes if r.nodes[n].state == "failed"]
        if failed:
            move_wave(wave, "failed")
            wave.finished = self.step.now
            why = "; ".join(f"{p.node}: {p.reason}" for p in failed)
            self.rollback.on_failure(wave, f"wave {wave.index + 1} failed: {why}")
            return
        if lost:
            return  # the verdict waits for them (and a promote skips gates, not lost nodes)
        if self.unchanged(wave):
            move_wave(wave, "passed")
            wave.finished = self.step.now
            wave.gates = {"outcome": "unchanged"}
            self.step.emit("gate.skipped", f"wave {wave.index + 1}: every node already runs "
                           f"{r.release.version}, nothing to judge", wave=wave.index)
            return
        if r.promote:
            move_wave(wave, "passed")
            wave.finished = self.step.now
            wave.gates = {"outcome": "promoted"}
            self.step.emit("gate.skipped",
                           f"wave {wave.index + 1}: promoted by operator, gates skipped",
                           wave=wave.index)
            if r.promote == "step":
                r.promote = ""
            return
        if self.step.now < wave.bake_until:
            self.early(wave)
            return
        # The grace for counters that cover the bake runs from the fleet's excuse too: while
        # the leader's bus is down, and until its agents are back on it, the counters it holds
        # were read before the outage; judging on them could pass a wave on part of its bake.
        grace = max(wave.bake_until, self.step.excused_until) + STATS_GRACE
        if self.step.now < grace and not self.window_covers_bake(wave):
            self.early(wave)
            return  # the agents' latest counters were read before the bake ended: wait for them
        self.conclude(wave, self.verdict(wave))

    def unchanged(self, wave: WaveRecord) -> bool:
        """Every node of the wave already ran the release, so none was written: no new slot
        serves, and there is nothing to bake or judge (a re-deploy of the same version)."""
        nodes = self.step.r.nodes
        return all(nodes[n].state == "done" and nodes[n].target is None for n in wave.nodes)

    def count_from_here(self, wave: WaveRecord) -> None:
        """Sequential analysis: the wave's evidence counts from now (a wave that starts or is
        retried; see the module docstring). A wave that carries no traffic of its own (a stage,
        a shadow judged by its own verdict) keeps to its bake's window."""
        policy = self.step.policy(wave)
        if self.step.spec.gates.analysis == "sequential" and policy.bakes and not policy.stages:
            wave.evidence_from = self.step.snapshot()

    def early(self, wave: WaveRecord) -> None:
        """Sequential analysis: weigh the evidence so far whenever fresh counters came in, and
        fail the wave at once if it crossed the bound (see the module docstring)."""
        if self.step.spec.gates.analysis != "sequential" or self.step.r.promote:
            return  # (a promoted wave's gates are skipped, its evidence too)
        if wave.state == "updating" and wave.evidence_from is UNSET:
            return  # a stage or shadow wave: nothing serves the new release yet
        # Agents stamp their counters with their read time (older ones do not: the requests
        # still tell new counters apart), so a new mark means a new report.
        seen = [o.router for n, o in self.step.obs.items()
                if n in self.step.r.nodes and o.router is not None]
        mark = [sum(x.time for x in seen),
                sum(t.requests for x in seen for t in x.slots.values())]
        last = wave.gates.get("evidence_at")
        if wave.gates.get("evidence_mark") == mark or (
                isinstance(last, (int, float)) and self.step.now < last + EVIDENCE_EVERY):
            return
        verdict = self.verdict(wave, over=False)
        if verdict.outcome == "fail":
            self.conclude(wave, verdict)
        else:
            wave.gates = verdict.figures | {"outcome": wave.state, "evidence_mark": mark,
                                            "evidence_at": self.step.now}

    def conclude(self, wave: WaveRecord, verdict: gatelib.Verdict) -> None:
        """Act on the gates' verdict: the next wave, ``on_failure``, or a pause."""
        wave.gates = verdict.figures | {"outcome": verdict.outcome,
                                        "reasons": list(verdict.reasons)}
        if verdict.outcome == "pass":
            move_wave(wave, "passed")
            wave.finished = self.step.now
            self.step.emit("gate.passed", f"wave {wave.index + 1}: gates passed", wave=wave.index,
                           **verdict.figures)
        elif verdict.outcome == "fail":
            move_wave(wave, "failed")
            wave.finished = self.step.now
            self.step.emit("gate.failed", f"wave {wave.index + 1}: {verdict.reason}",
                           wave=wave.index, **verdict.figures)
            self.rollback.on_failure(wave, f"wave {wave.index + 1} gates failed: {verdict.reason}")
        else:
            move_wave(wave, "inconclusive")
            self.step.emit("gate.inconclusive", f"wave {wave.index + 1}: {verdict.reason}",
                           wave=wave.index, **verdict.figures)
            self.step.pause(f"wave {wave.index + 1} gates inconclusive: {verdict.reason}")

    def window_covers_bake(self, wave: WaveRecord) -> bool:
        """Whether every wave node's router counters span the whole bake since its baseline.

        Agents read their router's counters every few seconds, so the snapshots the bake starts
        and ends with are each up to that old, and a short bake could be judged on a window of
        almost nothing. Both snapshots carry the agent's read time (one clock per node, so no
        skew between hosts matters): the window is complete once they are ``bake`` apart.
        Unknown times (older agents), no baseline or a restarted router cannot be waited for.
        """
        for n in wave.nodes:
            seen = self.step.obs.get(n)
            if short(wave.baseline.get(n), seen.router if seen is not None else None,
                     self.step.spec.bake):
                return False
        return True

    def verdict(self, wave: WaveRecord, over: bool = True) -> gatelib.Verdict:
        """The gates' verdict on the wave's traffic since its baseline (a sequential wave's:
        since it started); ``over``: whether the bake has ended (before it, only the sequential
        evidence is read: a wave's own verdict, a shadow's, is for its end)."""
        policy = self.step.policy(wave)
        own = policy.verdict(self.step, wave) if over else None
        if own is not None:
            return own
        gates = policy.gates(self.step.spec.gates)
        check_read = over and policy.bakes and gatelib.reads_traffic(gates)
        new, old, mirror, history = [], [], [], []
        cohort: list[NodeWindow] = []
        healthy = 0
        evidence = Evidence()
        since = wave.evidence_from or {}
        release = self.step.r.release
        members = set(wave.nodes)  # a list: a lookup per node was O(fleet x wave) per verdict
        for n, p in peek(self.step.r.nodes):  # read only
            seen = self.step.obs.get(n)
            end = seen.router if seen is not None else None
            start = since.get(n) or wave.baseline.get(n)
            in_wave = n in members
            if start is None and (wave.state == "updating" or (end is None and not in_wave)):
                # No count to start from yet (its slot may hold an older release's), or a node
                # of another wave with counters at neither end: no traffic, nothing to distrust.
                continue
            old_slot = old_slot_of(p.previous, p.slot, release)
            # A node's figures are judged only where they are read, and left out as a whole.
            # At the bake's end a new slot with no counters that cover it is left out too (the
            # grace for them has passed).
            if (in_wave and check_read and p.slot
                    and (p.target is None or p.slot in p.target.slots)
                    and (why := unread(wave.baseline.get(n), end, self.step.spec.bake))):
                evidence.add({n: why})
            elif (old_slot is not None or in_wave) and evidence.admits(n, start, end):
                if old_slot is not None:
                    old.append(gatelib.window(start, end, old_slot))
                    history.append(gatelib.window(None, start, old_slot))
                if in_wave:
                    new.append(gatelib.window(start, end, p.slot))
                    mirror.append(gatelib.mirror_window(start, end))
                    cohort.append((start, end, p.slot, old_slot))
            if in_wave:
                slot = seen.slots.get(p.slot) if seen is not None else None
                healthy += slot is not None and slot.status == "healthy"
        old, reference = policy.old_traffic(self.step, wave, old, evidence)
        fig = gatelib.figures(len(wave.nodes), healthy, new, old, mirror, evidence.untrusted)
        if gates.analysis == "sequential":
            verdict = sequential.evaluate(
                gates, fig, gatelib.total(history).latency, over=over,
                names=(self.step.r.release.version, old_version(self.step)))
        else:
            verdict = gatelib.evaluate(gates, fig)
        if reference:
            verdict.figures["p99_old_from"] = reference
        verdict.figures.update(cohort_figures(cohort))
        return verdict


def old_version(step: Step) -> str:
    """The version the target nodes served before the rollout, for the gates' words."""
    for _, p in peek(step.r.nodes):
        serving = serving_slot(p.previous)
        if p.previous is not None and serving is not None:
            return p.previous.slots[serving].version
    return "the old release"
