"""Nodes unhealthy on their own count against ``--max-unavailable`` (``engine_step.down_why``).

DESIGN: at no moment are more than max-unavailable target nodes without a healthy serving slot.
A node whose serving slot is unhealthy by itself is one of them, so the rollout takes no other
node out of service beyond the budget; it still starts such a node whenever its wave comes (it
is down already, and the release may be its fix), and a deploy puts the nodes unhealthy at the
start in its first waves, so that a rollout fixing them is not held back by them.
"""

from __future__ import annotations

import msgspec

from agent.reconcile import LOOP, SlotView, assess
from coordinator.core.engine import (
    NodeOffline,
    ObservedChanged,
    Resume,
    Rollout,
    Start,
    Tick,
    new_record,
)
from coordinator.core.node_table import old_slot_failing
from protocol.messages import DesiredState, NodeView, ObservedState, SlotStatus
from protocol.testing import NEW, OLD, desired, spec
from tests.unit.agent.test_reconcile import V1, V2, view
from tests.unit.agent.test_reconcile import desired as wanted
from tests.unit.coordinator.core.test_engine import observed, sick
from tests.unit.coordinator.kit import rollout, writes


def fleet(n: int, unhealthy: tuple[str, ...] = (), **kw: object) -> Rollout:
    """``n`` nodes serving OLD, the ``unhealthy`` ones reported so before the deploy; batches
    of one, max-unavailable 1, nothing staged ahead unless ``kw`` says otherwise."""
    nodes = [NodeView(id=f"node-{i}") for i in range(1, n + 1)]
    current = {v.id: desired(v.id) for v in nodes}
    reports = {node: (sick if node in unhealthy else observed)(d, 0.5)
               for node, d in current.items()}
    fields = {"batch": "1", "max_unavailable": "1", "prestage": "0", **kw}
    r = Rollout(new_record(id="r", spec=spec(**fields), release=NEW, nodes=nodes,
                           current=current, now=0.0, observed=reports), fleet="f")
    # As the runner does: the reports the deploy was planned with, fed before the start.
    r.handle_all([ObservedChanged(node, seen) for node, seen in reports.items()], 0.5)
    return r


def staged_of(r: Rollout, node: str) -> str:
    return r.record.nodes[node].staged


def state_of(r: Rollout, node: str) -> str:
    return r.record.nodes[node].state


def converge(r: Rollout, d: DesiredState, t: float) -> list[str]:
    """``d``'s node reports it converged and healthy; the nodes written then."""
    return [w.node for w in writes(r.handle(ObservedChanged(d.node, observed(d, t)), t))]


def test_nodes_unhealthy_at_the_deploy_go_first_and_start_whatever_the_count() -> None:
    """Two of four nodes crash on the old release: they make the first waves and each starts
    though both count against a budget of one; the healthy ones wait until the fixed nodes
    serve again, one at a time."""
    r = fleet(4, unhealthy=("node-3", "node-4"))
    assert [w.nodes for w in r.record.waves] == [["node-3"], ["node-4"], ["node-1"], ["node-2"]]
    assert [r.record.nodes[n].healthy for n in ("node-1", "node-2", "node-3", "node-4")] == [
        True, True, False, False]
    first = writes(r.handle(Start(), 1.0))
    assert [d.node for d in first] == ["node-3"]
    # node-3 serves the release, healthy: node-4 is the one node down, and it is next.
    second = writes(r.handle(ObservedChanged("node-3", observed(first[0], 2.0)), 2.0))
    assert [d.node for d in second] == ["node-4"]
    third = writes(r.handle(ObservedChanged("node-4", observed(second[0], 3.0)), 3.0))
    assert [d.node for d in third] == ["node-1"]
    fourth = writes(r.handle(ObservedChanged("node-1", observed(third[0], 4.0)), 4.0))
    assert [d.node for d in fourth] == ["node-2"]
    converge(r, fourth[0], 5.0)
    assert r.state == "succeeded", r.record.reason


