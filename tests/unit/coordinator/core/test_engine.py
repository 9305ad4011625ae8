"""The rollout engine in virtual time: transitions, commands, failures, rollback and gates."""

from __future__ import annotations

import random

import msgspec
import pytest

from coordinator.core.engine import (
    ACCEPTS,
    Abort,
    Command,
    EmitEvent,
    IllegalTransition,
    NodeOffline,
    NodeOnline,
    ObservedChanged,
    Pause,
    Persist,
    Promote,
    Resume,
    RollbackRequested,
    Rollout,
    Start,
    Tick,
    WriteDesired,
    new_record,
)
from coordinator.core.engine_prestage import Prestage
from coordinator.core.engine_step import Step, is_down
from coordinator.core.engine_types import peek
from protocol.messages import (
    LATENCY_BOUNDS_MS,
    DesiredState,
    Gates,
    NodeView,
    ObservedState,
    RolloutSpec,
    RouterStats,
    SlotStatus,
    SlotTraffic,
)
from protocol.testing import NEW, OLD
from tests.unit.coordinator.kit import events, kinds, rollout, writes


def previous(node: str, generation: int = 7) -> DesiredState:
    return DesiredState(fleet="f", node=node, service="hello", generation=generation,
                        slots={"a": OLD}, weights={"a": 100})


def observed(d: DesiredState, t: float, *, healthy: bool = True, failed: str = "",
             router: RouterStats | None = None) -> ObservedState:
    """What an agent reports once it has (or has not) converged on ``d``."""
    slots = {s: SlotStatus(slot=s, status="healthy" if healthy or r.digest == OLD.digest
                           else "unhealthy", version=r.version)
             for s, r in d.slots.items()}
    if failed:
        return ObservedState(node=d.node, service="hello", generation=d.generation,
                             observed_generation=d.generation - 1, slots=slots,
                             phase="failed", error=failed, time=t, router=router)
    return ObservedState(node=d.node, service="hello", generation=d.generation,
                         observed_generation=d.generation, slots=slots, weights=dict(d.weights),
                         phase="converged", time=t, router=router)


def sick(d: DesiredState, t: float) -> ObservedState:
    """What an agent reports when every slot of ``d`` went unhealthy on its own."""
    seen = observed(d, t)
    return msgspec.structs.replace(seen, slots={
        s: msgspec.structs.replace(v, status="unhealthy") for s, v in seen.slots.items()})


def converge(r: Rollout, cmds: list[Command], t: float) -> list[Command]:
    """Let every written node converge at time ``t``; return all commands this caused."""
    out: list[Command] = []
    for d in writes(cmds):
        out += r.handle(ObservedChanged(d.node, observed(d, t)), t)
    return out


def test_start_persists_first_then_writes_the_first_wave() -> None:
    """Start persists the running record before writing the first node's desired state."""
    r = rollout()
    cmds = r.handle(Start(), 1.0)
    assert isinstance(cmds[0], Persist) and cmds[0].record.state == "running"
    (d,) = writes(cmds)
    assert d.node == "node-1" and d.generation == 8
    assert d.slots == {"a": OLD, "b": NEW} and d.weights == {"a": 0, "b": 100}
    assert cmds.index(cmds[0]) < cmds.index(next(c for c in cmds if isinstance(c, WriteDesired)))
    assert "rollout.started" in kinds(cmds) and "wave.started" in kinds(cmds)


def test_rolling_happy_path_succeeds_and_retires_old_slots() -> None:
    """Each wave starts once the previous one converged; success retires the old slots."""
    r = rollout(3)
    cmds = r.handle(Start(), 0.0)
    t = 0.0
    seen = []
    while not r.done:
        t += 1.0
        seen += [d.node for d in writes(cmds)]
        cmds = converge(r, cmds, t)
    assert r.state == "succeeded"
    retire = writes(cmds)
    assert seen == ["node-1", "node-2", "node-3"]
    assert {d.node for d in retire} == {"node-1", "node-2", "node-3"}
    assert all(d.slots == {"b": NEW} and d.weights == {"b": 100} and d.generation == 9
               for d in retire)
    assert kinds(cmds)[-1] == "rollout.succeeded"


