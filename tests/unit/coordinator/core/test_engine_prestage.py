"""Pre-staging in the engine, in virtual time: which nodes are staged when, what a staged node's
wave writes, and what a staging failure, a pause, an abort and a restart do."""

from __future__ import annotations

import pytest

from coordinator.core.engine import (
    Abort,
    Command,
    EmitEvent,
    NodeOffline,
    NodeOnline,
    ObservedChanged,
    Resume,
    RollbackRequested,
    Rollout,
    Start,
    Tick,
)
from protocol.codec import decode, encode
from protocol.messages import DesiredState, ObservedState, RolloutRecord, SlotStatus
from protocol.testing import NEW, OLD
from tests.unit.coordinator.kit import events, kinds, rollout, writes


def report(d: DesiredState, t: float, *, healthy: bool = True) -> ObservedState:
    """An agent converged on ``d`` at ``t`` (its new slot unhealthy unless ``healthy``)."""
    return ObservedState(
        node=d.node, service="hello", generation=d.generation, observed_generation=d.generation,
        slots={s: SlotStatus(slot=s, status="healthy" if healthy or r == OLD else "starting",
                             version=r.version) for s, r in d.slots.items()},
        weights={s: w for s, w in d.weights.items() if w > 0}, phase="converged", time=t)


def failure(d: DesiredState, t: float, error: str) -> ObservedState:
    """An agent that gave up on ``d`` at ``t``: its old slot still serving."""
    return ObservedState(
        node=d.node, service="hello", generation=d.generation,
        observed_generation=d.generation - 1,
        slots={"a": SlotStatus(slot="a", status="healthy", version=OLD.version),
               "b": SlotStatus(slot="b", status="failed", version=NEW.version)},
        weights={"a": 100}, phase="failed", error=error, time=t)


def feed(r: Rollout, cmds: list[Command], t: float, *, only: str = "") -> list[Command]:
    """Every node written in ``cmds`` (or only ``only``) converges at ``t``."""
    out: list[Command] = []
    for d in writes(cmds):
        if not only or d.node == only:
            out += r.handle(ObservedChanged(d.node, report(d, t)), t)
    return out


def by_node(cmds: list[Command]) -> dict[str, DesiredState]:
    return {d.node: d for d in writes(cmds)}


def test_start_stages_the_next_wave_at_weight_0_in_the_slot_it_will_switch_to() -> None:
    """With --prestage 1 the first wave starts and the second wave's node gets the new release
    at weight 0 (its old slot keeps all traffic); later waves are not touched yet."""
    r = rollout(3, prestage="1")
    cmds = r.handle(Start(), 0.0)
    w = by_node(cmds)
    assert set(w) == {"node-1", "node-2"}
    assert w["node-1"].weights == {"a": 0, "b": 100}
    assert w["node-2"].slots == {"a": OLD, "b": NEW} and w["node-2"].weights == {"a": 100, "b": 0}
    assert w["node-2"].mirror is None
    p2 = r.record.nodes["node-2"]
    assert (p2.state, p2.staged, p2.slot, p2.wave) == ("waiting", "staging", "b", -1)
    assert [e.node for e in events(cmds, "node.staging")] == ["node-2"]
    assert r.record.prestage == 1


def test_a_staged_node_is_reported_staged_and_its_wave_is_a_switch() -> None:
    """node-2 reports its staged slot healthy before its wave: ``node.staged``; when wave 1
    starts, node-2 is given the same slot at weight 100 (``node.updating`` says staged) and
    node-3 is staged in turn."""
    r = rollout(3, prestage="1")
    cmds = r.handle(Start(), 0.0)
    staged = feed(r, cmds, 1.0, only="node-2")
    assert [e.node for e in events(staged, "node.staged")] == ["node-2"]
    assert r.record.nodes["node-2"].staged == "staged"
    wave1 = feed(r, cmds, 2.0, only="node-1")
    w = by_node(wave1)
    assert w["node-2"].weights == {"a": 0, "b": 100} and w["node-2"].slots["b"] == NEW
    assert w["node-3"].weights == {"a": 100, "b": 0}
    updating = events(wave1, "node.updating")
    assert [(e.node, e.data.get("staged")) for e in updating] == [("node-2", True)]
    order = kinds(staged + wave1)
    assert order.index("node.staged") < order.index("wave.started")


