"""The removal: its targets, its waves, and the engine driving it to an empty fleet or back."""

from __future__ import annotations

import pytest

from coordinator import strategies
from coordinator.core.engine import (
    Abort,
    ObservedChanged,
    RollbackRequested,
    Rollout,
    Start,
    new_record,
)
from coordinator.errors import UsageError
from coordinator.strategies import remove
from protocol.messages import DesiredState, NodeView, ObservedState, ReleaseRef, SlotStatus
from protocol.testing import FLEET, OLD, desired, report, spec
from tests.unit.coordinator.kit import kinds, writes

GONE = ReleaseRef(service="hello", version="", digest="")  # what a removal's record names


def removal(n: int = 3, *, current: dict[str, DesiredState] | None = None,
            **fields: object) -> Rollout:
    """A removal of ``hello`` planned over ``node-1..n`` (each on 1.0.0 unless ``current``)."""
    nodes = [NodeView(id=f"node-{i}", labels={"zone": "a" if i % 2 else "b"})
             for i in range(1, n + 1)]
    now = {v.id: desired(v.id) for v in nodes} if current is None else current
    rec = new_record(id="rm1", spec=spec(strategy="remove", version="", **fields), release=GONE,
                     nodes=nodes, current=now, now=0.0)
    return Rollout(rec, fleet=FLEET)


def removed(d: DesiredState, t: float) -> ObservedState:
    """An agent converged on an empty desired state: router gone, every slot stopped."""
    return ObservedState(node=d.node, service=d.service, generation=d.generation,
                         observed_generation=d.generation,
                         slots={"a": SlotStatus(slot="a", status="stopped")},
                         phase="converged", time=t)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        pytest.param({"version": "2.0.0"}, "takes no version", id="a-version"),
        pytest.param({"version": "", "steps": ["1", "100%"]}, "--steps", id="steps"),
        pytest.param({"version": "", "weights": [5, 100]}, "--weights", id="weights"),
        pytest.param({"version": "", "mirror": 10.0}, "--mirror", id="mirror"),
    ],
)
def test_validate_refuses_what_a_removal_cannot_use(fields: dict[str, object], says: str) -> None:
    """A version, canary steps or weights, a mirror: each one line naming it."""
    with pytest.raises(UsageError, match=says) as err:
        strategies.validate(spec(strategy="remove", **fields))
    assert "\n" not in str(err.value)


def test_targets_are_the_selected_nodes_that_have_the_service() -> None:
    """A node without a desired state, or with an empty one (removed before), is no target."""
    empty = DesiredState(fleet=FLEET, node="node-2", service="hello", generation=9)
    current = {"node-1": desired("node-1"), "node-2": empty}
    assert remove.targets(["node-1", "node-2", "node-3"], spec(strategy="remove", version=""),
                          current) == ["node-1"]


@pytest.mark.parametrize(
    ("selector", "says"),
    [
        pytest.param({}, r"not deployed on any node \(offline", id="anywhere"),
        pytest.param({"zone": "a"}, "not deployed on any node matching zone=a", id="selector"),
    ],
)
def test_nothing_to_remove_is_one_usage_line(selector: dict[str, str], says: str) -> None:
    """A service no selected node has is refused before any record exists."""
    with pytest.raises(UsageError, match=says) as err:
        removal(current={}, selector=selector)
    assert "nothing to remove" in str(err.value) and "\n" not in str(err.value)


def test_waves_are_rolling_ones_over_the_nodes_that_have_it() -> None:
    """Batch and max-unavailable cut the targets as rolling does; only holders are targets."""
    current = {f"node-{i}": desired(f"node-{i}") for i in (1, 2, 4)}
    r = removal(4, current=current, batch="2", max_unavailable="2")
    assert [w.nodes for w in r.record.waves] == [["node-1", "node-2"], ["node-4"]]
    assert r.record.from_version == OLD.version


def test_a_removal_writes_empty_states_wave_by_wave_and_succeeds() -> None:
    """Each node gets the signed "nothing here" at a new generation; converged on it, it is
    done; the rollout succeeds writing nothing more (nothing to retire)."""
    r = removal(3)
    cmds = r.handle(Start(), 0.0)
    seen: list[str] = []
    t = 0.0
    while not r.done:
        t += 1.0
        ws = writes(cmds)
        assert all(not d.slots and not d.weights and d.generation == 8 for d in ws)
        seen += [d.node for d in ws]
        cmds = [c for d in ws for c in r.handle(ObservedChanged(d.node, removed(d, t)), t)]
    assert r.state == "succeeded" and seen == ["node-1", "node-2", "node-3"]
    assert writes(cmds) == [] and kinds(cmds)[-1] == "rollout.succeeded"
    assert all(w.state == "passed" for w in r.record.waves)


def test_a_node_still_running_a_slot_is_not_done() -> None:
    """Until the agent reports the generation converged, the node keeps updating."""
    r = removal(1)
    (d,) = writes(r.handle(Start(), 0.0))
    busy = ObservedState(node="node-1", service="hello", generation=d.generation,
                         observed_generation=d.generation - 1,
                         slots={"a": SlotStatus(slot="a", status="healthy")},
                         weights={"a": 100}, time=1.0)
    r.handle(ObservedChanged("node-1", busy), 1.0)
    assert r.record.nodes["node-1"].state == "updating"


def test_a_removal_that_does_not_converge_rolls_back_to_the_previous_states() -> None:
    """Past the progress deadline the wave fails and every touched node gets its previous
    desired state again (the service comes back where it was removed)."""
    r = removal(2, progress_deadline=5.0)
    (d,) = writes(r.handle(Start(), 0.0))
    cmds = r.handle(ObservedChanged("node-1", removed(d, 1.0)), 1.0)
    assert [w.node for w in writes(cmds)] == ["node-2"]  # the next wave, never converging
    cmds = r.handle(ObservedChanged("node-2", report(desired("node-2"), 7.0)), 7.0)
    back = writes(cmds)
    assert {b.node for b in back} == {"node-1", "node-2"}
    assert all(b.slots == {"a": OLD} and b.weights == {"a": 100} for b in back)
    assert "rollout.rolling_back" in kinds(cmds)
    for b in back:
        r.handle(ObservedChanged(b.node, report(b, 8.0)), 8.0)
    assert r.state == "rolled_back"


def test_a_rollback_request_restores_the_removed_nodes() -> None:
    """An operator's rollback of a running removal writes the previous states back."""
    r = removal(2)
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", removed(d, 1.0)), 1.0)
    back = writes(r.handle(RollbackRequested(who="ops"), 2.0))
    assert {b.node for b in back} == {"node-1", "node-2"}
    assert all(b.slots == {"a": OLD} for b in back)


def test_abort_stops_where_it_is() -> None:
    """Abort (as for every rollout) writes nothing: removed nodes stay removed."""
    r = removal(2)
    r.handle(Start(), 0.0)
    cmds = r.handle(Abort(who="ops"), 1.0)
    assert writes(cmds) == [] and r.state == "aborted"