def test_a_success_is_said_before_the_writes_that_retire_the_old_slots() -> None:
    """The last step persists the record (succeeded), says so, then retires the old slots:
    the executor publishes an event that no write of its step precedes at once, so a followed
    deploy returns without waiting for a write to every node (after them, the success waited
    30 ms at 10 nodes, seconds at 10,000)."""
    r = rollout(3)
    cmds = r.handle(Start(), 0.0)
    t = 0.0
    while not r.done:
        t += 1.0
        cmds = converge(r, cmds, t)
    assert isinstance(cmds[0], Persist) and cmds[0].record.state == "succeeded"
    said = next(i for i, c in enumerate(cmds) if isinstance(c, EmitEvent)
                and c.kind == "rollout.succeeded")
    first_write = next(i for i, c in enumerate(cmds) if isinstance(c, WriteDesired))
    assert said < first_write and len(writes(cmds)) == 3


@pytest.mark.parametrize(
    ("state", "event"),
    [("running", Resume()), ("running", Start()), ("pending", Resume()), ("pending", Pause()),
     ("paused", Pause()), ("succeeded", Tick()), ("aborted", Resume()),
     ("rolled_back", ObservedChanged("node-1", ObservedState(node="node-1", service="hello")))],
)
def test_illegal_transitions_raise_and_change_nothing(state: str, event: object) -> None:
    """An event the state does not accept raises and leaves the record byte-identical."""
    r = rollout()
    if state != "pending":
        r.handle(Start(), 0.0)
    if state == "paused":
        r.handle(Pause(), 1.0)
    elif state == "succeeded":
        r = Rollout(msgspec.structs.replace(r.record, state="succeeded"), fleet="f")
    elif state == "aborted":
        r.handle(Abort(), 1.0)
    elif state == "rolled_back":
        r.handle(RollbackRequested(), 1.0)
        for d in r.intended():
            r.handle(ObservedChanged(d.node, observed(d, 2.0)), 2.0)
        assert r.state == "rolled_back"
    before = msgspec.json.encode(r.record)
    with pytest.raises(IllegalTransition, match="cannot"):
        r.handle(event, 5.0)  # type: ignore[arg-type]
    assert msgspec.json.encode(r.record) == before


def test_transition_table_has_no_exit_from_terminal_states() -> None:
    """Terminal states accept no event at all."""
    for state in ("succeeded", "rolled_back", "failed", "aborted"):
        assert ACCEPTS[state] == frozenset()


def test_agent_failure_rolls_back_touched_nodes_with_higher_generations() -> None:
    """A node reporting failure triggers one rollback wave restoring previous states."""
    r = rollout(3, batch="2", max_unavailable="2")
    cmds = r.handle(Start(), 0.0)
    d1, d2 = writes(cmds)
    r.handle(ObservedChanged("node-1", observed(d1, 1.0)), 1.0)
    cmds = r.handle(ObservedChanged("node-2", observed(d2, 2.0, failed="start timeout")), 2.0)
    back = writes(cmds)
    assert {d.node for d in back} == {"node-1", "node-2"}
    assert all(d.generation == 9 and d.slots == {"a": OLD} and d.weights == {"a": 100}
               for d in back)
    assert r.record.phase == "rollback" and "start timeout" in r.record.reason
    out = converge(r, cmds, 3.0)
    assert r.state == "rolled_back" and "node-2" in r.record.reason
    assert kinds(out)[-1] == "rollout.rolled_back"


def test_rollback_that_cannot_converge_ends_failed_with_the_reason() -> None:
    """A node that never converges back makes the rollout failed at the deadline, never stuck."""
    r = rollout(2, batch="2", max_unavailable="2", progress_deadline=30.0)
    assert len(writes(r.handle(Start(), 0.0))) == 2
    cmds = r.handle(NodeOffline("node-2"), 1.0)
    back = {d.node: d for d in writes(cmds)}
    r.handle(ObservedChanged("node-1", observed(back["node-1"], 2.0)), 2.0)
    assert r.state == "running"
    r.handle(Tick(), 30.0)
    assert r.state == "running"
    r.handle(Tick(), 31.0)
    assert r.state == "failed"
    assert "node-2" in r.record.reason and "offline" in r.record.reason