def test_a_node_moved_while_its_old_slot_is_unhealthy_keeps_no_warm_copy() -> None:
    """node-2's old slot is unhealthy: its target has the new slot only (kept at weight 0,
    the old slot would hold the agent's convergence until it healed, if ever); node-1's keeps
    its healthy old slot warm at weight 0, as every move does; a rollback gives node-2 its old
    state again."""
    r = fleet(2, unhealthy=("node-2",), on_failure="rollback")
    (d2,) = writes(r.handle(Start(), 1.0))
    assert (d2.node, d2.slots, d2.weights) == ("node-2", {"b": NEW}, {"b": 100})
    (d1,) = writes(r.handle(ObservedChanged("node-2", observed(d2, 2.0)), 2.0))
    assert (d1.node, d1.slots, d1.weights) == ("node-1", {"a": OLD, "b": NEW}, {"a": 0, "b": 100})
    back = {d.node: d for d in writes(r.handle(ObservedChanged(
        "node-1", observed(d1, 3.0, failed="crashed")), 3.0))}
    assert (back["node-2"].slots, back["node-2"].weights) == ({"a": OLD}, {"a": 100})


def test_a_retried_node_whose_new_slot_failed_keeps_its_healthy_old_slot() -> None:
    """node-1's new slot goes unhealthy in its bake (the node serves from no healthy slot),
    the rollout pauses, and a resume retries it: its old slot, healthy at weight 0, is still
    kept warm (it is the new slot that is unhealthy)."""
    r = fleet(2, bake=10.0, on_failure="pause")
    (d1,) = writes(r.handle(Start(), 1.0))
    r.handle(ObservedChanged("node-1", observed(d1, 2.0)), 2.0)
    r.handle(ObservedChanged("node-1", observed(d1, 5.0, healthy=False)), 5.0)
    r.handle(Tick(), 12.5)
    assert r.state == "paused", r.record.reason
    (again,) = writes(r.handle(Resume(), 13.0))
    assert (again.node, again.slots, again.weights) == (
        "node-1", {"a": OLD, "b": NEW}, {"a": 0, "b": 100})


def test_a_node_that_sickens_mid_rollout_holds_the_next_wave_until_it_is_well() -> None:
    """node-3 (a later wave) goes unhealthy on its own while node-1's wave runs: node-2 is not
    started beside it (two nodes out of a budget of one); once node-3 is well, it is."""
    r = fleet(3)
    d1 = writes(r.handle(Start(), 1.0))[0]
    r.handle(ObservedChanged("node-3", sick(desired("node-3"), 1.5)), 1.5)
    assert converge(r, d1, 2.0) == []
    assert r.record.nodes["node-2"].state == "waiting"
    assert writes(r.handle(Tick(), 3.0)) == []
    # Well again (its next report): node-2's wave starts at once.
    assert [d.node for d in writes(r.handle(
        ObservedChanged("node-3", observed(desired("node-3"), 4.0)), 4.0))] == ["node-2"]


def test_a_wave_held_past_its_deadline_by_an_unhealthy_node_pauses_naming_it() -> None:
    """node-3 (never moved) does not get well: node-2's wave cannot start, and at its deadline
    the rollout pauses, whatever --on-failure says (no failure of the release: a rollback
    would move node-1 back), naming node-3 and why; a resume once node-3 is well goes on."""
    r = fleet(3, progress_deadline=30.0, on_failure="rollback")
    d1 = writes(r.handle(Start(), 1.0))[0]
    r.handle(ObservedChanged("node-3", sick(desired("node-3"), 1.5)), 1.5)
    converge(r, d1, 2.0)
    assert writes(r.handle(Tick(), 40.0)) == []
    assert r.state == "paused"
    assert r.record.reason == (
        "wave 2: 1 nodes could not start within 30s: 1 target nodes unavailable (node-3 "
        "unhealthy; max-unavailable 1); nodes this rollout never moved hold the room: resume "
        "once they are back and well, or roll back")
    r.handle(ObservedChanged("node-3", observed(desired("node-3"), 41.0)), 41.0)
    assert [d.node for d in writes(r.handle(Resume(), 42.0))] == ["node-2"]


