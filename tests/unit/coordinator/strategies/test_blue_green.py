"""Blue-green in the rollout engine, in virtual time: stage, switch, warm window, switch back."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.core import engine_rollback
from coordinator.core.engine import (
    Command,
    EmitEvent,
    IllegalTransition,
    NodeOffline,
    ObservedChanged,
    Pause,
    Promote,
    Resume,
    RollbackRequested,
    Rollout,
    Start,
    Tick,
    WriteDesired,
)
from coordinator.errors import UsageError
from coordinator.strategies import blue_green, plan
from coordinator.strategies.blue_green import spread
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
from tests.unit.coordinator import kit
from tests.unit.coordinator.kit import events, writes

NB = len(LATENCY_BOUNDS_MS) + 1


def previous(node: str) -> DesiredState:
    return DesiredState(fleet="f", node=node, service="hello", generation=7,
                        slots={"a": OLD}, weights={"a": 100})


def rollout(n: int = 3, **kw: object) -> Rollout:
    return kit.rollout(n, id="bg", strategy="blue-green", **kw)


def traffic(epoch: float = 1.0, **slots: tuple[int, int, int]) -> RouterStats:
    """Router stats with (requests, errors, latency bucket) per slot."""
    out = {}
    for s, (req, err, bucket) in slots.items():
        lat = [0] * NB
        lat[bucket] = req
        out[s] = SlotTraffic(requests=req, errors=err, latency=lat)
    return RouterStats(epoch=epoch, slots=out)


def observed(d: DesiredState, t: float, *, staged: str = "healthy", failed: str = "",
             router: RouterStats | None = None) -> ObservedState:
    """An agent's report on ``d``: converged unless ``failed``; the new slot's status given."""
    slots = {s: SlotStatus(slot=s, status="healthy" if r == OLD else staged,  # type: ignore[arg-type]
                           version=r.version) for s, r in d.slots.items()}
    done = not failed and staged == "healthy"
    return ObservedState(
        node=d.node, service="hello", generation=d.generation,
        observed_generation=d.generation if done else d.generation - 1, slots=slots,
        weights={s: w for s, w in d.weights.items() if w > 0} if done else {"a": 100},
        phase="failed" if failed else ("converged" if done else "converging"), error=failed,
        time=t, router=router)


def converge(r: Rollout, cmds: list[Command], t: float, step: float = 0.0,
             router: RouterStats | None = None) -> list[Command]:
    """Every written node reports convergence, the i-th at ``t + i * step``."""
    out: list[Command] = []
    for i, d in enumerate(writes(cmds)):
        out += r.handle(ObservedChanged(d.node, observed(d, t + i * step, router=router)),
                        t + i * step)
    return out


def staged_and_switched(r: Rollout, step: float = 0.0) -> list[Command]:
    """Run the rollout through staging and the switch; return the switch's convergence."""
    switch = converge(r, r.handle(Start(), 0.0), 1.0)
    assert len(writes(switch)) == len(r.record.nodes)
    return converge(r, switch, 2.0, step)


@pytest.mark.parametrize(
    ("n", "kw", "expected"),
    [
        pytest.param(1, {}, [(0, 1), (100, 1)], id="one-node"),
        pytest.param(5, {"max_unavailable": "1"}, [(0, 5), (100, 5)], id="all-nodes-one-wave"),
        pytest.param(3, {"scale_down_delay": 0.0}, [(0, 3), (100, 3)], id="no-delay"),
    ],
)
def test_plan_stages_then_switches_every_node(n: int, kw: dict[str, object],
                                              expected: list[tuple[int, int]]) -> None:
    """Blue-green plans one staging wave at weight 0 and one switch wave, over every node."""
    spec = RolloutSpec(service="hello", version="2.0.0", strategy="blue-green",
                       **kw)  # type: ignore[arg-type]
    waves = plan([NodeView(id=f"node-{i}") for i in range(1, n + 1)], spec)
    assert [(w.weight, len(w.nodes)) for w in waves] == expected