def test_a_wave_wider_than_max_unavailable_gives_each_node_a_whole_deadline() -> None:
    """A canary's 100% step over 4 nodes, max-unavailable 1, each node converging 40 s after
    its write: the last starts at 160 s, past the wave's first deadline (120 s). It converges
    and the rollout succeeds (it was failed as it was written, and the rollout rolled back);
    a node that then never converges fails a deadline after its own write."""
    for stuck in ("", "node-5"):
        r = rollout(5, strategy="canary", max_unavailable="1", progress_deadline=120.0)
        due = [(40.0, d) for d in writes(r.handle(Start(), 0.0))]
        t, failed_at = 0.0, None
        while not r.done and t < 1000:
            t += 1.0
            out = r.handle_all([ObservedChanged(d.node, observed(d, t))
                                for at, d in due if at == t and d.node != stuck], t)
            if not r.done:
                out += r.handle(Tick(), t)
            due += [(t + 40.0, d) for d in writes(out)]
            if failed_at is None and kinds(out).count("wave.failed"):
                failed_at = t
        if not stuck:
            assert r.state == "succeeded", r.record.reason
        else:
            written = min(at for at, d in due if d.node == stuck) - 40.0
            assert failed_at == written + 120.0, (failed_at, written)
            assert "node-5: did not converge within 2m" in r.record.reason


def test_a_wave_that_fails_in_a_step_starts_no_other_node_in_it() -> None:
    """One step where one node of a canary's last wave converges and another fails: the wave
    fails and the rollout pauses without writing a third node forward (it was left updating
    in the paused rollout, its node.updating told for a write the pause then stood over)."""
    r = rollout(5, strategy="canary", max_unavailable="2", on_failure="pause")
    first = r.handle(Start(), 0.0)
    wave2 = {d.node: d for d in writes(r.handle_all(
        [ObservedChanged(d.node, observed(d, 1.0)) for d in writes(first)], 1.0))}
    assert sorted(wave2) == ["node-2", "node-3"]
    out = r.handle_all([ObservedChanged("node-2", observed(wave2["node-2"], 2.0)),
                        ObservedChanged("node-3", observed(wave2["node-3"], 2.0,
                                                           failed="boom"))], 2.0)
    assert r.state == "paused" and writes(out) == [] and not events(out, "node.updating")
    assert {n: p.state for n, p in r.record.nodes.items() if n in ("node-4", "node-5")} == {
        "node-4": "waiting", "node-5": "waiting"}


def test_an_abort_gives_failed_nodes_their_previous_state_and_leaves_the_rest() -> None:
    """Paused on a failed node, then aborted: the failed node (its new release never served)
    gets its previous desired state again; a node done stays where it is. Left wanting the
    failed release at full weight, it was what the next rollout planned from (the failed
    release taken for the serving one: that deploy failed and rolled back to it)."""
    r = rollout(3, batch="1", max_unavailable="1", on_failure="pause")
    d1 = writes(r.handle(Start(), 0.0))[0]
    d2 = writes(r.handle(ObservedChanged(d1.node, observed(d1, 1.0)), 1.0))[0]
    r.handle(ObservedChanged(d2.node, observed(d2, 2.0, failed="slot b failed")), 2.0)
    assert r.state == "paused" and r.record.nodes[d2.node].state == "failed"
    out = r.handle(Abort(reason="operator"), 3.0)
    (back,) = writes(out)
    previous = r.record.nodes[d2.node].previous
    assert previous is not None
    assert back.node == d2.node and back.slots == previous.slots
    assert back.weights == previous.weights and back.generation > d2.generation
    assert events(out, "rollout.restored") and r.state == "aborted"
    assert r.record.nodes[d1.node].state == "done"


def test_progress_deadline_fails_the_node_and_pause_keeps_the_reason() -> None:
    """A node not converged by the deadline fails the wave; on-failure pause says why."""
    r = rollout(2, on_failure="pause", progress_deadline=60.0)
    (d1,) = writes(r.handle(Start(), 0.0))
    r.handle(Tick(), 59.0)
    assert r.state == "running"
    cmds = r.handle(Tick(), 60.0)
    assert r.state == "paused" and "did not converge within 1m" in r.record.reason
    assert writes(cmds) == []
    cmds = r.handle(Resume(), 100.0)
    (retry,) = writes(cmds)
    assert retry.node == "node-1" and retry.generation == d1.generation + 1
    converge(r, cmds, 101.0)
    assert r.record.current_wave == 1


