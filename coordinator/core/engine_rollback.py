"""The rollback phase of the engine's step: what a failed wave leads to, and undoing a rollout.

Theory of operation: a wave that fails (a node failed, a deadline passed, the gates said fail) goes
to ``on_failure``: with ``--on-failure pause`` (and not a wave that only stages the release, which
serves nothing new) the rollout pauses for an operator; otherwise ``start_rollback`` writes every
touched node's previous desired state (or the rollback target a wave's policy gives: blue-green
switches back to the old slots first), each with a higher generation, in one wave.
``advance_rollback`` then checks each node level-triggered, as ``Step.advance`` does forward: a node
is *rolled back* once it converged on that state, and fails when it reports phase ``failed`` or has
not converged by ``rollback_deadline``. The rollout ends ``rolled_back``, or ``failed`` naming the
nodes that did not make it back.
"""

from __future__ import annotations

from coordinator.core.engine_step import Step
from coordinator.core.engine_types import converged, move_node, peek, peek_node
from coordinator.core.targets import restore_target
from protocol.durations import format_duration
from protocol.messages import DesiredState, NodeProgress, WaveRecord


class Rollback:
    """A failed wave and the rollback phase, over one working ``Step``."""

    def __init__(self, step: Step) -> None:
        self.step = step

    def on_failure(self, wave: WaveRecord, reason: str) -> None:
        self.step.emit("wave.failed", reason, wave=wave.index)
        # A failed stage or shadow ends the rollout: nothing serves the new release yet, so
        # there is nothing to hold for an operator, and staged slots would only burn resources.
        if self.step.spec.on_failure == "pause" and not self.step.policy(wave).stages:
            self.step.pause(reason)
        else:
            self.start_rollback(reason)

    def start_rollback(self, reason: str) -> None:
        r = self.step.r
        r.phase, r.reason, r.rollback_by = "rollback", reason, self.step.who
        r.rollback_deadline = self.step.now + self.step.spec.progress_deadline
        touched = sorted(n for n, p in peek(r.nodes) if p.target is not None)
        for n in [n for n, p in peek(r.nodes) if p.target is None and p.state == "failed"]:
            move_node(r.nodes[n], "waiting")  # never written to, so still on its previous version
        self.step.emit("rollout.rolling_back", f"rolling back {len(touched)} nodes: {reason}",
                       reason=reason, nodes=touched)
        policies = self.step.policies
        for n in touched:
            p = r.nodes[n]
            move_node(p, "rolling_back")
            p.reason = ""
            back = next((t for policy in policies
                         if (t := policy.rollback_target(self.step, p)) is not None), None)
            self.step.write(p, back or self.restore(p))
        for policy in policies:
            policy.rollback_started(self.step)
        self.advance_rollback()

    def restore(self, p: NodeProgress) -> DesiredState:
        return restore_target(
            p.previous, fleet=self.step.fleet, node=p.node, service=self.step.spec.service,
            generation=self.step.next_generation(p), rollout=self.step.r.id, now=self.step.now,
        )

    def advance_rollback(self) -> None:
        """Check every rolling-back node: read only (``peek``), a node's progress is taken
        (copied, ``NodeTable``) only when this step changes it, so that a step about the last
        few nodes of a 10,000-node rollback does not copy the other 9,990."""
        r = self.step.r
        memo = self.step.back_memo
        waiting: list[str] = []
        back: list[str] = []  # switched back, both slots kept: the new one to retire
        for n, seen_p in peek(r.nodes):
            target = seen_p.target
            if seen_p.state != "rolling_back" or target is None:
                continue
            seen = self.step.obs.get(n)
            if seen is None:
                waiting.append(n)
                continue
            # A node's verdict changes only with its report, its target or its previous state
            # (all replaced, never edited): remembered, so that a step about the last few
            # reports does not check again the 10,000 nodes already back.
            known = memo.get(n)
            if (known is not None and known[0] is seen and known[1] is target
                    and known[2] is seen_p.previous):
                done, keeps = known[3], known[4]
            else:
                done = converged(seen, target)
                keeps = done and _keeps_new_slot(seen_p)
                memo[n] = (seen, target, seen_p.previous, done, keeps)
            if done and keeps:
                back.append(n)
            elif done:
                move_node(r.nodes[n], "rolled_back")
                self.step.emit("node.rolled_back",
                               f"{n}: back on generation {seen_p.generation}", n)
            elif seen.generation >= seen_p.generation and seen.phase == "failed":
                self.step.fail_node(r.nodes[n],
                                    f"rollback failed: {seen.error or 'no reason given'}")
            else:
                waiting.append(n)
        if waiting and self.step.passed(r.rollback_deadline):
            limit = format_duration(self.step.spec.progress_deadline)
            for n in waiting:
                p = r.nodes[n]
                self.step.fail_node(p, f"did not converge back within {limit}"
                                    + ("" if p.online else " (offline)"))
            waiting = []
        # The new slots are retired once no node is still switching back: the switch back is
        # what users feel, and retiring the first nodes' slots while the others still wait for
        # theirs would put those writes ahead of the rest of it.
        if back and not any(_keeps_new_slot(peek_node(r.nodes, n)) for n in waiting):
            # The retirement's writes get a whole deadline of their own (the switch back may
            # have used nearly all of its: retired with seconds left, nodes back for minutes
            # failed with "did not converge back" and the rollout ended failed, not rolled back).
            r.rollback_deadline = max(r.rollback_deadline,
                                      self.step.now + self.step.spec.progress_deadline)
            # What users feel is done: said before the retirement's writes, so that its event
            # goes out without waiting for them (``Executor.carry_out``).
            for policy in self.step.policies:
                policy.rollback_advanced(self.step)
            for n in back:
                p = r.nodes[n]
                self.step.write(p, self.restore(p))
            waiting += back
            back = []
        for policy in self.step.policies:
            policy.rollback_advanced(self.step)
        if waiting or back:
            return
        failed = sorted(n for n, p in peek(r.nodes) if p.state == "failed")
        if failed:
            self.step.finish("failed", f"rollback incomplete on {', '.join(failed)} ("
                             + "; ".join(r.nodes[n].reason for n in failed)
                             + f") after: {r.reason}")
        else:
            self.step.finish("rolled_back", r.reason)


def _keeps_new_slot(p: NodeProgress) -> bool:
    """Whether ``p``'s target is a switch back: the previous state's slots plus the new one."""
    assert p.target is not None
    previous = dict(p.previous.slots) if p.previous is not None else {}
    return dict(p.target.slots) != previous