def test_a_rollout_with_prestage_runs_to_success_and_keeps_every_old_slot_warm() -> None:
    """Staged all the way: every node converges, the rollout succeeds, and (issue 17: one
    write a node for the switch) every node's new slot takes all of the traffic with the old
    slot kept warm at weight 0; nothing is written at the success."""
    r = rollout(4, prestage="all", batch="2", max_unavailable="2")
    cmds = r.handle(Start(), 0.0)
    assert set(by_node(cmds)) == {"node-1", "node-2", "node-3", "node-4"}
    t = 0.0
    while not r.done and t < 20:
        t += 1.0
        cmds = feed(r, cmds, t)
        cmds += [] if r.done else r.handle(Tick(), t)
    assert r.state == "succeeded"
    targets = {n: p.target for n, p in r.record.nodes.items()}
    assert all(d is not None and d.slots.get("b") == NEW and d.weights.get("b") == 100
               and all(w == 0 for s, w in d.weights.items() if s != "b")
               for d in targets.values()), targets


def test_staged_nodes_do_not_count_against_max_unavailable() -> None:
    """Staging at weight 0 stops nobody serving: with max-unavailable 1 the whole fleet is
    staged at once while only the running wave's node counts as unavailable."""
    r = rollout(4, prestage="all")
    r.handle(Start(), 0.0)
    states = {n: (p.state, p.staged) for n, p in r.record.nodes.items()}
    assert states == {"node-1": ("updating", ""), "node-2": ("waiting", "staging"),
                      "node-3": ("waiting", "staging"), "node-4": ("waiting", "staging")}


@pytest.mark.parametrize(("on_failure", "state"), [("rollback", "running"), ("pause", "paused")])
def test_a_staging_failure_is_reported_before_its_wave_by_the_failure_policy(
        on_failure: str, state: str) -> None:
    """The agent gives up on node-3's staged slot (a bad health check) while wave 0 runs: the
    node is reported failed with the wave it was staged for, and --on-failure follows at once:
    a rollback restores node-1 and the staged nodes, or a pause keeps the reason."""
    r = rollout(3, prestage="2", on_failure=on_failure)
    cmds = r.handle(Start(), 0.0)
    d3 = by_node(cmds)["node-3"]
    out = r.handle(ObservedChanged("node-3", failure(d3, 1.0, "health check failed")), 1.0)
    (failed,) = events(out, "node.failed")
    assert failed.node == "node-3" and failed.data["staging"] and failed.data["wave"] == 2
    assert "staging for wave 3: agent reports failure: health check failed" in failed.message
    assert r.state == state and "staging failed: node-3" in r.record.reason
    assert r.record.current_wave == 0 and "wave.started" not in kinds(out)
    if on_failure == "rollback":
        back = by_node(out)
        assert set(back) == {"node-1", "node-2", "node-3"}
        assert all(d.slots == {"a": OLD} and d.weights == {"a": 100} for d in back.values())
    else:
        assert not writes(out)


def test_resume_after_a_staging_failure_stages_the_node_again() -> None:
    """Under --on-failure pause, a resume writes the failed node's staging again (a new
    generation) and the rollout goes on."""
    r = rollout(2, prestage="1", on_failure="pause")
    cmds = r.handle(Start(), 0.0)
    d2 = by_node(cmds)["node-2"]
    r.handle(ObservedChanged("node-2", failure(d2, 1.0, "exit 1")), 1.0)
    assert r.state == "paused"
    again = r.handle(Resume(), 2.0)
    (d,) = [d for d in writes(again) if d.node == "node-2"]
    assert d.generation > d2.generation and d.weights == {"a": 100, "b": 0}
    assert r.record.nodes["node-2"].staged == "staging" and r.state == "running"


def test_a_staged_slot_that_never_turns_healthy_fails_at_the_progress_deadline() -> None:
    """No healthy staged slot by --progress-deadline after it was written is a failure."""
    r = rollout(2, prestage="1", progress_deadline=60.0)
    cmds = r.handle(Start(), 0.0)
    d2 = by_node(cmds)["node-2"]
    r.handle(ObservedChanged("node-2", report(d2, 1.0, healthy=False)), 1.0)
    r.handle(Tick(), 59.0)
    assert r.record.phase == "forward" and r.record.nodes["node-2"].staged == "staging"
    out = r.handle(Tick(), 60.0)
    (failed,) = events(out, "node.failed")
    assert "not healthy within 1m" in failed.message and r.record.phase == "rollback"


def test_a_staged_slot_that_fails_after_it_was_staged_fails_before_its_wave() -> None:
    """A staged slot the agent later gives up on is a failure too, before its wave."""
    r = rollout(3, prestage="1")
    cmds = r.handle(Start(), 0.0)
    d2 = by_node(cmds)["node-2"]
    feed(r, cmds, 1.0, only="node-2")
    assert r.record.nodes["node-2"].staged == "staged"
    r.handle(ObservedChanged("node-2", failure(d2, 2.0, "exited")), 2.0)
    assert r.record.phase == "rollback" and r.record.nodes["node-2"].staged == "failed"