def test_offline_node_fails_its_wave() -> None:
    """A node going offline while updating counts as failed."""
    r = rollout(2, on_failure="pause")
    r.handle(Start(), 0.0)
    r.handle(NodeOffline("node-1"), 3.0)
    assert r.state == "paused"
    assert "node-1: lost (offline) during wave 1 while updating" in r.record.reason


def test_max_unavailable_counts_offline_nodes_before_starting_others() -> None:
    """With one node offline and max-unavailable 2, only one more node may be in flight."""
    r = rollout(4, batch="2", max_unavailable="2", progress_deadline=10.0, on_failure="pause")
    r.handle(NodeOffline("node-4"), 0.0)
    (d1,) = writes(r.handle(Start(), 0.0))  # wave 0 = node-1, node-2: only one may start
    assert d1.node == "node-1"
    (d2,) = writes(r.handle(ObservedChanged("node-1", observed(d1, 1.0)), 1.0))
    assert d2.node == "node-2"
    r.handle(ObservedChanged("node-2", observed(d2, 2.0)), 2.0)
    assert r.record.current_wave == 1
    assert r.state == "paused"
    assert "node-4: lost (offline) during wave 2 before it was started" in r.record.reason


def test_stale_observations_are_ignored() -> None:
    """A report older than one already seen cannot undo progress."""
    r = rollout(2, on_failure="pause")
    (d1,) = writes(r.handle(Start(), 0.0))
    late = observed(d1, 5.0, failed="old failure")
    r.handle(ObservedChanged("node-1", observed(d1, 6.0)), 6.0)
    assert r.record.nodes["node-1"].state == "done"
    r.handle(ObservedChanged("node-1", late), 7.0)
    assert r.state == "running"


def router(epoch: float, requests: int, errors: int, slot: str = "b") -> RouterStats:
    lat = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    lat[10] = requests
    return RouterStats(epoch=epoch, slots={slot: SlotTraffic(requests=requests, errors=errors,
                                                             latency=lat)})


def test_gates_fail_after_the_bake_and_roll_back() -> None:
    """Errors on the new slot over the bake window fail the gate with its figures."""
    r = rollout(1, bake=30.0, gates=Gates(max_error_rate=0.05))
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", observed(d, 1.0, router=router(1.0, 10, 0))), 1.0)
    assert r.record.waves[0].state == "baking"
    r.handle(ObservedChanged("node-1", observed(d, 20.0, router=router(1.0, 110, 30))), 20.0)
    assert r.record.waves[0].state == "baking"
    cmds = r.handle(Tick(), 31.0)
    assert "gate.failed" in kinds(cmds)
    assert r.record.waves[0].gates["error_rate"] == 0.3
    assert r.record.phase == "rollback" and "max-error-rate" in r.record.reason


def test_a_slot_that_crashes_during_the_bake_fails_the_node_saying_why() -> None:
    """The wave's reason carries the slot's own reason (its exit), not only its status."""
    r = rollout(1, bake=30.0)
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", observed(d, 1.0)), 1.0)
    assert r.record.waves[0].state == "baking"
    crashed = observed(d, 5.0)
    crashed.slots["b"] = SlotStatus(slot="b", status="starting", version="2.0.0",
                                    reason="exited with status 1; restarting in 1s")
    r.handle(ObservedChanged("node-1", crashed), 5.0)
    assert r.record.phase == "rollback"
    assert ("node-1: new slot b is starting during the bake: exited with status 1; "
            "restarting in 1s") in r.record.reason, r.record.reason


def baked_wave(r: Rollout, start: dict[str, RouterStats], end: dict[str, RouterStats]
               ) -> list[Command]:
    """Converge the first wave with ``start`` counters, report ``end`` at t=20, tick at t=31."""
    ds = writes(r.handle(Start(), 0.0))
    for d in ds:
        r.handle(ObservedChanged(d.node, observed(d, 1.0, router=start[d.node])), 1.0)
    assert r.record.waves[0].state == "baking"
    for d in ds:
        r.handle(ObservedChanged(d.node, observed(d, 20.0, router=end[d.node])), 20.0)
    return r.handle(Tick(), 31.0)