def test_negative_scale_down_delay_is_a_usage_error() -> None:
    """A negative --scale-down-delay is refused before anything moves."""
    spec = RolloutSpec(service="hello", version="2.0.0", strategy="blue-green",
                       scale_down_delay=-1.0)
    with pytest.raises(UsageError, match="scale-down-delay"):
        plan([NodeView(id="node-1")], spec)


def test_staging_writes_every_node_at_once_at_weight_zero() -> None:
    """Start stages the new release on all nodes in one batch, ignoring max-unavailable."""
    r = rollout(4, max_unavailable="1")
    ds = writes(r.handle(Start(), 0.0))
    assert [d.node for d in ds] == ["node-1", "node-2", "node-3", "node-4"]
    assert all(d.slots == {"a": OLD, "b": NEW} and d.weights == {"a": 100, "b": 0}
               and d.mirror is None and d.generation == 8 for d in ds)


def test_staging_needs_the_staged_slot_healthy_before_switching() -> None:
    """A node still starting its staged slot holds the switch for everyone."""
    r = rollout(2)
    d1, d2 = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", observed(d1, 1.0)), 1.0)
    cmds = r.handle(ObservedChanged("node-2", observed(d2, 1.0, staged="starting")), 1.0)
    assert writes(cmds) == [] and r.record.current_wave == 0
    cmds = r.handle(ObservedChanged("node-2", observed(d2, 2.0)), 2.0)
    assert {d.node for d in writes(cmds)} == {"node-1", "node-2"}


def test_switch_is_one_batch_and_the_spread_is_recorded() -> None:
    """All nodes switch in one batch; their observed switch times give the spread."""
    r = rollout(3, scale_down_delay=60.0)
    switch = converge(r, r.handle(Start(), 0.0), 1.0)
    ds = writes(switch)
    assert all(d.slots == {"a": OLD, "b": NEW} and d.weights == {"a": 0, "b": 100}
               for d in ds)
    (ev,) = events(switch, "bluegreen.switching")
    assert ev.data["at"] == 1.0
    out = converge(r, switch, 2.0, step=0.25)
    (done,) = events(out, "bluegreen.switched")
    assert done.data["spread"] == 0.5 and done.data["lag"] == 1.5
    report = kit.report(r.record)["switch"]
    assert report["nodes"] == {"node-1": 2.0, "node-2": 2.25, "node-3": 2.5}
    assert report["spread"] == 0.5 and r.state == "running"


@pytest.mark.parametrize(
    ("on_failure", "fault"),
    [
        pytest.param("rollback", "agent", id="agent-failure"),
        pytest.param("pause", "agent", id="agent-failure-despite-pause"),
        pytest.param("rollback", "offline", id="offline"),
        pytest.param("pause", "deadline", id="deadline"),
    ],
)
def test_a_node_that_fails_to_stage_blocks_the_switch_for_all(on_failure: str,
                                                              fault: str) -> None:
    """A staging failure switches nothing, restores every node and ends naming the node."""
    r = rollout(3, on_failure=on_failure, progress_deadline=30.0)
    d1, d2, d3 = writes(r.handle(Start(), 0.0))
    cmds = r.handle(ObservedChanged("node-1", observed(d1, 1.0)), 1.0)
    cmds += r.handle(ObservedChanged("node-3", observed(d3, 1.0)), 1.0)
    if fault == "agent":
        cmds += r.handle(ObservedChanged("node-2", observed(d2, 2.0, failed="validate failed")),
                         2.0)
    elif fault == "offline":
        cmds += r.handle(NodeOffline("node-2"), 2.0)
    else:
        cmds += r.handle(Tick(), 30.0)
    back = writes(cmds)
    assert all(w.weights.get("b", 0) == 0 for w in back), "nothing was switched"
    assert {d.node for d in back} == {"node-1", "node-2", "node-3"}
    assert all(d.slots == {"a": OLD} and d.weights == {"a": 100} and d.generation == 9
               for d in back)
    if fault == "offline":  # node-2 stays silent: the rollback gives up on it at its deadline
        cmds = [c for c in cmds if not (isinstance(c, WriteDesired) and c.desired.node == "node-2")]
    out = converge(r, cmds, 31.0 if fault == "deadline" else 3.0)
    if fault == "offline":
        out += r.handle(Tick(), 32.0)
    assert r.state == ("failed" if fault == "offline" else "rolled_back")
    assert "node-2" in r.record.reason
    assert not [c for c in out if isinstance(c, WriteDesired) and c.desired.weights.get("b")]


