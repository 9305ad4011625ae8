"""The pure mapping behind the coordinator's /metrics: records, node views and events to
samples, without sockets or a registry."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from coordinator.http import metrics_map as mm
from protocol.messages import Event, NodeProgress, NodeView, RolloutRecord, WaveRecord
from protocol.testing import FLEET, NEW, desired, spec


def record(id: str, state: str = "running", *, created: float = 1.0, service: str = "hello",
           strategy: str = "canary", waves: list[WaveRecord] | None = None,
           nodes: dict[str, NodeProgress] | None = None, current_wave: int = 0) -> RolloutRecord:
    return RolloutRecord(id=id, spec=spec(service=service, strategy=strategy), release=NEW,
                         state=state, created=created, waves=waves or [], nodes=nodes or {},
                         current_wave=current_wave)  # type: ignore[arg-type]


def moved(node: str, state: str, weights: dict[str, int]) -> NodeProgress:
    """A target node whose desired state puts the new release in slot b with ``weights``."""
    target = msgspec.structs.replace(desired(node), slots={"a": desired(node).slots["a"],
                                                           "b": NEW}, weights=weights)
    return NodeProgress(node=node, state=state, slot="b", target=target)  # type: ignore[arg-type]


def samples(out: list[mm.Sample], name: str) -> dict[tuple[str, ...], float]:
    return {s.labels: s.value for s in out if s.name == name}


def test_shown_are_the_live_rollouts_and_the_latest_of_each_service() -> None:
    """Older finished rollouts leave the per-rollout series; a live one never does."""
    rs = [record("old", "succeeded", created=1), record("new", "rolled_back", created=3),
          record("live", "paused", created=2), record("w1", "succeeded", created=1,
                                                        service="web")]
    assert [r.id for r in mm.shown(rs)] == ["new", "live", "w1"]


@pytest.mark.parametrize(("name", "nodes", "want"), [
    ("nothing moved yet", {"n1": NodeProgress(node="n1"), "n2": NodeProgress(node="n2")}, 0.0),
    ("a canary weight on every node",
     {"n1": moved("n1", "done", {"a": 95, "b": 5}), "n2": moved("n2", "updating",
                                                                 {"a": 95, "b": 5})}, 5.0),
    ("one of four nodes fully moved",
     {"n1": moved("n1", "done", {"a": 0, "b": 100}), **{f"n{i}": NodeProgress(node=f"n{i}")
                                                       for i in (2, 3, 4)}}, 25.0),
    ("rolled back nodes count for nothing",
     {"n1": moved("n1", "rolled_back", {"a": 0, "b": 100})}, 0.0),
])
def test_set_weight_is_the_mean_share_of_the_new_release(
        name: str, nodes: dict[str, NodeProgress], want: float) -> None:
    """The set weight is the mean over target nodes of the share their desired state gives
    the new release."""
    assert mm.set_weight(record("r", nodes=nodes)) == want, name


def test_rollout_samples_of_a_canary_in_its_second_wave() -> None:
    """Info, 1-based wave, waves, nodes per state, weight and the latest evaluated figures."""
    gates: dict[str, Any] = {"requests": 120, "errors": 1, "error_rate": 0.0083,
                             "old_requests": 400, "old_errors": 0, "old_error_rate": 0.0,
                             "p99_ratio": 1.2, "healthy_fraction": 1.0, "outcome": "pass"}
    r = record("r1", waves=[WaveRecord(index=0, nodes=["n1"], state="passed", gates=gates),
                            WaveRecord(index=1, nodes=["n2"], state="baking")],
               nodes={"n1": moved("n1", "done", {"a": 0, "b": 100}),
                      "n2": moved("n2", "updating", {"a": 0, "b": 100})}, current_wave=1)
    out = mm.rollout_samples([r])
    assert samples(out, "fleetwave_rollout_info") == {
        ("r1", "hello", "canary", "2.0.0", "running"): 1}
    assert samples(out, "fleetwave_rollout_wave") == {("r1", "hello"): 2}
    assert samples(out, "fleetwave_rollout_waves") == {("r1", "hello"): 2}
    nodes = samples(out, "fleetwave_rollout_nodes")
    assert nodes[("r1", "hello", "done")] == 1 and nodes[("r1", "hello", "updating")] == 1
    assert nodes[("r1", "hello", "failed")] == 0  # every state present: no gaps in a graph
    assert samples(out, "fleetwave_rollout_weight") == {("r1", "hello"): 100.0}
    assert samples(out, "fleetwave_gate_error_ratio") == {("r1", "hello", "new"): 0.0083,
                                                          ("r1", "hello", "old"): 0.0}
    assert samples(out, "fleetwave_gate_requests") == {("r1", "hello", "new"): 120.0,
                                                       ("r1", "hello", "old"): 400.0}
    assert samples(out, "fleetwave_gate_p99_ratio") == {("r1", "hello"): 1.2}
    assert samples(out, "fleetwave_rollouts") == {("hello", "canary", "running"): 1}


def test_a_figure_the_gates_did_not_have_has_no_sample() -> None:
    """No old traffic is no p99 ratio and no old error ratio, never a 0 that looks good."""
    out = mm.gate_samples("r", "hello", {"requests": 5, "error_rate": 0.0, "old_requests": 0,
                                         "old_error_rate": None, "p99_ratio": None})
    assert {(s.name, s.labels[-1]) for s in out} == {
        ("fleetwave_gate_requests", "new"), ("fleetwave_gate_requests", "old"),
        ("fleetwave_gate_error_ratio", "new")}
    assert mm.gate_samples("r", "hello", None) == []


def test_node_samples() -> None:
    """Online/offline/not-heard-yet counts, one up per node, one info per label."""
    out = mm.node_samples([NodeView(id="n1", labels={"zone": "a"}, online=True),
                           NodeView(id="n2", online=False),
                           NodeView(id="n3", online=False, unheard=True)])
    assert samples(out, "fleetwave_nodes") == {("online",): 1, ("offline",): 1, ("unheard",): 1}
    assert samples(out, "fleetwave_node_up") == {("n1",): 1, ("n2",): 0}  # n3: not known yet
    assert samples(out, "fleetwave_node_label_info") == {("n1", "zone", "a"): 1}


def test_every_sample_belongs_to_a_declared_family_with_its_labels() -> None:
    """A sample's labels match its family's label names (the collector relies on it)."""
    r = record("r1", waves=[WaveRecord(index=0, nodes=["n1"], gates={"requests": 1})],
               nodes={"n1": NodeProgress(node="n1")})
    out = (mm.rollout_samples([r]) + mm.node_samples([NodeView(id="n1", labels={"a": "b"})])
           + mm.coordinator_samples("c1", FLEET, "0.1.0", leader=False))
    for s in out:
        assert len(s.labels) == len(mm.GAUGES[s.name][1]), s


def gate_event(kind: str, **data: Any) -> Event:
    return Event(id="e", time=10.0, fleet=FLEET, kind=kind, service="hello", rollout="r",
                 data=data)


LIMITS = {"min_healthy": 1.0, "max_error_rate": 0.05, "max_p99_ratio": 2.0,
          "max_mismatch_rate": None, "min_requests": 10}


@pytest.mark.parametrize(("name", "kind", "figures", "want"), [
    ("all pass", "gate.passed",
     {"healthy_fraction": 1.0, "requests": 50, "error_rate": 0.0, "p99_ratio": 1.1},
     {("min_healthy", "pass"), ("min_requests", "pass"), ("error_rate", "pass"),
      ("p99_ratio", "pass")}),
    ("the error rate fails", "gate.failed",
     {"healthy_fraction": 1.0, "requests": 50, "error_rate": 0.5, "p99_ratio": 1.1},
     {("min_healthy", "pass"), ("min_requests", "pass"), ("error_rate", "fail"),
      ("p99_ratio", "pass")}),
    ("too few requests: the traffic gates cannot judge", "gate.inconclusive",
     {"healthy_fraction": 1.0, "requests": 3, "error_rate": 0.0, "p99_ratio": None},
     {("min_healthy", "pass"), ("min_requests", "inconclusive"),
      ("error_rate", "inconclusive"), ("p99_ratio", "inconclusive")}),
    ("a verdict no threshold explains (sequential analysis)", "gate.failed",
     {"healthy_fraction": 1.0, "requests": 50, "error_rate": 0.01, "p99_ratio": 1.0},
     {("min_healthy", "pass"), ("min_requests", "pass"), ("error_rate", "pass"),
      ("p99_ratio", "pass"), ("wave", "fail")}),
])
def test_gate_decisions(name: str, kind: str, figures: dict[str, Any],
                        want: set[tuple[str, str]]) -> None:
    """One decision per configured gate, read off the figures against the event's thresholds."""
    got = mm.gate_decisions(gate_event(kind, thresholds=LIMITS, **figures))
    assert set(got) == want and len(got) == len(want), name


def test_only_concluded_gates_are_decisions() -> None:
    """A promoted wave's skipped gates and any other event decide nothing."""
    assert mm.gate_decisions(gate_event("gate.skipped")) == []
    assert mm.gate_decisions(gate_event("wave.baking")) == []


def test_finished_times_a_rollout_from_its_creation() -> None:
    """(strategy, result, seconds) at a terminal event; nothing for other events."""
    r = record("r", "succeeded", created=4.0)
    assert mm.finished(gate_event("rollout.succeeded"), r) == ("canary", "succeeded", 6.0)
    assert mm.finished(gate_event("rollout.rolled_back"), r) == ("canary", "rolled_back", 6.0)
    assert mm.finished(gate_event("gate.passed"), r) is None
    assert mm.finished(gate_event("rollout.succeeded"), None) is None
