"""Pre-staging in the engine's step: the nodes of the next waves start their new slot at weight 0.

Theory of operation (``core.staging`` has the vocabulary and the arithmetic): while the rollout
runs forward, the nodes of the ``Step.ahead`` waves after the running one that were never written
to are given their wave policy's ``stage`` target (the new release in the idle slot at weight 0;
``p.staged = "staging"``). Level-triggered on every step, ``check`` watches them until their own
wave starts: the new slot healthy on that target (``node_table.settled``) is ``staged``; the
agent reporting failure, or no healthy slot by ``--progress-deadline`` after the write, is a
staging failure. A staging failure is handled as a failed update is, before its wave:
``--on-failure rollback`` rolls back every touched node (staged ones included: their previous
desired state again stops the staged slot), ``pause`` pauses with the reason, and ``resume``
stages the node again.

A staged node stays ``waiting`` (its old slot serves all of its traffic), so being staged never
counts against max-unavailable (an old slot unhealthy on its own does, staged or not). When its
wave starts, the policy's ``target`` reuses ``p.slot``: the agent finds the slot running and
healthy and only moves the router's weights. An abort gives the staged nodes their previous
desired state, so no staged slot is left running.
"""

from __future__ import annotations

from coordinator.core import staging
from coordinator.core.engine_rollback import Rollback
from coordinator.core.engine_step import Step
from coordinator.core.engine_types import old_slot_failing, peek_node, settled
from coordinator.core.targets import restore_target, runs
from protocol.durations import format_duration
from protocol.messages import NodeProgress


