"""Who caused each decision: every event of a step names the caller of the operator request it
handles, whoever deployed the rollout for its start, or the coordinator for what it decided by
itself; the record keeps who started, paused, aborted and rolled it back."""

from __future__ import annotations

from coordinator.core.engine import (
    Abort,
    Command,
    EmitEvent,
    NodeOffline,
    Pause,
    Promote,
    Resume,
    RollbackRequested,
    Start,
    Tick,
    cause,
)
from tests.unit.coordinator.kit import rollout


def whos(cmds: list[Command]) -> set[str]:
    """The ``who`` of every event ``cmds`` emit."""
    return {c.who for c in cmds if isinstance(c, EmitEvent)}


def test_the_start_names_who_deployed() -> None:
    """Every event of the start (rollout.started, the first wave) names the deployer, and the
    record keeps them; a resumed coordinator's Start names them too (from the record)."""
    r = rollout(3, who="alice")
    cmds = r.handle(Start(), 0.0)
    assert whos(cmds) == {"alice"} and r.record.started_by == "alice"
    assert cause(Start(), r.record) == "alice"


def test_operator_requests_name_their_caller_and_stay_in_the_record() -> None:
    """Pause, resume, promote and abort by bob: their events say bob; paused_by holds while
    paused and is cleared by the resume; aborted_by stays."""
    r = rollout(3, who="alice")
    r.handle(Start(), 0.0)
    cmds = r.handle(Pause(who="bob"), 1.0)
    assert whos(cmds) == {"bob"} and r.record.paused_by == "bob"
    cmds = r.handle(Resume(who="carol"), 2.0)
    assert whos(cmds) == {"carol"} and r.record.paused_by == ""
    assert whos(r.handle(Promote(who="dave"), 3.0)) == {"dave"}
    cmds = r.handle(Abort(who="bob"), 4.0)
    assert whos(cmds) == {"bob"} and r.record.aborted_by == "bob"
    assert r.record.started_by == "alice"


def test_an_operator_rollback_names_its_caller() -> None:
    """A rollback asked by erin: rollout.rolling_back says erin, rollback_by keeps her."""
    r = rollout(2, who="alice")
    r.handle(Start(), 0.0)
    cmds = r.handle(RollbackRequested(who="erin"), 1.0)
    assert whos(cmds) == {"erin"} and r.record.rollback_by == "erin"


def test_what_the_coordinator_decides_by_itself_says_coordinator() -> None:
    """A node lost mid-wave and the automatic rollback it causes, and a deadline's pause, name
    the coordinator, never the operator who deployed."""
    r = rollout(2, who="alice", batch="2", max_unavailable="2")
    r.handle(Start(), 0.0)
    cmds = r.handle(NodeOffline("node-2"), 1.0)
    assert "rollout.rolling_back" in [c.kind for c in cmds if isinstance(c, EmitEvent)]
    assert whos(cmds) == {"coordinator"} and r.record.rollback_by == "coordinator"
    p = rollout(2, who="alice", on_failure="pause", progress_deadline=60.0)
    p.handle(Start(), 0.0)
    cmds = p.handle(Tick(), 60.0)
    assert p.state == "paused" and p.record.paused_by == "coordinator"
    assert whos(cmds) == {"coordinator"}