def test_a_node_cannot_hide_the_errors_of_a_bad_release() -> None:
    """A node reporting negative errors would cancel the others' errors and pass the gate;
    its figures are left out instead, so the honest node's errors fail it."""
    r = rollout(2, batch="2", max_unavailable="2", bake=30.0, gates=Gates(max_error_rate=0.05))
    start = {"node-1": router(1.0, 0, 0), "node-2": router(1.0, 0, 0)}
    end = {"node-1": router(1.0, 100, 30), "node-2": router(1.0, 100, -30)}
    cmds = baked_wave(r, start, end)
    assert "gate.failed" in kinds(cmds)
    assert r.record.phase == "rollback"
    assert "node-2's router figures are invalid (slot 'b': errors -30 is negative); left out" \
        in r.record.reason
    assert r.record.waves[0].gates["errors"] == 30
    assert r.record.waves[0].gates["untrusted"] == {"node-2": "slot 'b': errors -30 is negative"}


def test_a_node_cannot_force_a_rollback_with_invented_errors() -> None:
    """A node reporting more errors than requests would fail a healthy release; its figures are
    left out, and since untrusted evidence is never a pass the rollout pauses, naming it."""
    r = rollout(2, batch="2", max_unavailable="2", bake=30.0, gates=Gates(max_error_rate=0.05))
    start = {"node-1": router(1.0, 0, 0), "node-2": router(1.0, 0, 0)}
    end = {"node-1": router(1.0, 100, 0), "node-2": router(1.0, 10, 500)}
    cmds = baked_wave(r, start, end)
    assert "gate.inconclusive" in kinds(cmds) and "gate.failed" not in kinds(cmds)
    assert r.state == "paused" and r.record.phase == "forward"
    assert "node-2's router figures are invalid (slot 'b': errors 500 > requests 10)" \
        in r.record.reason


def test_no_traffic_is_inconclusive_then_promote_continues() -> None:
    """A traffic gate with no requests pauses as inconclusive; promote passes the wave."""
    r = rollout(2, bake=10.0, gates=Gates(max_error_rate=0.05))
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", observed(d, 1.0)), 1.0)
    r.handle(Tick(), 11.0)
    assert r.state == "paused" and "inconclusive" in r.record.reason
    cmds = r.handle(Promote(), 12.0)
    assert r.state == "running" and [w.node for w in writes(cmds)] == ["node-2"]
    assert r.record.promote == ""


def test_operator_rollback_and_abort() -> None:
    """A paused rollout can be rolled back by the operator; abort stops without writing."""
    r = rollout(2)
    r.handle(Start(), 0.0)
    r.handle(Pause(), 1.0)
    cmds = r.handle(RollbackRequested(), 2.0)
    assert r.state == "running" and r.record.phase == "rollback" and len(writes(cmds)) == 1
    with pytest.raises(IllegalTransition, match="rolling back"):
        r.handle(Pause(), 3.0)
    a = rollout(2)
    a.handle(Start(), 0.0)
    cmds = a.handle(Abort(), 1.0)
    assert a.state == "aborted" and writes(cmds) == [] and a.record.finished == 1.0


def test_node_back_online_is_recorded() -> None:
    """Online/offline changes of target nodes are recorded and announced once."""
    r = rollout(2)
    assert kinds(r.handle(NodeOffline("node-2"), 0.0)) == ["rollout.node.offline"]
    assert r.handle(NodeOffline("node-2"), 1.0) == []
    assert kinds(r.handle(NodeOnline("node-2"), 2.0)) == ["rollout.node.online"]
    assert r.handle(NodeOffline("elsewhere"), 3.0) == []


