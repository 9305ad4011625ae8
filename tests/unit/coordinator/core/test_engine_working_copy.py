"""The engine's working copy: a Step's edits never reach the committed record."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.core.engine import (
    ObservedChanged,
    RollbackRequested,
    Start,
    WriteDesired,
    working_copy,
)
from coordinator.core.engine_progress import Progress
from coordinator.core.engine_types import NodeTable, peek
from protocol.messages import (
    DesiredState,
    NodeProgress,
    ObservedState,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
    SlotStatus,
    WaveRecord,
)
from protocol.report import (
    OldTraffic,
    OldWindow,
    RolloutReport,
    Sample,
    ShadowReport,
    Switch,
    SwitchBack,
)
from tests.unit.coordinator.kit import rollout


def record() -> RolloutRecord:
    ref = ReleaseRef(service="hello", version="2.0.0", digest="d" * 64)
    target = DesiredState(fleet="f", node="n1", service="hello", generation=2,
                          slots={"green": ref}, weights={"green": 100})
    return RolloutRecord(
        id="hello-1", spec=RolloutSpec(service="hello", version="2.0.0"), release=ref,
        waves=[WaveRecord(index=0, nodes=["n1"], gates={"p99": {"value": 1.0}})],
        nodes={"n1": NodeProgress(node="n1", target=target)},
        report=RolloutReport(switch=Switch(nodes={"n1": 1.0})),
    )


def test_edits_of_the_copy_leave_the_original_alone() -> None:
    """Node fields, wave fields and gates, and the report's parts are the copy's own."""
    original = record()
    before = original.nodes["n1"].state, original.waves[0].state
    work = working_copy(original)
    work.nodes["n1"].state = "done"
    work.nodes["n1"].generation = 9
    work.waves[0].state = "baking"
    work.waves[0].gates["p99"]["value"] = 2.0
    work.waves[0].nodes.append("n2")
    assert isinstance(work.report.switch, Switch)
    work.report.switch.nodes["n2"] = 2.0
    work.nodes["n2"] = NodeProgress(node="n2")
    assert (original.nodes["n1"].state, original.waves[0].state) == before
    assert original.nodes["n1"].generation == 0
    assert original.waves[0].gates == {"p99": {"value": 1.0}}
    assert original.waves[0].nodes == ["n1"]
    assert original.report == RolloutReport(switch=Switch(nodes={"n1": 1.0}))
    assert set(original.nodes) == {"n1"}


def test_the_copy_equals_the_original() -> None:
    """Before any edit the copy is equal field for field (so an unchanged step persists nothing)."""
    original = record()
    assert working_copy(original) == original


def test_peek_copies_nothing_and_taking_an_entry_copies_it_once() -> None:
    """``peek`` reads the committed entries; ``[]``, ``get``, ``values`` and ``items`` hand out
    the copy's own, made the first time, so an edit never reaches the committed record."""
    original = record()
    original.nodes["n2"] = NodeProgress(node="n2")
    table = NodeTable(original.nodes)
    assert [p for _, p in peek(table)] == [original.nodes["n1"], original.nodes["n2"]]
    assert all(p is original.nodes[n] for n, p in peek(table))
    first = table["n1"]
    assert first is not original.nodes["n1"] and first == original.nodes["n1"]
    assert table.get("n1") is first and table["n1"] is first  # copied once
    assert table.get("missing") is None
    for p in table.values():
        p.state = "done"
    for _, p in table.items():
        p.generation = 5
    assert [p.state for p in original.nodes.values()] == ["waiting", "waiting"]
    assert [p.generation for p in original.nodes.values()] == [0, 0]
    assert all(p.state == "done" and p.generation == 5 for _, p in peek(table))


def test_a_step_copies_only_the_nodes_it_takes() -> None:
    """A step about one node leaves the nodes it never looked at as they were: the same
    objects in the next committed record (a step's cost follows what it changes, not the
    fleet; every node was copied on every step before)."""
    r = rollout(12, batch="1")
    cmds = r.handle(Start(), 1.0)
    (first,) = [c.desired for c in cmds if isinstance(c, WriteDesired)
                if c.desired.weights.get("b")]
    before = dict(r.record.nodes)
    r.handle(ObservedChanged(first.node, converged_on(first, 2.0)), 2.0)
    assert r.record.nodes[first.node].state == "done"
    untouched = [n for n in before if r.record.nodes[n] is before[n]]
    assert len(untouched) >= 8, untouched
    assert type(r.record.nodes) is dict  # a committed record holds a plain dict


def test_a_wave_step_copies_only_the_node_that_changed_and_a_repeated_report_none() -> None:
    """In a wave of 12, a step about one node's convergence copies that node only (the wave's
    other nodes are read, not taken: every one of them was copied on every step before), and
    the same report again (agents re-report every few seconds) copies nothing."""
    r = rollout(12, batch="12", max_unavailable="12")
    cmds = r.handle(Start(), 1.0)
    first = next(c.desired for c in cmds if isinstance(c, WriteDesired))
    before = dict(r.record.nodes)
    report = converged_on(first, 2.0)
    r.handle(ObservedChanged(first.node, report), 2.0)
    assert r.record.nodes[first.node].state == "done"
    assert [n for n in before if r.record.nodes[n] is not before[n]] == [first.node]
    before = dict(r.record.nodes)
    r.handle(ObservedChanged(first.node, converged_on(first, 3.0)), 3.0)
    assert all(r.record.nodes[n] is before[n] for n in before)