def test_min_healthy_gate_on_the_staged_slots() -> None:
    """--min-healthy is judged on the staged slots before the switch, figures recorded."""
    r = rollout(2, gates=Gates(min_healthy=1.0))
    switch = converge(r, r.handle(Start(), 0.0), 1.0)
    assert events(switch, "gate.passed")
    gates = r.record.waves[0].gates
    assert gates["healthy"] == 2 and gates["outcome"] == "pass"
    assert gates["thresholds"]["min_healthy"] == 1.0


def test_staged_slot_turning_unhealthy_before_the_switch_rolls_back() -> None:
    """A staged slot that turns unhealthy after staging stops the switch."""
    r = rollout(2)
    d1, d2 = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", observed(d1, 1.0)), 1.0)
    sick = observed(d1, 1.5)
    sick.slots["b"].status = "unhealthy"
    r.handle(ObservedChanged("node-1", sick), 1.5)
    cmds = r.handle(ObservedChanged("node-2", observed(d2, 2.0)), 2.0)
    assert all(d.weights == {"a": 100} for d in writes(cmds))
    assert r.record.phase == "rollback" and "node-1" in r.record.reason


@pytest.mark.parametrize(
    "trigger",
    [pytest.param("gate", id="post-switch-gate-fails"),
     pytest.param("operator", id="rollback-requested-in-window")],
)
def test_rollback_in_the_window_switches_back_then_retires_the_new_slot(trigger: str) -> None:
    """Inside the window a rollback is a weight switch keeping both slots, then a retirement."""
    gates = Gates(max_error_rate=0.05) if trigger == "gate" else Gates()
    r = rollout(2, bake=30.0, scale_down_delay=300.0, gates=gates)
    staged_and_switched(r)  # the bake starts at t=2
    if trigger == "gate":
        bad = traffic(b=(100, 50, 10))
        for d in r.intended():
            r.handle(ObservedChanged(d.node, observed(d, 20.0, router=bad)), 20.0)
        cmds = r.handle(Tick(), 32.0)
        assert events(cmds, "gate.failed")
    else:
        r.handle(Tick(), 100.0)
        assert r.record.waves[1].state == "passed" and r.state == "running"
        cmds = r.handle(RollbackRequested(), 101.0)
    back = writes(cmds)
    assert len(back) == 2 and events(cmds, "bluegreen.switching_back")
    assert all(d.slots == {"a": OLD, "b": NEW} and d.weights == {"a": 100, "b": 0}
               and d.mirror is None for d in back)
    retire = converge(r, cmds, 110.0, step=0.1)
    assert all(d.slots == {"a": OLD} and d.weights == {"a": 100} for d in writes(retire))
    assert kit.report(r.record)["switch_back"]["spread"] == 0.1
    converge(r, retire, 111.0)
    assert r.state == "rolled_back"
    gens = [d.generation for d in back + writes(retire)]
    assert gens == [10, 10, 11, 11]