def test_a_wave_held_by_a_node_offline_that_was_never_moved_pauses() -> None:
    """node-3's agent goes away before its wave: offline, it holds node-2's wave too, and at
    the deadline the rollout pauses as for an unhealthy one (nothing the release did)."""
    r = fleet(3, progress_deadline=30.0, on_failure="rollback")
    d1 = writes(r.handle(Start(), 1.0))[0]
    r.handle(NodeOffline("node-3"), 1.5)
    converge(r, d1, 2.0)
    r.handle(Tick(), 40.0)
    assert r.state == "paused" and "(node-3 offline; max-unavailable 1)" in r.record.reason


def test_a_wave_held_by_a_moved_node_and_a_never_moved_one_fails() -> None:
    """node-1, moved, goes unhealthy on the release after its wave and node-6, never moved, on
    its own: with a budget of two, node-4 (wave 2) is held by both, and at the deadline that
    is a failure (the release may be the cause), not a pause."""
    r = fleet(6, progress_deadline=30.0, on_failure="rollback", max_unavailable="2",
              batch="2")
    first = writes(r.handle(Start(), 1.0))
    assert [d.node for d in first] == ["node-1", "node-2"]
    r.handle(ObservedChanged("node-6", sick(desired("node-6"), 1.5)), 1.5)
    r.handle(ObservedChanged("node-1", observed(first[0], 2.0)), 2.0)
    # Wave 1 starts node-3 beside node-6; node-4 waits for room.
    (d3,) = writes(r.handle(ObservedChanged("node-2", observed(first[1], 3.0)), 3.0))
    assert d3.node == "node-3"
    r.handle(ObservedChanged("node-1", sick(first[0], 3.5)), 3.5)
    assert writes(r.handle(ObservedChanged("node-3", observed(d3, 4.0)), 4.0)) == []
    assert r.record.nodes["node-4"].state == "waiting"
    r.handle(Tick(), 40.0)
    assert r.record.phase == "rollback", (r.state, r.record.reason)


def test_a_wave_held_by_a_node_the_release_made_unhealthy_fails() -> None:
    """node-1, moved to the release, goes unhealthy after its wave passed: it holds node-2's
    wave, and at the deadline that is a failure (--on-failure rollback rolls back), not a
    pause: the release may be the cause."""
    r = fleet(3, progress_deadline=30.0, on_failure="rollback")
    d1 = writes(r.handle(Start(), 1.0))[0]
    d2 = writes(r.handle(ObservedChanged("node-1", observed(d1, 2.0)), 2.0))[0]
    r.handle(ObservedChanged("node-1", sick(d1, 2.5)), 2.5)
    converge(r, d2, 3.0)
    r.handle(Tick(), 40.0)
    assert r.record.phase == "rollback", (r.state, r.record.reason)
    assert "node-3: could not start within 30s: 1 target nodes unavailable (node-1 unhealthy; " \
        "max-unavailable 1)" in r.record.reason


def test_a_node_done_that_sickens_on_the_release_holds_the_next_wave() -> None:
    """node-1's wave passed; then, while node-2's runs, node-1's new slot goes unhealthy: it
    serves from no healthy slot, so node-3's wave waits for it. (While its own wave bakes,
    the bake fails the wave instead, "new slot b is unhealthy during the bake".)"""
    r = fleet(3)
    d1 = writes(r.handle(Start(), 1.0))[0]
    d2 = writes(r.handle(ObservedChanged("node-1", observed(d1, 2.0)), 2.0))[0]
    assert d2.node == "node-2"
    r.handle(ObservedChanged("node-1", sick(d1, 2.5)), 2.5)
    assert converge(r, d2, 3.0) == []
    assert r.record.nodes["node-3"].state == "waiting"
    assert converge(r, d1, 4.0) == ["node-3"]


