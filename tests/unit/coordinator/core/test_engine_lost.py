"""Nodes lost mid-wave (``core.engine_lost``), in virtual time: ``on_node_lost`` fail fails them
at once naming them, wait holds the wave for them within max-unavailable and the deadline."""

from __future__ import annotations

import pytest

from coordinator.core.engine import (
    Command,
    NodeOffline,
    NodeOnline,
    ObservedChanged,
    Promote,
    Rollout,
    Start,
    Tick,
)
from protocol.messages import DesiredState, Gates
from tests.unit.coordinator.core.test_engine import converge, observed, router
from tests.unit.coordinator.kit import events, kinds, rollout, writes

WAIT = {"on_node_lost": "wait"}


def converged_at(r: Rollout, d: DesiredState, t: float) -> None:
    """The agent of ``d.node`` reports at ``t`` that it converged on ``d``."""
    r.handle(ObservedChanged(d.node, observed(d, t)), t)


def written(cmds: list[Command], node: str) -> list[int]:
    """The generations ``cmds`` write for ``node``."""
    return [d.generation for d in writes(cmds) if d.node == node]


# -- fail ------------------------------------------------------------------------------------------


def test_fail_is_the_default() -> None:
    """A spec that says nothing fails lost nodes."""
    assert rollout(1).record.spec.on_node_lost == "fail"


@pytest.mark.parametrize(
    ("on_failure", "state"), [("rollback", "rolled_back"), ("pause", "paused")])
def test_fail_a_node_lost_while_updating_fails_its_wave_naming_it(
    on_failure: str, state: str,
) -> None:
    """Under fail a node lost while updating fails at once; the rollout's reason names it and
    --on-failure decides what follows, as for any failed node."""
    r = rollout(3, batch="2", max_unavailable="2", on_failure=on_failure)
    r.handle(Start(), 0.0)
    cmds = r.handle(NodeOffline("node-2"), 3.0)
    reason = "node-2: lost (offline) during wave 1 while updating"
    assert f"wave 1 failed: {reason}" in r.record.reason
    assert [e.message for e in events(cmds, "node.failed")] == [reason]
    back = {d.node: d for d in writes(cmds)}
    if state == "rolled_back":
        assert set(back) == {"node-1", "node-2"}
        assert written(cmds, "node-2") == [9]  # the lost node's restore: one write
        converged_at(r, back["node-1"], 4.0)
        converged_at(r, back["node-2"], 5.0)
    else:
        assert back == {}
    assert r.state == state and "node-2: lost (offline)" in r.record.reason


def test_fail_a_converged_node_lost_before_its_wave_bakes_fails_the_wave() -> None:
    """A node already done, lost while the rest of its wave still updates, fails too."""
    r = rollout(2, batch="2", max_unavailable="2", on_failure="pause")
    d1, _ = writes(r.handle(Start(), 0.0))
    converged_at(r, d1, 1.0)
    r.handle(NodeOffline("node-1"), 2.0)
    assert r.state == "paused"
    assert "node-1: lost (offline) during wave 1 after converging" in r.record.reason


def test_fail_a_node_lost_during_the_bake_fails_the_wave() -> None:
    """Under fail a node lost while its wave bakes fails the bake at once."""
    r = rollout(2, bake=60.0, on_failure="pause")
    (d1,) = writes(r.handle(Start(), 0.0))
    converged_at(r, d1, 1.0)
    assert r.record.waves[0].state == "baking"
    r.handle(NodeOffline("node-1"), 10.0)
    assert r.state == "paused" and r.record.waves[0].state == "failed"
    assert "node-1: lost (offline) during wave 1 while baking" in r.record.reason


# -- wait, while updating --------------------------------------------------------------------------


def test_wait_a_node_back_before_the_deadline_lets_the_wave_go_on() -> None:
    """Under wait a lost node is not failed, not judged done while lost, not written to again;
    back and converged before the deadline, its wave goes on and the rollout succeeds."""
    r = rollout(2, progress_deadline=60.0, **WAIT)
    (d1,) = writes(r.handle(Start(), 0.0))
    cmds = r.handle(NodeOffline("node-1"), 5.0)
    assert [e.message for e in events(cmds, "rollout.node.offline")] == [
        "target node node-1 is offline; wave 1 waits for it (on-node-lost wait)"]
    assert writes(cmds) == [] and r.record.nodes["node-1"].state == "updating"
    # Its report may arrive before its heartbeats do: not done while the table says it is lost.
    converged_at(r, d1, 30.0)
    assert r.record.nodes["node-1"].state == "updating"
    assert writes(r.handle(Tick(), 59.0)) == [] and r.state == "running"
    cmds = r.handle(NodeOnline("node-1"), 59.5)
    assert r.record.nodes["node-1"].state == "done"
    assert written(cmds, "node-2") == [8]  # wave 1 starts
    t = 60.0
    while not r.done:
        t += 1.0
        cmds = converge(r, cmds, t)
    assert r.state == "succeeded"