def test_a_rollback_retires_the_new_slots_only_once_every_node_is_back() -> None:
    """The switch back goes first everywhere: a node back on its old slot keeps the new one
    until the last node is back, then every new slot is retired in the same step."""
    r = rollout(3, bake=30.0, scale_down_delay=300.0)
    staged_and_switched(r)
    r.handle(Tick(), 100.0)
    back = writes(r.handle(RollbackRequested(), 101.0))
    first = r.handle(ObservedChanged(back[0].node, observed(back[0], 102.0)), 102.0)
    second = r.handle(ObservedChanged(back[1].node, observed(back[1], 102.1)), 102.1)
    assert writes(first) == writes(second) == []  # node-3 is still on the new slot
    last = r.handle(ObservedChanged(back[2].node, observed(back[2], 102.2)), 102.2)
    assert sorted(d.node for d in writes(last)) == ["node-1", "node-2", "node-3"]
    assert all(d.slots == {"a": OLD} for d in writes(last))
    # Told before the retirement's writes (the executor publishes an event that precedes every
    # write of its step at once): what users feel need not wait for 3 (or 10,000) writes.
    told = next(i for i, c in enumerate(last)
                if isinstance(c, EmitEvent) and c.kind == "bluegreen.switched_back")
    assert told < min(i for i, c in enumerate(last) if isinstance(c, WriteDesired))


def test_the_retirement_after_a_slow_switch_back_has_a_whole_deadline() -> None:
    """The last node back 2 s before the rollback's deadline: the new slots' retirement that
    follows gets a whole --progress-deadline (with the 2 s left, every node failed "did not
    converge back" and the rollout ended failed, though users were back on the old slots)."""
    r = rollout(2, bake=30.0, scale_down_delay=300.0, progress_deadline=120.0)
    staged_and_switched(r)
    r.handle(Tick(), 100.0)
    back = writes(r.handle(RollbackRequested(), 101.0))
    r.handle(ObservedChanged(back[0].node, observed(back[0], 102.0)), 102.0)
    retire = r.handle(ObservedChanged(back[1].node, observed(back[1], 219.0)), 219.0)
    assert sorted(d.node for d in writes(retire)) == ["node-1", "node-2"]
    r.handle(Tick(), 222.0)
    assert r.record.phase == "rollback" and not r.done, (r.state, r.record.reason)
    converge(r, retire, 230.0)
    assert r.state == "rolled_back", (r.state, r.record.reason)