def test_a_first_report_in_the_same_step_counts() -> None:
    """A node first heard from in the step that would start the next wave, unhealthy: that
    step already counts it (the engine's kept set of unavailable nodes is updated with the
    nodes a step heard from, not only with those it moved)."""
    r = rollout(3, batch="1", max_unavailable="1")  # no reports at the deploy
    d1 = writes(r.handle(Start(), 1.0))[0]
    cmds = r.handle_all([ObservedChanged("node-3", sick(desired("node-3"), 1.5)),
                         ObservedChanged("node-1", observed(d1, 2.0))], 2.0)
    assert writes(cmds) == []
    assert r.record.nodes["node-1"].state == "done"
    assert r.record.nodes["node-2"].state == "waiting"


def test_a_first_install_is_not_held_by_nodes_that_served_nothing() -> None:
    """Nothing was meant to serve on a first install: nodes reporting a failed slot of their
    own (node-2, node-3) are not unavailable for want of a healthy one, and node-1 starts.
    (A removal's removed nodes, whose empty target serves nothing by design, are not either:
    ``test_remove``'s wave-by-wave removal.)"""
    nodes = [NodeView(id=f"node-{i}") for i in range(1, 4)]
    failed = {v.id: ObservedState(node=v.id, service="hello", time=0.5,
                                  slots={"a": SlotStatus(slot="a", status="failed",
                                                         version=OLD.version)})
              for v in nodes[1:]}
    r = Rollout(new_record(id="r", spec=spec(batch="1", max_unavailable="1"), release=NEW,
                           nodes=nodes, current={}, now=0.0, observed=failed), fleet="f")
    r.handle_all([ObservedChanged(node, seen) for node, seen in failed.items()], 0.5)
    assert [w.nodes for w in r.record.waves] == [["node-1"], ["node-2"], ["node-3"]]
    d1 = writes(r.handle(Start(), 1.0))[0]
    assert converge(r, d1, 2.0) == ["node-2"]


def test_a_node_staged_while_its_old_slot_hangs_is_staged() -> None:
    """node-2 is staged ahead of its wave (--prestage 1) while its old slot hangs: its agent
    never converges (the old slot is not healthy), but the staged slot is healthy on the
    release, so the node is staged, not failed at the stage deadline; at its wave it is moved
    without the hung slot."""
    r = fleet(3, prestage="1", progress_deadline=30.0, bake=60.0)
    w = {d.node: d for d in writes(r.handle(Start(), 1.0))}
    r.handle(ObservedChanged("node-1", observed(w["node-1"], 1.5)), 1.5)  # wave 0 bakes
    stage = w["node-2"]
    assert stage.weights == {"a": 100, "b": 0}
    hung = ObservedState(
        node="node-2", service="hello", generation=stage.generation,
        observed_generation=stage.generation - 1, phase="converging", time=2.0,
        slots={"a": SlotStatus(slot="a", status="unhealthy", version=OLD.version),
               "b": SlotStatus(slot="b", status="healthy", version=NEW.version)})
    r.handle(ObservedChanged("node-2", hung), 2.0)
    assert r.record.nodes["node-2"].staged == "staged"
    r.handle(Tick(), 40.0)  # past the stage deadline: still staged, nothing failed
    assert r.state == "running" and r.record.nodes["node-2"].staged == "staged"
    (moved,) = [d for d in writes(r.handle(Tick(), 62.0)) if d.node == "node-2"]
    assert (moved.slots, moved.weights) == ({"b": NEW}, {"b": 100})