class Prestage:
    """The staged nodes of the waves ahead, over one working ``Step``."""

    def __init__(self, step: Step, rollback: Rollback) -> None:
        self.step = step
        self.rollback = rollback

    def ahead(self) -> list[tuple[int, NodeProgress]]:
        """The nodes staged (or staging, or failed staging) whose wave has not started, with
        that wave: only the window's waves are looked at, so a step costs O(window), not
        O(fleet). Read only (``peek_node``): a caller that changes one takes it first
        (``take``); taking every one copied the window's nodes on every step."""
        r, found = self.step.r, []
        for index in staging.window(r.current_wave, self.step.ahead, len(r.waves)):
            for n in r.waves[index].nodes:
                p = peek_node(r.nodes, n)
                if p.wave < 0 and p.staged:
                    found.append((index, p))
        return found

    def take(self, p: NodeProgress) -> NodeProgress:
        """The step's own copy of ``p`` (read through ``ahead``), to change."""
        return self.step.r.nodes[p.node]

    def watched(self) -> list[tuple[int, NodeProgress]]:
        """What ``check`` must judge this step, as ``ahead`` (in its order): the whole window
        when a staging node's deadline may have passed (or nothing is known yet), else only the
        window's nodes whose report or progress changed in this step: whatever else is in the
        window was judged at an earlier step on the same report, progress and deadline. The
        window's O(fleet / waves) nodes read on every step were the engine's largest cost at
        50,000 nodes (``bench_engine``)."""
        step, memo = self.step, self.step.stage_memo
        r = step.r
        if memo.running != r.current_wave:
            memo.running, memo.due = r.current_wave, None
            memo.place = {n: (index, i)
                          for index in staging.window(r.current_wave, step.ahead, len(r.waves))
                          for i, n in enumerate(r.waves[index].nodes)}
        names, memo.pending = memo.pending | step.changed(), frozenset()
        if memo.due is None or step.passed(memo.due):
            found, due = self.ahead(), float("inf")
        else:
            places = sorted((memo.place[n], n) for n in names if n in memo.place)
            found = [(index, p) for (index, _), n in places
                     if (p := peek_node(r.nodes, n)).wave < 0 and p.staged]
            due = memo.due
        # Every staging node judged counts, also one the last full read left out (offline
        # then, back now).
        memo.due = min([due, *(p.stage_deadline for _, p in found
                               if p.staged == "staging" and p.target is not None and p.online)])
        return found

    def check(self) -> bool:
        """Judge the staging nodes (level-triggered over ``watched``); False if a failure
        stopped the rollout."""
        step = self.step
        failed: list[str] = []
        for index, p in self.watched():
            target = p.target
            if p.staged == "failed" or target is None:
                continue
            seen = step.obs.get(p.node)
            if (seen is not None and seen.generation >= p.generation and seen.phase == "failed"
                    and not old_slot_failing(seen, target, p.slot)):
                p = self.take(p)
                self.fail(p, index, f"agent reports failure: {seen.error or 'no reason given'}")
            elif p.staged == "staged":
                continue
            elif seen is not None and settled(seen, target, p.slot):
                p = self.take(p)
                p.staged = "staged"
                step.emit("node.staged", f"{p.node}: {step.r.release.version} healthy in slot "
                          f"{p.slot} at weight 0, ahead of wave {index + 1}", p.node,
                          generation=p.generation, slot=p.slot, wave=index)
                continue
            elif p.online and step.passed(p.stage_deadline):
                p = self.take(p)
                limit = format_duration(step.spec.progress_deadline)
                got = seen.observed_generation if seen else "none"
                self.fail(p, index, f"not healthy within {limit} (observed generation {got}, "
                             f"wanted {p.generation})")
            else:
                continue
            failed.append(f"{p.node}: {p.reason}")
        if not failed:
            return True
        # The same policy as a failed update, applied before the node's wave: the rollout
        # learns of a bad node (or a bad release) a wave early. No wave failed (the running
        # one may be fine): the nodes' ``node.failed`` and the rollback or pause say it.
        why = f"staging failed: {'; '.join(failed)}"
        if step.spec.on_failure == "pause":
            step.pause(why)
        else:
            self.rollback.start_rollback(why)
        return False

    def fail(self, p: NodeProgress, wave: int, reason: str) -> None:
        """A staging failure: reported like a failed node, with the wave it was staged for; the
        node stays ``waiting`` (its old slot still serves) and touched (rolled back if the
        rollout is)."""
        p.staged = "failed"
        p.reason = f"staging for wave {wave + 1}: {reason}"
        self.step.emit("node.failed", f"{p.node}: {p.reason}", p.node, reason=p.reason,
                       staging=True, wave=wave)

    def stage(self) -> None:
        """Stage the nodes of the waves in the window that were never written to."""
        step = self.step
        r = step.r
        if r.state != "running" or r.phase == "rollback" or not step.ahead:
            return
        for index in staging.window(r.current_wave, step.ahead, len(r.waves)):
            wave = r.waves[index]
            policy = step.policy(wave)
            for n in wave.nodes:
                p = peek_node(r.nodes, n)
                if p.wave >= 0 or p.staged or not p.online or runs(p.previous, r.release):
                    continue  # already in a wave, staged, unreachable, or nothing to stage
                p = r.nodes[n]  # taken: staging changes it
                desired = policy.stage(step, p, wave)
                if desired is None:
                    continue
                step.write(p, desired)
                p.staged = "staging"
                p.stage_deadline = step.now + step.spec.progress_deadline
                if step.stage_memo.due is not None:
                    step.stage_memo.due = min(step.stage_memo.due, p.stage_deadline)
                step.emit("node.staging", f"{n}: {r.release.version} in slot {p.slot} at "
                          f"weight 0 ahead of wave {index + 1} (generation {p.generation})", n,
                          generation=p.generation, slot=p.slot, wave=index)

    def resumed(self) -> None:
        """An operator resumed after a staging failure: those nodes are staged again."""
        for _, p in self.ahead():
            if p.staged == "failed":
                p = self.take(p)
                p.staged, p.reason = "", ""

    def aborted(self) -> None:
        """The rollout is aborted: every node staged ahead of its wave gets its previous
        desired state again, which stops the staged slot."""
        step = self.step
        undone = []
        for _, p in self.ahead():
            if p.target is None or p.state != "waiting":
                continue  # never written, or a rollback's restore already went out
            p = self.take(p)
            step.write(p, restore_target(
                p.previous, fleet=step.fleet, node=p.node, service=step.spec.service,
                generation=step.next_generation(p), rollout=step.r.id, now=step.now))
            p.staged = ""
            undone.append(p.node)
        if undone:
            step.emit("rollout.unstaged", f"{len(undone)} staged nodes back on their previous "
                      f"state: {', '.join(undone[:5])}" + (" ..." if len(undone) > 5 else ""),
                      nodes=undone)