def test_a_switch_back_reads_each_node_back_once_not_every_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes reporting back one a step, in order: the check whether every node is back resumes
    at the first one not yet seen back, so the steps read each node about once (200 nodes:
    ~20,000 reads when every step read from the first; 10,000 nodes made it ~50 million)."""
    n = 200
    r, back = rolling_back(n)
    reads = counting(monkeypatch, blue_green, "_back_on")
    for i, d in enumerate(back):
        cmds = r.handle(ObservedChanged(d.node, observed(d, 102.0 + i / 1000)), 102.0 + i / 1000)
    assert events(cmds, "bluegreen.switched_back")
    assert reads[0] <= 3 * n, reads


def rolling_back(n: int) -> tuple[Rollout, list[DesiredState]]:
    """A blue-green rollout of ``n`` nodes switched, then told to roll back: its switch backs."""
    r = rollout(n, bake=30.0, scale_down_delay=300.0)
    staged_and_switched(r)
    r.handle(Tick(), 100.0)
    return r, writes(r.handle(RollbackRequested(), 101.0))


def counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """``module.name`` counted: the returned list's one item is how many calls so far."""
    calls = [0]
    real = getattr(module, name)

    def counted(*args: object) -> object:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_rollback_step_checks_only_the_nodes_whose_report_changed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's verdict (back or not) is kept while its report and target stay the same
    objects: 200 nodes back one a step check convergence ~once a report (every node every step
    before: ~20,000), and a node seen back whose next report says otherwise is checked again."""
    n = 200
    r, back = rolling_back(n)
    checks = counting(monkeypatch, engine_rollback, "converged")
    for i, d in enumerate(back[:-1]):
        r.handle(ObservedChanged(d.node, observed(d, 102.0 + i / 1000)), 102.0 + i / 1000)
    assert checks[0] <= 2 * n, checks
    # node-1, back, now reports its switch back failed: that new report is checked, and counts
    first = back[0]
    r.handle(ObservedChanged(first.node, observed(first, 103.0, failed="slot a crashed")), 103.0)
    assert r.record.nodes[first.node].state == "failed"
    cmds = r.handle(ObservedChanged(back[-1].node, observed(back[-1], 103.1)), 103.1)
    assert first.node not in {d.node for d in writes(cmds)}  # the others' new slots retired
    assert len(writes(cmds)) == n - 1


def test_a_node_that_never_switches_back_fails_and_the_others_are_still_retired() -> None:
    """At the rollback deadline a node still on the new slot fails; the nodes that are back
    then get their new slots retired, with time to converge, and end rolled back."""
    r = rollout(3, bake=30.0, scale_down_delay=300.0, progress_deadline=60.0)
    staged_and_switched(r)
    r.handle(Tick(), 100.0)
    back = writes(r.handle(RollbackRequested(), 101.0))
    for d in back[:2]:
        r.handle(ObservedChanged(d.node, observed(d, 102.0)), 102.0)
    cmds = r.handle(Tick(), 161.5)  # past 101 + 60: node-3 never answered
    assert [e.node for e in events(cmds, "node.failed")] == [back[2].node]
    retire = writes(cmds)
    assert sorted(d.node for d in retire) == sorted(d.node for d in back[:2])
    converge(r, cmds, 162.0)
    assert r.state == "failed"
    assert {n: p.state for n, p in r.record.nodes.items()} == {
        back[0].node: "rolled_back", back[1].node: "rolled_back", back[2].node: "failed"}


def test_after_the_window_the_old_slot_is_retired_and_rollback_is_illegal() -> None:
    """The old slots stay warm until switch + scale-down-delay, then are retired."""
    r = rollout(2, scale_down_delay=60.0)
    out = staged_and_switched(r)
    assert r.state == "running" and events(out, "bluegreen.warm")
    assert writes(r.handle(Tick(), 60.9)) == [] and r.state == "running"
    cmds = r.handle(Tick(), 61.0)
    assert r.state == "succeeded"
    assert all(d.slots == {"b": NEW} and d.weights == {"b": 100} for d in writes(cmds))
    before = msgspec.json.encode(r.record)
    with pytest.raises(IllegalTransition, match="succeeded"):
        r.handle(RollbackRequested(), 62.0)
    assert msgspec.json.encode(r.record) == before


def test_promote_in_the_window_retires_now() -> None:
    """Promote during the warm window skips the rest of it."""
    r = rollout(1, scale_down_delay=600.0)
    staged_and_switched(r)
    cmds = r.handle(Promote(), 5.0)
    assert r.state == "succeeded" and events(cmds, "bluegreen.promoted")
    assert writes(cmds)[0].slots == {"b": NEW}


def test_a_pause_in_the_window_keeps_the_old_slot_until_resumed() -> None:
    """A paused rollout retires nothing, even after the window; resume retires."""
    r = rollout(1, scale_down_delay=10.0)
    staged_and_switched(r)
    r.handle(Pause("look first"), 3.0)
    assert writes(r.handle(Tick(), 50.0)) == [] and r.state == "paused"
    cmds = r.handle(Resume(), 51.0)
    assert r.state == "succeeded" and writes(cmds)[0].slots == {"b": NEW}


def test_p99_ratio_compares_with_old_traffic_before_the_switch() -> None:
    """After the switch the old slots are idle, so p99 compares with their traffic before it."""
    r = rollout(1, bake=10.0, gates=Gates(max_p99_ratio=1.5))
    (d,) = writes(r.handle(Start(), 0.0))
    # Staging: the old slot serves 100 requests in bucket 10 during the stage.
    cmds = r.handle(ObservedChanged("node-1", observed(d, 0.5, staged="starting",
                                                       router=traffic(a=(0, 0, 10)))), 0.5)
    switch = r.handle(ObservedChanged("node-1", observed(d, 1.0, router=traffic(a=(100, 0, 10)))),
                      1.0)
    assert not writes(cmds) and writes(switch)
    (s,) = writes(switch)
    r.handle(ObservedChanged("node-1", observed(s, 2.0, router=traffic(a=(100, 0, 10)))), 2.0)
    slow = traffic(a=(100, 0, 10), b=(100, 0, 20))
    r.handle(ObservedChanged("node-1", observed(s, 5.0, router=slow)), 5.0)
    cmds = r.handle(Tick(), 12.0)
    gates = r.record.waves[1].gates
    assert gates["p99_old_ms"] == LATENCY_BOUNDS_MS[10]
    assert gates["p99_new_ms"] == LATENCY_BOUNDS_MS[20]
    assert events(cmds, "gate.failed") and r.record.phase == "rollback"


def test_a_node_cannot_hide_a_slow_release_behind_invented_old_latency() -> None:
    """Old traffic recorded at the switch leaves out a node whose histogram holds more requests
    than it reports (here all "slow", which would make any new p99 look fine), and names it."""
    r = rollout(2, bake=10.0, gates=Gates(max_p99_ratio=1.5))
    d1, d2 = writes(r.handle(Start(), 0.0))
    liar = RouterStats(epoch=1.0, slots={"a": SlotTraffic(requests=10, latency=[0] * (NB - 1)
                                                          + [1000])})
    r.handle(ObservedChanged("node-1", observed(d1, 1.0, router=traffic(a=(100, 0, 10)))), 1.0)
    switch = r.handle(ObservedChanged("node-2", observed(d2, 1.0, router=liar)), 1.0)
    assert kit.report(r.record)["switch"]["old"]["requests"] == 100
    s1, s2 = writes(switch)
    for s in (s1, s2):
        r.handle(ObservedChanged(s.node, observed(s, 2.0, router=traffic(a=(100, 0, 10)))), 2.0)
    slow = traffic(a=(100, 0, 10), b=(100, 0, 20))
    for s in (s1, s2):
        r.handle(ObservedChanged(s.node, observed(s, 5.0, router=slow)), 5.0)
    cmds = r.handle(Tick(), 12.0)
    gates = r.record.waves[1].gates
    assert gates["p99_old_ms"] == LATENCY_BOUNDS_MS[10]
    assert events(cmds, "gate.failed") and r.record.phase == "rollback"
    assert "node-2's router figures are invalid (slot 'a': latency buckets add up to 1000, " \
        "not 10); left out" in r.record.reason


@pytest.mark.parametrize(
    ("setup", "event"),
    [
        pytest.param("warm", Start(), id="start-in-window"),
        pytest.param("warm", Resume(), id="resume-while-running"),
        pytest.param("switching-back", Pause(), id="pause-while-switching-back"),
        pytest.param("switching-back", RollbackRequested(), id="rollback-twice"),
    ],
)
def test_illegal_transitions_raise_and_change_nothing(setup: str, event: object) -> None:
    """Requests the blue-green's state does not accept raise and leave the record as it was."""
    r = rollout(2, scale_down_delay=100.0)
    staged_and_switched(r)
    if setup == "switching-back":
        r.handle(RollbackRequested(), 5.0)
    before = msgspec.json.encode(r.record)
    with pytest.raises(IllegalTransition, match="cannot"):
        r.handle(event, 6.0)  # type: ignore[arg-type]
    assert msgspec.json.encode(r.record) == before


def test_spread_formula() -> None:
    """spread = last - first switch time; lag = last - decision; empty gives None figures."""
    assert spread({}, 1.0)["spread"] is None
    s = spread({"b": 3.5, "a": 2.0}, 1.0)
    assert (s["first"], s["last"], s["spread"], s["lag"]) == (2.0, 3.5, 1.5, 2.5)
    assert list(s["nodes"]) == ["a", "b"]