def hung_report(d: DesiredState, t: float, *, new: str = "b", old: str = "a") -> ObservedState:
    """An agent that has seen ``d`` and runs its ``new`` slot healthy (with the traffic ``d``
    gives it), while its ``old`` slot hangs: it never converges."""
    return ObservedState(
        node=d.node, service="hello", generation=d.generation,
        observed_generation=d.generation - 1, phase="converging", time=t,
        weights={new: 100} if d.weights.get(new, 0) > 0 else {},
        slots={old: SlotStatus(slot=old, status="unhealthy", version=OLD.version),
               new: SlotStatus(slot=new, status="healthy", version=NEW.version)})


def test_a_blue_green_over_a_node_whose_old_slot_hangs_stages_switches_and_succeeds() -> None:
    """Blue-green's stage keeps the old slot serving: node-2's agent never converges on it
    while that slot hangs, and the node is judged by its new slot, so the stage is not failed
    for it; the switch moves node-2 without the hung slot (node-1 keeps its old one warm for
    the switch back) and the rollout succeeds."""
    r = fleet(2, unhealthy=("node-2",), strategy="blue-green", prestage="")
    stage = {d.node: d for d in writes(r.handle(Start(), 1.0))}
    r.handle(ObservedChanged("node-1", observed(stage["node-1"], 2.0)), 2.0)
    switch = {d.node: d for d in writes(r.handle(
        ObservedChanged("node-2", hung_report(stage["node-2"], 2.0)), 2.0))}
    assert set(switch) == {"node-1", "node-2"}, r.record.reason
    assert switch["node-1"].weights == {"a": 0, "b": 100}
    assert (switch["node-2"].slots, switch["node-2"].weights) == ({"b": NEW}, {"b": 100})
    r.handle(ObservedChanged("node-1", observed(switch["node-1"], 3.0)), 3.0)
    # Not given the hung slot any more, its agent stops it and converges.
    r.handle(ObservedChanged("node-2", observed(switch["node-2"], 3.0)), 3.0)
    r.handle(Tick(), 400.0)  # past --scale-down-delay
    assert r.state == "succeeded", r.record.reason


def test_a_canary_puts_an_unhealthy_node_first_too() -> None:
    """With a budget of one and node-3 unhealthy, none of a canary's healthy nodes could ever
    start: node-3 is its first step, as in a rolling update, and starts."""
    r = fleet(3, unhealthy=("node-3",), strategy="canary", steps=["1", "100%"])
    assert r.record.waves[0].nodes == ["node-3"]
    assert [d.node for d in writes(r.handle(Start(), 1.0))] == ["node-3"]


def looping(d: DesiredState, t: float, *, new: str = "healthy") -> ObservedState:
    """``hung_report``, but the old slot crash-loops: the agent reports phase failed for it
    (as ``agent.reconcile.assess`` words it), its new slot ``new``."""
    seen = hung_report(d, t)
    return msgspec.structs.replace(
        seen, phase="failed", error="slot a (1.0.0) is in a restart loop after 5 restarts",
        slots={**seen.slots, "b": msgspec.structs.replace(seen.slots["b"], status=new)},
        weights=seen.weights if new == "healthy" else {})


def test_a_crash_looping_old_slot_fails_neither_staging_nor_a_weighted_step() -> None:
    """The agent says failed for a crash-looping slot of its desired state: node-2's old one,
    kept in its staging target (weight 100) and in a canary's 10 % step (weight 90). Its new
    slot healthy, that is not its failure: staged; done."""
    r = fleet(3, prestage="1", bake=60.0)
    w = {d.node: d for d in writes(r.handle(Start(), 1.0))}
    r.handle(ObservedChanged("node-2", looping(w["node-2"], 2.0, new="starting")), 2.0)
    assert (r.state, staged_of(r, "node-2")) == ("running", "staging"), r.record.reason
    r.handle(ObservedChanged("node-2", looping(w["node-2"], 3.0)), 3.0)
    assert (r.state, staged_of(r, "node-2")) == ("running", "staged"), r.record.reason
    c = fleet(2, unhealthy=("node-2",), strategy="canary", weights=[10, 100],
              max_unavailable="2", bake=60.0)
    first = {d.node: d for d in writes(c.handle(Start(), 1.0))}
    c.handle(ObservedChanged("node-2", looping(first["node-2"], 2.0, new="starting")), 2.0)
    assert (c.state, state_of(c, "node-2")) == ("running", "updating"), c.record.reason
    c.handle(ObservedChanged("node-2", looping(first["node-2"], 3.0)), 3.0)
    assert (c.state, state_of(c, "node-2")) == ("running", "done"), c.record.reason


