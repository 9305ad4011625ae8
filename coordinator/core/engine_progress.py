"""Forward progress of one ``handle`` call: the events applied, then the waves advanced.

``Progress`` applies each event to the working ``Step`` (operator requests, observed states,
nodes going offline or online, ticks) and then ``advance`` moves the rollout as far as what is
known allows: start a wave, start its nodes within max-unavailable, check them, and hand a
converged wave to ``Bake``; a failed wave goes to ``Rollback``. A node of the wave that goes
offline is *lost*, and ``Lost`` (``engine_lost``) applies the rollout's ``on_node_lost`` policy to
it. It is level-triggered, so running ``advance`` after any event is safe. See ``core.engine`` for
the vocabulary.
"""

from __future__ import annotations

import heapq

from msgspec import UNSET

from coordinator.core.engine_bake import Bake
from coordinator.core.engine_lost import Lost
from coordinator.core.engine_prestage import Prestage
from coordinator.core.engine_rollback import Rollback
from coordinator.core.engine_step import Step, down_why
from coordinator.core.engine_types import (
    Abort,
    EngineEvent,
    NodeOffline,
    NodeOnline,
    ObservedChanged,
    Pause,
    Promote,
    Resume,
    RollbackRequested,
    Start,
    Tick,
    converged,
    move_node,
    move_wave,
    old_slot_failing,
    peek,
    peek_node,
    settled,
)
from coordinator.core.targets import runs, serving_slot
from protocol.durations import format_duration
from protocol.messages import NodeProgress, ObservedState, WaveRecord


def reported(seen: ObservedState, version: str) -> tuple[bool, str]:
    """What a node's report says of it: whether a slot with traffic is healthy, and the
    version its heaviest slot serves (``version``, what was known, if it names none)."""
    healthy = False
    serving, most = None, 0
    for slot, weight in seen.weights.items():  # per node per report: a loop, not any() + max()
        if serving is None or weight > most:
            serving, most = slot, weight
        if weight > 0 and not healthy and (s := seen.slots.get(slot)) is not None:
            healthy = s.status == "healthy"
    return healthy, seen.slots[serving].version if serving in seen.slots else version