def test_a_rollback_step_copies_only_the_nodes_it_takes() -> None:
    """A rollback's step about one node's report copies that node only: the rollback of a
    10,000-node fleet checks every node on every step, read only (it copied all of them, 15 %
    of the coordinator's CPU in a rollback of 10,000 nodes)."""
    r = rollout(12, batch="12", max_unavailable="12")
    r.handle(Start(), 1.0)
    cmds = r.handle(RollbackRequested("test"), 2.0)
    back = [c.desired for c in cmds if isinstance(c, WriteDesired)]
    assert len(back) == 12 and r.record.phase == "rollback"
    before = dict(r.record.nodes)
    r.handle(ObservedChanged(back[0].node, converged_on(back[0], 3.0)), 3.0)
    assert r.record.nodes[back[0].node].state == "rolled_back"
    untouched = [n for n in before if r.record.nodes[n] is before[n]]
    assert len(untouched) == 11, untouched


def converged_on(d: DesiredState, t: float) -> ObservedState:
    slots = {s: SlotStatus(slot=s, status="healthy", version=ref.version)
             for s, ref in d.slots.items()}
    return ObservedState(node=d.node, service=d.service, generation=d.generation,
                         observed_generation=d.generation, slots=slots,
                         weights=dict(d.weights), phase="converged", time=t)


def test_a_step_that_fails_leaves_what_nodes_reported_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reports a step takes in are written into the engine's own map (copying it for every
    step was O(fleet) a report); a step that fails puts back what it replaced, so that the
    next step decides on the reports as they were before it."""
    r = rollout(12, batch="12", max_unavailable="12")
    cmds = r.handle(Start(), 1.0)
    first, *_, last = [c.desired for c in cmds if isinstance(c, WriteDesired)]
    seen = r._observed  # the engine's own map: a step writes into it, copies nothing
    r.handle(ObservedChanged(first.node, converged_on(first, 2.0)), 2.0)
    assert seen[first.node].time == 2.0 and r._observed is seen
    before = dict(seen)

    def broken(self: Progress) -> None:
        raise RuntimeError("a bug in this step")

    monkeypatch.setattr(Progress, "advance", broken)
    with pytest.raises(RuntimeError):
        r.handle_all([ObservedChanged(first.node, converged_on(first, 3.0)),
                      ObservedChanged(last.node, converged_on(last, 3.0))], 3.0)
    assert r._observed == before and last.node not in r._observed
    assert r._observed[first.node].time == 2.0


def _containers(value: object, path: str = "report") -> dict[int, str]:
    """Every dict and list inside ``value`` (Structs walked field by field), by id."""
    out: dict[int, str] = {}
    if isinstance(value, dict):
        out[id(value)] = path
        for k, v in value.items():
            out |= _containers(v, f"{path}[{k!r}]")
    elif isinstance(value, list):
        out[id(value)] = path
        for i, v in enumerate(value):
            out |= _containers(v, f"{path}[{i}]")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            out |= _containers(getattr(value, name), f"{path}.{name}")
    return out


def full_report() -> RolloutReport:
    """A report with every part set and every container of each part non-empty: a part
    added later has to be filled here (the test below fails while one is UNSET)."""
    report = RolloutReport(
        skipped_offline=["n9"], skipped_cordoned=["n8"],
        shadow=ShadowReport(untrusted={"n1": "restarted"}, methods=["GET"],
                            ignore_headers=["date"], ignore_json_fields=["ts"],
                            keep_headers=["x"], window=[1.0], reasons=["ok"],
                            samples=[Sample(node="n1", method="GET", path="/", what="body")]),
        switch=Switch(nodes={"n1": 1.0}, old=OldTraffic(latency=[1, 2],
                                                        untrusted={"n2": "no counters"})),
        switch_back=SwitchBack(nodes={"n1": 2.0}, expect=["n1"]),
        old_window=OldWindow(latency=[3]))
    unset = [f for f in RolloutReport.__struct_fields__ if getattr(report, f) is msgspec.UNSET]
    assert not unset, f"fill the report's new parts here: {unset}"
    return report


def test_the_reports_copy_is_equal_and_shares_no_container_with_it() -> None:
    """The working copy's report (copied part by part at C speed, not by a msgpack round trip
    of the whole) equals the committed one and shares none of its dicts and lists: a step
    that edits a part in place (blue-green's switch maps) never edits the committed record."""
    rec = record()
    rec.report = full_report()
    copy = working_copy(rec).report
    assert copy == rec.report
    original = _containers(rec.report)
    shared = [path for key, path in _containers(copy).items() if key in original]
    assert not shared, f"shared with the committed report: {shared}"