def test_a_failure_of_the_new_slot_or_the_router_beside_a_looping_old_slot_fails() -> None:
    """The exemption is for the old slot's failure alone: the agent reporting its new slot
    failed, or its router, beside the old slot's loop, fails the staging."""
    for error in ("slot a (1.0.0) is in a restart loop; slot b (2.0.0) failed: exit 3",
                  "slot a (1.0.0) is in a restart loop; router: cannot bind"):
        r = fleet(3, prestage="1", bake=60.0, on_failure="pause")
        w = {d.node: d for d in writes(r.handle(Start(), 1.0))}
        seen = msgspec.structs.replace(looping(w["node-2"], 2.0, new="starting"), error=error)
        r.handle(ObservedChanged("node-2", seen), 2.0)
        assert r.state == "paused" and error in r.record.reason, r.record.reason


def test_a_weighted_step_over_a_node_whose_old_slot_hangs_is_judged_by_its_new_slot() -> None:
    """A canary at 10 % keeps both slots (its old one serves the other 90 %): on node-2, whose
    old slot hangs, the agent never converges, and the node is done once its new slot is
    healthy with traffic, not failed at the deadline."""
    r = fleet(2, unhealthy=("node-2",), strategy="canary", weights=[10, 100],
              max_unavailable="2", progress_deadline=30.0, bake=60.0)
    first = {d.node: d for d in writes(r.handle(Start(), 1.0))}
    assert first["node-2"].weights == {"a": 90, "b": 10}
    r.handle(ObservedChanged("node-1", observed(first["node-1"], 2.0)), 2.0)
    r.handle(ObservedChanged("node-2", hung_report(first["node-2"], 2.0)), 2.0)
    assert r.record.nodes["node-2"].state == "done"
    assert r.record.waves[0].state == "baking"
    r.handle(Tick(), 40.0)
    assert r.state == "running" and r.record.waves[0].state == "baking", r.record.reason


def test_the_agents_own_words_for_a_looping_old_slot_are_read_as_its_failure_alone() -> None:
    """``old_slot_failing`` reads the error the agent's ``assess`` writes: a staging target
    whose old slot crash-loops (its new one starting) is the old slot's failure alone; the
    same with the new slot failed too is the node's."""
    target = wanted(8, {"a": V1, "b": V2}, {"a": 100, "b": 0})
    old = SlotView(slot="a", status="unhealthy", digest=V1.digest, version=V1.version,
                   reason=f"{LOOP} after 5 restarts")
    for new, alone in ((SlotView(slot="b", status="starting", digest=V2.digest,
                                 version=V2.version, generation=8), True),
                       (SlotView(slot="b", status="failed", digest=V2.digest,
                                 version=V2.version, generation=8, reason="exit 3"), False)):
        said = assess(target, view(old, new))
        assert said.phase == "failed"
        seen = ObservedState(
            node="n", service="hello", generation=8, observed_generation=7,
            phase=said.phase, error=said.error,
            slots={s.slot: SlotStatus(slot=s.slot, status=s.status, version=s.version)
                   for s in (old, new)})
        assert old_slot_failing(seen, target, "b") is alone, said.error