class Progress:
    """The events and the forward progress through the waves of one ``handle`` call, over its
    working ``Step`` (the primitives), with the ``Bake`` and ``Rollback`` concerns beside it."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.rollback = Rollback(step)
        self.lost = Lost(step)
        self.bakes = Bake(step, self.rollback, self.lost)
        self.prestage = Prestage(step, self.rollback)

    # -- events ------------------------------------------------------------------------------------

    def apply(self, event: EngineEvent) -> None:
        r = self.step.r
        match event:
            case Start():
                self.step.move("running")
                self.step.emit(
                    "rollout.started",
                    f"rolling {r.spec.service} from {r.from_version or '(nothing)'} to "
                    f"{r.release.version or '(nothing)'} on {len(r.nodes)} nodes in "
                    f"{len(r.waves)} waves "
                    f"({r.spec.strategy}, max-unavailable {self.step.cap})",
                    strategy=r.spec.strategy, nodes=len(r.nodes), waves=len(r.waves),
                    max_unavailable=self.step.cap,
                )
                for node in r.report.skipped_cordoned or ():
                    self.step.emit("rollout.node.skipped", f"{node} cordoned: skipped", node,
                                   why="cordoned")
            case ObservedChanged(node=node, observed=seen):
                self.observe(node, seen)
            case NodeOffline(node=node) | NodeOnline(node=node):
                p = r.nodes.get(node)
                online = isinstance(event, NodeOnline)
                if p is not None and p.online != online:
                    p.online = online
                    if online:
                        self.lost.returned(node)
                        if p.staged == "staging" and p.wave < 0:
                            # Staging ahead of its wave and back (a reboot while the running
                            # wave baked): a whole deadline from now, as if written now; failed
                            # at once, before it could report, it rolled the rollout back.
                            p.stage_deadline = max(p.stage_deadline,
                                                   self.step.now + self.step.spec.progress_deadline)
                    kind = "node.online" if online else "node.offline"
                    self.step.emit(f"rollout.{kind}", f"target node {node} is "
                                   f"{'back online' if online else 'offline'}"
                                   + ("" if online else self.lost.waiting_note(node)), node)
            case Tick():
                pass
            case Pause(reason=reason):
                self.step.pause(reason)
            case Resume():
                self.resume()
            case Promote(full=full):
                r.promote = "full" if full else "step"
                what = "every remaining bake and gate" if full else "this wave's bake and gates"
                self.step.emit("rollout.promoted", f"promoted: skipping {what}", full=full)
                if r.state == "paused":
                    self.resume()
            case Abort(reason=reason):
                self.prestage.aborted()
                if r.phase != "rollback":  # a rollback's restores went out already
                    self.restore_failed()
                self.step.finish("aborted", reason)
            case RollbackRequested(reason=reason):
                if r.state == "paused":
                    self.step.move("running")
                self.rollback.start_rollback(reason)

    def restore_failed(self) -> None:
        """An abort stops where it is, but a node that failed is given its previous desired
        state again: its new release never served (its old slot still does), and left
        wanted at full weight, it was what the next rollout planned from: the failed
        release taken for the serving one, that rollout failed and rolled back to it (the
        service took no deploy nor rollback after such an abort)."""
        step, r = self.step, self.step.r
        back = []
        for n, p in peek(r.nodes):
            if p.state != "failed" or p.target is None:
                continue
            p = r.nodes[n]
            step.write(p, self.rollback.restore(p))
            back.append(n)
        if back:
            step.emit("rollout.restored", f"{len(back)} failed nodes back on their previous "
                      f"state: {', '.join(back[:5])}" + (" ..." if len(back) > 5 else ""),
                      nodes=back)

    def observe(self, node: str, seen: ObservedState) -> None:
        """Keep ``seen`` as the node's latest report; the node's progress is taken (copied)
        only if its health or version changes: agents re-report every few seconds."""
        nodes = self.step.r.nodes
        p = peek_node(nodes, node) if node in nodes else None
        if p is None or seen.node != node or seen.service != self.step.spec.service:
            return  # not ours, or a payload claiming another key: the runner logs it
        last = self.step.obs.get(node)
        if last is not None and seen.time < last.time:
            return  # a late report: a newer one was already seen
        self.step.see(node, seen)
        healthy, version = reported(seen, p.version)
        if p.target is not None and not p.target.slots and converged(seen, p.target):
            version = ""  # removed: it runs nothing now
        if (p.healthy, p.version) != (healthy, version):
            p = nodes[node]
            p.healthy, p.version = healthy, version
        for policy in self.step.policies:
            policy.observed(self.step, p, seen)

    # -- operator requests -------------------------------------------------------------------------

    def resume(self) -> None:
        r = self.step.r
        self.step.move("running")
        r.reason = r.paused_by = ""
        self.prestage.resumed()
        wave = r.waves[r.current_wave]
        if wave.state == "failed":
            retried = []
            for n in wave.nodes:
                p = r.nodes[n]
                if p.state == "waiting":
                    p.reason = ""
                elif p.state == "failed":
                    move_node(p, "waiting")
                    p.reason = ""
                    retried.append(n)
                    if p.online and p.target is not None:
                        # Written and failed: already counted as unavailable, so a retry costs
                        # nothing; nodes never written wait for capacity like any other.
                        self.start_node(p, wave)
            move_wave(wave, "updating")
            wave.deadline = self.step.now + self.step.spec.progress_deadline
            # A retry is a new test: the evidence that failed the wave is not counted again.
            self.bakes.count_from_here(wave)
            self.step.emit("rollout.resumed", f"resumed: retrying wave {wave.index + 1}",
                           wave=wave.index, retried=retried)
            return
        if wave.state == "inconclusive":
            # A new bake, judged on its own window as under threshold analysis.
            wave.evidence_from = UNSET
            self.bakes.start_bake(wave)
        elif wave.state == "updating":
            wave.deadline = self.step.now + self.step.spec.progress_deadline
        self.step.emit("rollout.resumed", f"resumed at wave {wave.index + 1}", wave=wave.index)

    # -- forward progress --------------------------------------------------------------------------

    def advance(self) -> None:
        """Move as far as what is known allows (level-triggered: safe to run after any event)."""
        r = self.step.r
        if r.state != "running":
            return
        if r.phase == "rollback":
            self.rollback.advance_rollback()
            return
        if not self.prestage.check():
            return
        self.advance_waves()
        self.prestage.stage()

    def advance_waves(self) -> None:
        r = self.step.r
        while True:
            wave = r.waves[r.current_wave]
            if wave.state == "waiting":
                self.start_wave(wave)
            if wave.state == "updating":
                self.update_wave(wave)
            if wave.state == "baking":
                self.bakes.bake(wave)
            if wave.state != "passed":
                return
            if r.current_wave + 1 >= len(r.waves):
                if not self.step.policy(wave).keep_warm(self.step):
                    self.succeed()
                return
            r.current_wave += 1

    def start_wave(self, wave: WaveRecord) -> None:
        for done in self.step.r.waves[:max(0, wave.index - 1)]:
            # Only this wave's baseline and the one before it are ever read again (the bake's
            # window, the switch's old traffic): a snapshot of every node per wave would make
            # the record grow with waves x nodes.
            done.baseline = {}
        for done in self.step.r.waves[:wave.index]:
            done.evidence_from = UNSET  # read only while its own wave runs
        move_wave(wave, "updating")
        wave.started = self.step.now
        wave.deadline = self.step.now + self.step.spec.progress_deadline
        for n in wave.nodes:
            p = self.step.r.nodes[n]
            p.wave = wave.index
            move_node(p, "waiting")
            p.reason = ""
        policy = self.step.policy(wave)
        if policy.stages:
            # The next wave's window of old traffic starts here (blue-green's switch reads it).
            wave.baseline = self.step.snapshot()
        self.bakes.count_from_here(wave)
        kind = policy.kind
        self.step.emit("wave.started", f"wave {wave.index + 1}: {len(wave.nodes)} nodes at weight "
                       f"{wave.weight}%" + (f" ({kind})" if kind else ""), wave=wave.index,
                       nodes=wave.nodes, weight=wave.weight, wave_kind=kind)
        policy.started(self.step, wave)

    def short_of_room(self, unavailable: set[str]) -> str:
        """Why a wave's node cannot start: the nodes without a healthy serving slot, each with
        why (``down_why``), against max-unavailable."""
        r, names = self.step.r, heapq.nsmallest(3, unavailable)
        more = len(unavailable) - len(names)
        who = ", ".join(f"{n} {down_why(peek_node(r.nodes, n), self.step.obs.get(n))}"
                        for n in names) + (f" and {more} more" if more else "")
        return (f"{len(unavailable)} target nodes unavailable ({who}; max-unavailable "
                f"{self.step.cap})")

    def start_node(self, p: NodeProgress, wave: WaveRecord) -> None:
        step = self.step
        desired = step.policy(wave).target(step, p, wave)
        move_node(p, "updating")
        # Every node written has a whole --progress-deadline to converge: the wave's deadline
        # runs from its last start (progress), as a wave wider than max-unavailable starts its
        # nodes a few at a time (a canary's 100% step, a weighted wave); from the wave's start
        # alone, its last nodes failed as they were written ("did not converge within 2m").
        wave.deadline = max(wave.deadline, step.now + step.spec.progress_deadline)
        self.step.write(p, desired)
        if p.slot in desired.slots:
            # ``staged``: its slot was already healthy, so this is a router switch.
            staged = p.staged == "staged"
            step.emit("node.updating", f"{p.node}: {step.r.release.version} in slot {p.slot} at "
                      f"weight {wave.weight}% (generation {p.generation})"
                      + (", staged" if staged else ""), p.node,
                      generation=p.generation, slot=p.slot, weight=wave.weight,
                      **({"staged": True} if staged else {}))
        else:
            step.emit("node.updating", f"{p.node}: {step.spec.service} removed: router closes, "
                      f"slots stop (generation {p.generation})", p.node,
                      generation=p.generation, slot="", weight=0)

    def update_wave(self, wave: WaveRecord) -> None:
        """One step of an updating wave. Its nodes are read through ``peek_node`` and taken
        (copied, ``NodeTable``) only when this step changes them: a step about a few reports
        of a 5,000-node wave copied all 5,000."""
        r = self.step.r
        lost = self.lost.judge(wave)  # under fail they fail now; under wait, at the deadline
        # One pass over the wave checks its updating nodes and counts what the rest of the step
        # asks (a step about a few reports of a big wave made five).
        done = 0
        failing = waiting = False
        for n in wave.nodes:
            state = peek_node(r.nodes, n).state
            if state == "updating":
                self.check_node(n)
                state = peek_node(r.nodes, n).state
            if state == "done":
                done += 1
            elif state == "failed":
                failing = True
            elif state == "waiting":
                waiting = True
        unavailable = self.step.unavailable()
        # Staging at weight 0 and switching to a staged healthy slot stop no node from serving:
        # the wave's policy says whether max-unavailable bounds it.
        policy = self.step.policy(wave)
        # A wave with a failed node starts no other: it fails in this step (the pause would
        # leave a node written forward in a paused rollout; the rollback, a write undone at once).
        starting = waiting and not failing
        for n in wave.nodes if starting else ():
            if peek_node(r.nodes, n).state != "waiting":
                continue
            p = r.nodes[n]
            if (p.target is None and (wave.weight == 100 or policy.stages)
                    and runs(p.previous, r.release)):
                move_node(p, "done")
                # Its serving slot holds the release: that is the slot its health and new
                # traffic are read from (``Bake.verdict``), and it is no old slot.
                p.slot = serving_slot(p.previous) or ""
                self.step.emit("node.done", f"{n}: already runs {r.release.version}", n)
            elif not p.online:
                continue  # lost, and waited for (``fail`` failed it above): never written to
            elif not policy.bounded or n in unavailable or len(unavailable) < self.step.cap:
                # (A waiting node counted already is unhealthy on its own: starting it takes
                # nothing more out of service, whatever the count.)
                self.start_node(p, wave)
                unavailable.add(n)
            # (else it waits for room; at the deadline the wave fails, or the rollout pauses,
            # saying which nodes took it)
        # (Starting fails no node: only a failing wave has failed nodes.)
        failed = ([r.nodes[n] for n in wave.nodes if peek_node(r.nodes, n).state == "failed"]
                  if failing else [])
        if not failed and self.step.passed(wave.deadline):
            limit = format_duration(self.step.spec.progress_deadline)
            room = ""
            held = [n for n in wave.nodes if peek_node(r.nodes, n).state == "waiting"]
            if held and not any(peek_node(r.nodes, n).state == "updating" for n in wave.nodes):
                # Only nodes this rollout never moved (unhealthy or offline on their own) keep
                # the held ones from starting: no failure of the release, and a rollback would
                # move back every node it fixed. Paused, whatever --on-failure says.
                members = set(wave.nodes)
                outside = [n for n in unavailable if n not in members]
                if outside and all((q := peek_node(r.nodes, n)).state == "waiting"
                                   and not q.staged for n in outside):
                    self.step.pause(
                        f"wave {wave.index + 1}: {len(held)} nodes could not start within "
                        f"{limit}: {self.short_of_room(unavailable)}; nodes this rollout never "
                        "moved hold the room: resume once they are back and well, or roll back")
                    return
            for n in wave.nodes:
                if peek_node(r.nodes, n).state not in ("updating", "waiting"):
                    continue
                p = r.nodes[n]
                if p.state == "updating":
                    seen = self.step.obs.get(n)
                    got = seen.observed_generation if seen else "none"
                    self.step.fail_node(p, f"did not converge within {limit} (observed "
                                        f"generation {got}, wanted {p.generation})")
                    failed.append(p)
                elif p.state == "waiting":
                    # Never started, so not disrupted: it stays waiting (and counts as
                    # unavailable only if unhealthy on its own), but the wave cannot pass
                    # without it.
                    # Named, so that a node lost in an earlier wave is seen to be the cause.
                    # Said once for the wave (its unavailable nodes may be most of a fleet).
                    room = room or self.short_of_room(unavailable)
                    p.reason = f"could not start within {limit}: {room}"
                    failed.append(p)
        if failed:
            move_wave(wave, "failed")
            wave.finished = self.step.now
            why = "; ".join(f"{p.node}: {p.reason}" for p in failed)
            self.rollback.on_failure(wave, f"wave {wave.index + 1} failed: {why}")
            return
        if starting:  # nodes started (or found on the release) since they were counted
            done = sum(peek_node(r.nodes, n).state == "done" for n in wave.nodes)
        if not lost and done == len(wave.nodes):
            self.step.emit("wave.converged", f"wave {wave.index + 1}: all {len(wave.nodes)} nodes "
                           "converged", wave=wave.index)
            policy.converged(self.step, wave)
            self.bakes.start_bake(wave)
        else:
            # A node already switched serves the new release to users: its errors are evidence
            # before the others converge (sequential analysis only: ``Bake.early``).
            self.bakes.early(wave)

    def check_node(self, node: str) -> None:
        """An updating node against its latest report; read only until it changes."""
        p = peek_node(self.step.r.nodes, node)
        seen = self.step.obs.get(node)
        if (seen is not None and seen.generation >= p.generation and seen.phase == "failed"
                and not (p.target is not None and old_slot_failing(seen, p.target, p.slot))):
            # (A failure of its old slot alone is none of its own: ``old_slot_failing``.)
            self.step.fail_node(self.step.r.nodes[node],
                                f"agent reports failure: {seen.error or 'no reason given'}")
        elif not p.online:
            pass  # lost and waited for: not done until it is back (the deadline bounds it)
        elif (seen is not None and p.target is not None
              and (settled(seen, p.target, p.slot) if p.slot in p.target.slots
                   else converged(seen, p.target))):
            # Its new slot healthy, at weight 0 too (a blue-green's or shadow's stage), and
            # converged unless its old slot is not healthy (``settled``); a removal's target has
            # no slot: converged on it is done.
            p = self.step.r.nodes[node]
            move_node(p, "done")
            self.step.emit("node.done", f"{p.node}: converged on generation {p.generation}", p.node,
                           generation=p.generation)

    def succeed(self) -> None:
        # Said first: the success is the last wave's verdict, not the writes that follow it.
        # What is left behind is the last wave's business (the old slots retired, or a shadow
        # without --then retired, its report kept), written after the record says succeeded
        # (one Persist before both, as ever) and announced by events of its own; said after
        # them, the success waited for a write to every node (30 ms at 10 nodes, seconds at
        # 10,000) before a followed deploy could return. A deploy of the service meanwhile
        # waits for those writes (``Runner._finishing``); a takeover makes them.
        self.step.finish("succeeded", "")
        self.step.policy(self.step.r.waves[-1]).succeed(self.step)
