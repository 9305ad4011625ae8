"""The fleet's excuse (``Rollout.excuse``), in virtual time: while the nodes may not have heard
the bus (the leader's connection down, then the agents' reconnect and watch restart spread), no
progress deadline passes before the excuse's end plus a whole ``--progress-deadline``: not a
wave's, a staging node's, a lost node's or the rollback's. A node's own failure still counts at
once; an excuse in the past changes nothing."""

from __future__ import annotations

from coordinator.core.engine import NodeOffline, ObservedChanged, Start, Tick
from tests.unit.coordinator.core.test_engine import converge, observed
from tests.unit.coordinator.core.test_engine_prestage import by_node, failure, report
from tests.unit.coordinator.kit import events, rollout, writes


def test_a_waves_deadline_waits_for_the_excuse_plus_a_whole_deadline() -> None:
    r = rollout(2, progress_deadline=60.0, on_failure="pause")
    assert len(writes(r.handle(Start(), 0.0))) == 1
    r.excuse(40.0)  # the broker was away; the agents may hear it from then on
    for t in (60.0, 99.9):
        r.handle(Tick(), t)
        assert r.state == "running" and r.record.nodes["node-1"].state == "updating", t
    r.handle(Tick(), 100.0)
    assert r.state == "paused" and "did not converge within 1m" in r.record.reason


def test_a_node_told_within_the_excuse_passes_and_its_own_failure_counts_at_once() -> None:
    r = rollout(2, progress_deadline=60.0, on_failure="pause")
    cmds = r.handle(Start(), 0.0)
    r.excuse(40.0)
    r.handle(Tick(), 89.0)
    nxt = converge(r, cmds, 90.0)  # past its wave's own deadline, within the excuse's
    assert r.record.current_wave == 1 and r.state == "running"
    (d2,) = [d for d in writes(nxt) if d.node == "node-2"]
    r.handle(ObservedChanged("node-2", observed(d2, 91.0, failed="exit 3")), 91.0)
    assert r.state == "paused" and "exit 3" in r.record.reason


def test_an_excuse_in_the_past_changes_no_deadline() -> None:
    r = rollout(2, progress_deadline=60.0, on_failure="pause")
    r.handle(Start(), 100.0)
    r.excuse(30.0)  # over before the wave began: its deadline is its own
    r.handle(Tick(), 159.9)
    assert r.state == "running"
    r.handle(Tick(), 160.0)
    assert r.state == "paused"


def test_a_staging_nodes_deadline_waits_for_the_excuse() -> None:
    r = rollout(2, prestage="1", progress_deadline=60.0)
    cmds = r.handle(Start(), 0.0)
    d2 = by_node(cmds)["node-2"]
    r.handle(ObservedChanged("node-2", report(d2, 1.0, healthy=False)), 1.0)
    r.excuse(20.0)
    out = r.handle(Tick(), 60.0)
    assert not events(out, "node.failed") and r.record.nodes["node-2"].staged == "staging"
    r.handle(Tick(), 79.9)
    assert r.record.phase == "forward"
    (failed,) = events(r.handle(Tick(), 80.0), "node.failed")
    assert "not healthy within 1m" in failed.message and r.record.phase == "rollback"


def test_a_lost_nodes_wait_and_the_rollbacks_deadline_wait_for_the_excuse() -> None:
    r = rollout(2, progress_deadline=60.0, on_node_lost="wait")
    r.handle(Start(), 0.0)
    r.handle(NodeOffline("node-1"), 5.0)
    r.excuse(30.0)
    r.handle(Tick(), 89.9)
    assert r.record.phase == "forward"
    r.handle(Tick(), 90.0)  # lost and not back by the excused deadline: the rollback starts
    assert r.record.phase == "rollback"
    assert r.record.rollback_deadline == 150.0
    r.excuse(120.0)  # the broker went away again during the rollback
    r.handle(Tick(), 179.9)
    assert r.state == "running"
    r.handle(Tick(), 180.0)
    assert r.state == "failed" and "did not converge back within 1m" in r.record.reason


def test_a_failed_staging_report_during_the_excuse_fails_at_once() -> None:
    r = rollout(2, prestage="1", progress_deadline=60.0)
    cmds = r.handle(Start(), 0.0)
    r.excuse(1000.0)
    d2 = by_node(cmds)["node-2"]
    r.handle(ObservedChanged("node-2", failure(d2, 2.0, "exited")), 2.0)
    assert r.record.phase == "rollback" and r.record.nodes["node-2"].staged == "failed"