def test_wait_a_node_not_back_by_the_deadline_fails_naming_it() -> None:
    """Under wait a lost node not back by the wave's deadline fails as under fail, naming it
    and saying it was waited for: the rollout never hangs past the deadline."""
    r = rollout(2, progress_deadline=60.0, on_failure="pause", **WAIT)
    r.handle(Start(), 0.0)
    r.handle(NodeOffline("node-1"), 5.0)
    for t in (10.0, 30.0, 59.9):
        r.handle(Tick(), t)
        assert r.state == "running"
    r.handle(Tick(), 60.0)
    assert r.state == "paused"
    assert ("wave 1 failed: node-1: lost (offline) during wave 1 and not back within 1m"
            in r.record.reason)


def test_wait_a_node_back_but_not_converged_by_the_deadline_fails_as_any_node() -> None:
    """A lost node that is back but has not converged by the deadline fails as any slow node."""
    r = rollout(1, progress_deadline=60.0, on_failure="pause", **WAIT)
    r.handle(Start(), 0.0)
    r.handle(NodeOffline("node-1"), 5.0)
    r.handle(NodeOnline("node-1"), 50.0)
    r.handle(Tick(), 60.0)
    assert r.state == "paused" and "node-1: did not converge within 1m" in r.record.reason


def test_wait_an_agent_failure_reported_before_the_loss_still_fails_the_node() -> None:
    """What the agent reported is not forgotten while it is lost: a failure fails the node."""
    r = rollout(1, on_failure="pause", **WAIT)
    (d1,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", observed(d1, 1.0, failed="start timeout")), 2.0)
    assert r.state == "paused"
    r = rollout(1, on_failure="pause", **WAIT)
    (d1,) = writes(r.handle(Start(), 0.0))
    r.handle(NodeOffline("node-1"), 1.0)
    r.handle(ObservedChanged("node-1", observed(d1, 1.5, failed="start timeout")), 2.0)
    assert r.state == "paused" and "node-1: agent reports failure: start timeout" in r.record.reason


def test_wait_a_lost_node_not_yet_started_is_not_written_until_it_is_back() -> None:
    """A node of the wave lost before it was started is skipped, not failed, and started once
    it is back (within max-unavailable)."""
    r = rollout(2, batch="2", max_unavailable="2", **WAIT)
    r.handle(NodeOffline("node-2"), 0.0)
    cmds = r.handle(Start(), 1.0)
    assert [d.node for d in writes(cmds)] == ["node-1"]
    converged_at(r, writes(cmds)[0], 2.0)
    assert r.record.nodes["node-2"].state == "waiting" and r.record.waves[0].state == "updating"
    cmds = r.handle(NodeOnline("node-2"), 3.0)
    assert written(cmds, "node-2") == [8]


# -- wait and max-unavailable ----------------------------------------------------------------------


def test_wait_a_lost_node_counts_against_max_unavailable() -> None:
    """With max-unavailable 1, while a lost node is waited for no other node is started, in its
    wave or the next; once it is back and converged the next one starts."""
    r = rollout(3, batch="2", max_unavailable="1", progress_deadline=100.0, **WAIT)
    (d1,) = writes(r.handle(Start(), 0.0))
    cmds = r.handle(NodeOffline("node-1"), 1.0)
    cmds += r.handle(ObservedChanged("node-1", observed(d1, 2.0)), 2.0)
    for t in range(3, 100, 7):
        cmds += r.handle(Tick(), float(t))
    assert writes(cmds) == [] and r.state == "running"
    cmds = r.handle(NodeOnline("node-1"), 100.0 - 0.5)
    assert [d.node for d in writes(cmds)] == ["node-2"]


def test_wait_a_node_of_a_passed_wave_lost_holds_the_next_wave_within_the_budget() -> None:
    """A node of a wave already passed that is lost still counts as unavailable: the next wave
    starts none of its nodes beyond the budget until it is back."""
    r2 = rollout(3, max_unavailable="1", progress_deadline=100.0, **WAIT)
    (e1,) = writes(r2.handle(Start(), 0.0))
    (e2,) = writes(r2.handle(ObservedChanged("node-1", observed(e1, 1.0)), 1.0))
    r2.handle(NodeOffline("node-1"), 2.0)  # wave 0 passed; wave 1 (node-2) is updating
    cmds = r2.handle(ObservedChanged("node-2", observed(e2, 3.0)), 3.0)
    assert writes(cmds) == []  # node-1 lost: node-3 may not start (max-unavailable 1)
    cmds = r2.handle(NodeOnline("node-1"), 4.0)
    assert [d.node for d in writes(cmds)] == ["node-3"]


# -- wait, during the bake -------------------------------------------------------------------------


def test_wait_a_node_lost_during_the_bake_holds_the_verdict_until_it_is_back() -> None:
    """Under wait the gates judge a wave only once its lost node is back, with its figures."""
    r = rollout(1, bake=30.0, gates=Gates(max_error_rate=0.05), progress_deadline=60.0, **WAIT)
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", observed(d, 1.0, router=router(1.0, 10, 0))), 1.0)
    r.handle(NodeOffline("node-1"), 10.0)
    for t in (31.0, 60.0, 84.0):
        assert "gate.passed" not in kinds(r.handle(Tick(), t)) and r.state == "running"
    # Back: what it reported before it was lost (10 requests) is not what the gates judge.
    r.handle(NodeOnline("node-1"), 85.0)
    r.handle(Tick(), 86.0)
    assert r.state == "running" and r.record.waves[0].state == "baking"
    cmds = r.handle(ObservedChanged("node-1", observed(d, 87.0, router=router(1.0, 200, 1))),
                    87.0)
    assert "gate.passed" in kinds(cmds) and r.state == "succeeded"
    assert r.record.waves[0].gates["requests"] == 190


def test_wait_a_node_lost_during_the_bake_fails_past_the_bake_end_plus_the_deadline() -> None:
    """A node lost during the bake and not back fails at the bake's end plus the deadline."""
    r = rollout(1, bake=30.0, progress_deadline=60.0, on_failure="pause", **WAIT)
    (d,) = writes(r.handle(Start(), 0.0))
    converged_at(r, d, 1.0)
    r.handle(NodeOffline("node-1"), 10.0)
    r.handle(Promote(), 20.0)  # a promote skips gates, not lost nodes
    r.handle(Tick(), 90.9)
    assert r.state == "running"
    r.handle(Tick(), 91.0)
    assert r.state == "paused"
    assert ("node-1: lost (offline) during wave 1 while baking and not back (online and "
            "reporting) within 1m of the bake's end" in r.record.reason)


def test_wait_a_node_back_from_the_bake_with_a_broken_slot_fails() -> None:
    """A lost node that comes back with its new slot unhealthy fails the bake as ever."""
    r = rollout(1, bake=30.0, on_failure="pause", **WAIT)
    (d,) = writes(r.handle(Start(), 0.0))
    converged_at(r, d, 1.0)
    r.handle(NodeOffline("node-1"), 10.0)
    r.handle(NodeOnline("node-1"), 40.0)
    assert r.state == "running"
    r.handle(ObservedChanged("node-1", observed(d, 41.0, healthy=False)), 41.0)
    assert r.state == "paused" and "new slot b is unhealthy during the bake" in r.record.reason


def test_wait_a_node_back_from_the_bake_but_silent_fails_at_the_deadline() -> None:
    """A node back online that does not report again is waited for no longer than a lost one."""
    r = rollout(1, bake=30.0, progress_deadline=60.0, on_failure="pause", **WAIT)
    (d,) = writes(r.handle(Start(), 0.0))
    converged_at(r, d, 1.0)
    r.handle(NodeOffline("node-1"), 10.0)
    r.handle(NodeOnline("node-1"), 20.0)
    r.handle(Tick(), 90.0)
    assert r.state == "running"
    r.handle(Tick(), 91.0)
    assert r.state == "paused" and "not back (online and reporting) within 1m" in r.record.reason


def test_a_node_that_could_not_start_names_the_lost_node_that_held_it() -> None:
    """When a lost node of a passed wave keeps the next wave's node from starting until the
    deadline, the reason names the lost node too."""
    r = rollout(3, max_unavailable="1", progress_deadline=30.0, on_failure="pause", **WAIT)
    (d1,) = writes(r.handle(Start(), 0.0))
    (d2,) = writes(r.handle(ObservedChanged("node-1", observed(d1, 1.0)), 1.0))
    r.handle(NodeOffline("node-1"), 2.0)
    assert writes(r.handle(ObservedChanged("node-2", observed(d2, 3.0)), 3.0)) == []
    r.handle(Tick(), 40.0)
    assert r.state == "paused"
    assert ("node-3: could not start within 30s: 1 target nodes unavailable (node-1 offline; "
            "max-unavailable 1)" in r.record.reason)