def test_canary_weights_rewrite_the_same_nodes_with_growing_weights() -> None:
    """A weighted canary writes each node again per weight, generations growing."""
    r = rollout(1, strategy="canary", weights=[10, 100])
    (d,) = writes(r.handle(Start(), 0.0))
    assert d.weights == {"a": 90, "b": 10}
    cmds = r.handle(ObservedChanged("node-1", observed(d, 1.0)), 1.0)
    (d2,) = writes(cmds)
    assert d2.weights == {"a": 0, "b": 100} and d2.generation == d.generation + 1
    converge(r, cmds, 2.0)
    assert r.state == "succeeded"


def test_node_already_on_the_release_is_not_written() -> None:
    """A node that already serves the new release is done without a write."""
    spec = RolloutSpec(service="hello", version="2.0.0")
    cur = DesiredState(fleet="f", node="node-1", service="hello", generation=3,
                       slots={"b": NEW}, weights={"b": 100})
    rec = new_record(id="r", spec=spec, release=NEW, nodes=[NodeView(id="node-1")],
                     current={"node-1": cur}, now=0.0)
    r = Rollout(rec, fleet="f")
    cmds = r.handle(Start(), 0.0)
    assert writes(cmds) == [] and r.state == "succeeded"


def test_node_already_on_the_release_is_not_failed_by_the_bake() -> None:
    """Its agent's report names no new slot (none was written): the bake does not read that as
    the new slot missing (it failed such a rollout with "new slot  is empty during the bake")."""
    spec = RolloutSpec(service="hello", version="2.0.0", bake=2.0)
    cur = DesiredState(fleet="f", node="node-1", service="hello", generation=3,
                       slots={"b": NEW}, weights={"b": 100})
    rec = new_record(id="r", spec=spec, release=NEW, nodes=[NodeView(id="node-1")],
                     current={"node-1": cur}, now=0.0)
    r = Rollout(rec, fleet="f")
    r.handle(ObservedChanged("node-1", observed(cur, 0.0)), 0.0)
    cmds = r.handle(Start(), 0.0)
    t = 0.0
    while not r.done and t < 10.0:
        t += 0.5
        cmds += r.handle(ObservedChanged("node-1", observed(cur, t)), t)
        if not r.done:
            cmds += r.handle(Tick(), t)
    assert writes(cmds) == []
    assert r.state == "succeeded", r.record.reason


