"""The engine's working copy: a Step's edits never reach the committed record."""

from __future__ import annotations

from coordinator.core.engine import working_copy
from protocol.messages import (
    DesiredState,
    NodeProgress,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
    WaveRecord,
)
from protocol.report import RolloutReport, Switch


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