def test_abort_gives_staged_nodes_their_previous_state_so_no_staged_slot_runs_on() -> None:
    """An abort leaves the running wave as it is but takes every staged slot away."""
    r = rollout(4, prestage="all")
    r.handle(Start(), 0.0)
    out = r.handle(Abort(reason="operator"), 1.0)
    back = by_node(out)
    assert set(back) == {"node-2", "node-3", "node-4"}
    assert all(d.slots == {"a": OLD} and d.weights == {"a": 100} for d in back.values())
    assert r.state == "aborted" and events(out, "rollout.unstaged")


def test_an_abort_during_a_rollback_writes_no_staged_node_again() -> None:
    """A staged node the rollback already restored is not written again by an abort (it got
    the same state at the next generation, and "staged nodes back on their previous state")."""
    r = rollout(3, prestage="1")
    cmds = r.handle(Start(), 0.0)
    feed(r, cmds, 1.0, only="node-2")
    restored = by_node(r.handle(RollbackRequested(reason="operator"), 2.0))
    assert "node-2" in restored
    out = r.handle(Abort(reason="operator"), 3.0)
    assert "node-2" not in by_node(out) and not events(out, "rollout.unstaged")
    assert r.state == "aborted"


def test_an_offline_node_is_staged_once_it_is_back() -> None:
    """A node without heartbeats is not written to; it is staged when it is back."""
    r = rollout(2, prestage="1", max_unavailable="2")
    r.handle(NodeOffline("node-2"), 0.0)
    cmds = r.handle(Start(), 0.0)
    assert set(by_node(cmds)) == {"node-1"}
    back = r.handle(NodeOnline("node-2"), 1.0)
    assert by_node(back)["node-2"].weights == {"a": 100, "b": 0}


def test_a_node_back_while_staging_has_a_whole_deadline_to_report() -> None:
    """A node that went offline after its staging write (a reboot while the running wave
    bakes) and comes back after --progress-deadline is not failed before it can report: it
    gets a whole deadline from its return (failed at once, it rolled back a healthy rollout);
    one that never reports fails that deadline after its return."""
    for reports in (True, False):
        r = rollout(3, prestage="1", bake=1000.0, on_node_lost="wait", progress_deadline=120.0)
        cmds = r.handle(Start(), 0.0)
        d2 = by_node(cmds)["node-2"]
        r.handle(NodeOffline("node-2"), 1.0)
        feed(r, cmds, 5.0, only="node-1")  # wave 1 converged: it bakes until 1005
        back = r.handle(NodeOnline("node-2"), 200.0)
        assert not events(back, "node.failed") and r.record.phase == "forward", kinds(back)
        if reports:
            out = r.handle(ObservedChanged("node-2", report(d2, 202.0)), 202.0)
            assert events(out, "node.staged") and r.record.nodes["node-2"].staged == "staged"
            continue
        r.handle(Tick(), 319.0)
        assert r.record.nodes["node-2"].staged == "staging" and r.record.phase == "forward"
        (failed,) = events(r.handle(Tick(), 320.0), "node.failed")
        assert "not healthy within 2m" in failed.message and r.record.phase == "rollback"


def test_a_restarted_coordinator_resumes_with_staged_nodes_staged() -> None:
    """The record holds the staging: decoded by a new engine, the staged node stays staged,
    its target is among the states to write again, and its wave is still a switch."""
    r = rollout(3, prestage="1")
    cmds = r.handle(Start(), 0.0)
    feed(r, cmds, 1.0, only="node-2")
    again = Rollout(decode(RolloutRecord, encode(r.record)), fleet="f")
    assert again.record.nodes["node-2"].staged == "staged"
    assert {d.node for d in again.intended()} == {"node-1", "node-2"}
    out = feed(again, cmds, 2.0, only="node-1")
    assert [e.data.get("staged") for e in events(out, "node.updating")] == [True]


def test_canary_stages_nothing_unless_asked_and_rolling_one_wave() -> None:
    """The defaults: rolling one wave ahead, canary none; ``--prestage 0`` none."""
    assert rollout(3, strategy="rolling", prestage="").record.prestage == 1
    assert rollout(3, strategy="canary").record.prestage == 0
    assert rollout(3, strategy="canary", prestage="1").record.prestage == 1
    assert rollout(3, prestage="all").record.prestage == 2  # the waves after the first
    cmds = rollout(3, strategy="canary").handle(Start(), 0.0)
    assert not events(cmds, "node.staging")


def test_events_of_staging_name_the_wave() -> None:
    """``node.staging`` says which wave the node is staged for."""
    r = rollout(3, prestage="2")
    cmds = r.handle(Start(), 0.0)
    staging: list[EmitEvent] = events(cmds, "node.staging")
    assert [(e.node, e.data["wave"]) for e in staging] == [("node-2", 1), ("node-3", 2)]