def _play(seed: int, check: bool, prestage: str = "1") -> list[list[Command]]:
    """A seeded mix of what a fleet does (reports on what it was told, failures, nodes going
    offline and back, time passing) played on a 12-node rolling rollout (batches of 3,
    max-unavailable 3, ``prestage`` waves staged ahead), resumed whenever it pauses, until it
    ends or 300 moves were made; with ``check``, the engine's kept set of unavailable nodes is
    compared with a scan after every step."""
    rng = random.Random(seed)
    r = rollout(12, batch="3", max_unavailable="3", progress_deadline=5.0, on_failure="pause",
                prestage=prestage)
    told: dict[str, DesiredState] = {}
    out: list[list[Command]] = []

    def handle(event: object, t: float) -> None:
        try:
            cmds = r.handle(event, t)  # type: ignore[arg-type]
        except IllegalTransition:
            return
        told.update((d.node, d) for d in writes(cmds))
        out.append(cmds)
        if check:
            assert r._down == {n for n, p in r.record.nodes.items()
                               if is_down(p, r._observed.get(n))}

    handle(Start(), 0.0)
    t = 0.0
    for _ in range(300):
        if r.done:
            break
        t += rng.choice((0.1, 0.5, 2.0))
        what = rng.choices(("converge", "fail", "offline", "online", "tick", "sick"),
                           weights=(20, 1, 1, 2, 2, 2))[0]
        node = rng.choice(sorted(told)) if told and what in ("converge", "fail") else \
            f"node-{rng.randint(1, 12)}"
        if what == "offline":
            handle(NodeOffline(node), t)
        elif what == "online":
            handle(NodeOnline(node), t)
        elif what == "sick":  # its serving slots unhealthy on their own, until it reports again
            was = told.get(node) or r.record.nodes[node].previous
            assert was is not None
            handle(ObservedChanged(node, sick(was, t)), t)
        elif what == "tick" or node not in told:
            handle(Tick(), t)
        else:
            failed = "crashed" if what == "fail" else ""
            handle(ObservedChanged(node, observed(told[node], t, failed=failed)), t)
        if r.state == "paused":
            handle(Resume(), t)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_the_kept_unavailable_set_decides_as_a_scan_of_every_node(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Step.unavailable`` reads the engine's set of unavailable nodes, kept up to date with
    the nodes each step took (O(those), not O(fleet)): through offline and online nodes,
    failures, pauses, resumes and deadlines, the set stays what a scan of every node says and
    every step decides what it decided with that scan."""
    kept = _play(seed, check=True)
    monkeypatch.setattr(Step, "unavailable", lambda self: {
        n for n, p in peek(self.r.nodes) if is_down(p, self.obs.get(n))})
    assert kept == _play(seed, check=False)


@pytest.mark.parametrize("prestage", ["1", "all"])
@pytest.mark.parametrize("seed", range(8))
def test_pre_staging_judges_only_what_changed_and_decides_as_a_scan_of_its_window(
        seed: int, prestage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-staging's check reads the staged window whole only when a staging node's deadline
    may have passed, else only the nodes whose report or progress changed in the step
    (``Prestage.watched``): through staging, staged nodes failing, offline and online nodes,
    deadlines, pauses and resumes, every step decides what a scan of the whole window decides."""
    kept = _play(seed, check=False, prestage=prestage)
    assert any(k == "node.staged" for cmds in kept for k in kinds(cmds))
    monkeypatch.setattr(Prestage, "watched", Prestage.ahead)
    assert kept == _play(seed, check=False, prestage=prestage)


def _staging_deadline_after_a_return() -> tuple[Rollout, str]:
    """Nine nodes in batches of 3, two waves staged ahead, a long bake: a node of wave 2 goes
    offline while staging and comes back online (it never reports) before its staging
    deadline (10 s) passes, which gives it a whole deadline from its return (14 s); time then
    passes that. The rollout and that node."""
    r = rollout(9, batch="3", prestage="2", progress_deadline=10.0, bake=100.0,
                on_failure="pause")
    told = {d.node: d for d in writes(r.handle(Start(), 0.0))}
    victim = r.record.waves[2].nodes[0]
    assert victim in told
    r.handle(NodeOffline(victim), 1.0)
    for node, d in sorted(told.items()):
        if node != victim:
            r.handle(ObservedChanged(node, observed(d, 2.0)), 2.0)
    r.handle(Promote(), 3.0)
    r.handle(Tick(), 3.5)
    r.handle(NodeOnline(victim), 4.0)
    for t in (5.0, 11.0, 12.0):
        r.handle(Tick(), t)
    assert r.state == "running"
    for t in (14.0, 15.0):
        r.handle(Tick(), t)
    return r, victim


def test_a_staging_node_back_online_fails_at_its_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The incremental check left a node that was offline at its last full read out of the
    earliest deadline; back online but silent, it was failed late or never (found by a
    review). It fails at its deadline, as a scan of the whole window says."""
    r, victim = _staging_deadline_after_a_return()
    assert r.state == "paused"
    assert f"{victim}: staging for wave 3: not healthy within 10s" in r.record.reason
    assert r.record.nodes[victim].stage_deadline == 14.0
    monkeypatch.setattr(Prestage, "watched", Prestage.ahead)
    scan, _ = _staging_deadline_after_a_return()
    assert (scan.state, scan.record.reason) == (r.state, r.record.reason)


@pytest.mark.parametrize(("fields", "asked"), [
    ({}, 0.0),
    ({"bake": 30.0}, 0.0),  # that the rollout reads counters the leader's pace says
    ({"bake": 30.0, "gates": Gates(analysis="sequential")}, 0.25),
])
def test_only_a_sequential_waves_states_ask_for_faster_reads(
    fields: dict[str, object], asked: float,
) -> None:
    """Sequential analysis asks the wave's nodes to read their routers every 0.25 s; nothing
    else asks anything in a desired state (a write would be needed to stop asking), and the
    old slots' retirement asks nothing again."""
    r = rollout(1, **fields)  # type: ignore[arg-type]
    (d,) = writes(r.handle(Start(), 0.0))
    assert d.stats_every == asked
    from coordinator.core.targets import retire_target

    assert retire_target(d, slot="b", generation=9, now=1.0).stats_every == 0.0
