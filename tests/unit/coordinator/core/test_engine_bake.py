"""The bake's verdict over what the agents report: a node already on the release, a node whose
router counters are missing or stale, and the few old requests left in flight at a last switch."""

from __future__ import annotations

import pytest

from coordinator.core.engine import ObservedChanged, Rollout, Start, Tick, new_record
from protocol.messages import DesiredState, Gates, NodeView, RolloutSpec, RouterStats, SlotTraffic
from protocol.testing import NEW, OLD
from tests.unit.coordinator.core.test_engine import observed
from tests.unit.coordinator.kit import hist, rollout, writes


def stats(t: float, **slots: list[int]) -> RouterStats:
    """Counters read at ``t``: per slot a latency histogram (no errors)."""
    return RouterStats(epoch=1.0, time=t, slots={
        s: SlotTraffic(requests=sum(h), errors=0, latency=h) for s, h in slots.items()})


def on(node: str, slot: str, release: object) -> DesiredState:
    return DesiredState(fleet="f", node=node, service="hello", generation=3,
                        slots={slot: release}, weights={slot: 100})  # type: ignore[dict-item]


def mixed(batch: str, gates: Gates) -> Rollout:
    """node-1 and node-3 on 1.0.0 in slot a, node-2 already on 2.0.0 in slot b (an aborted
    rollout left it there)."""
    cur = {"node-1": on("node-1", "a", OLD), "node-2": on("node-2", "b", NEW),
           "node-3": on("node-3", "a", OLD)}
    spec = RolloutSpec(service="hello", version="2.0.0", batch=batch, max_unavailable="3",
                       bake=10.0, gates=gates)
    rec = new_record(id="r", spec=spec, release=NEW, nodes=[NodeView(id=n) for n in cur],
                     current=cur, now=0.0)
    return Rollout(rec, fleet="f")


@pytest.mark.parametrize("batch", ["2", "1"], ids=["in-the-wave", "in-a-later-wave"])
def test_a_node_already_on_the_release_is_not_the_old_release(batch: str) -> None:
    """Its serving slot runs 2.0.0: not old traffic to compare with, so a 9x p99 regression
    of the new slots still fails the wave."""
    r = mixed(batch, Gates(max_p99_ratio=1.5))
    r.handle(ObservedChanged("node-2", observed(on("node-2", "b", NEW), 0.0,
                                                router=stats(0.0, b=hist(b20=1000)))), 0.0)
    r.handle(ObservedChanged("node-3", observed(on("node-3", "a", OLD), 0.0,
                                                router=stats(0.0, a=hist(b10=1000)))), 0.0)
    (d1,) = [d for d in writes(r.handle(Start(), 0.0)) if d.node == "node-1"]
    r.handle(ObservedChanged("node-1", observed(d1, 1.0, router=stats(
        1.0, a=hist(b10=1000), b=hist()))), 1.0)
    assert r.record.waves[0].state == "baking"
    r.handle(ObservedChanged("node-2", observed(on("node-2", "b", NEW), 11.5,
                                                router=stats(11.5, b=hist(b20=2000)))), 11.5)
    r.handle(ObservedChanged("node-3", observed(on("node-3", "a", OLD), 11.5,
                                                router=stats(11.5, a=hist(b10=2000)))), 11.5)
    r.handle(ObservedChanged("node-1", observed(d1, 11.5, router=stats(
        11.5, a=hist(b10=1000), b=hist(b20=1000)))), 11.5)
    r.handle(Tick(), 12.0)
    gates = r.record.waves[0].gates
    assert gates["outcome"] == "fail", gates
    assert gates["old_requests"] == 1000 and gates["p99_old_ms"] < gates["p99_new_ms"]


def test_a_node_already_on_the_release_counts_healthy() -> None:
    """Nothing was written to it, but its serving slot is healthy: min-healthy 100% passes."""
    r = mixed("3", Gates(min_healthy=1.0, max_error_rate=0.05))
    for n in ("node-2", "node-3"):
        slot, release = ("b", NEW) if n == "node-2" else ("a", OLD)
        r.handle(ObservedChanged(n, observed(on(n, slot, release), 0.0, router=stats(
            0.0, **{slot: hist(b10=1000)}))), 0.0)
    ds = {d.node: d for d in writes(r.handle(Start(), 0.0))}
    assert sorted(ds) == ["node-1", "node-3"]
    for n, d in ds.items():
        r.handle(ObservedChanged(n, observed(d, 1.0, router=stats(
            1.0, a=hist(b10=1000), b=hist()))), 1.0)
    r.handle(ObservedChanged("node-2", observed(on("node-2", "b", NEW), 11.5, router=stats(
        11.5, b=hist(b10=1500)))), 11.5)
    for n, d in ds.items():
        r.handle(ObservedChanged(n, observed(d, 11.5, router=stats(
            11.5, a=hist(b10=1000), b=hist(b10=500)))), 11.5)
    assert r.state == "succeeded"
    gates = r.record.waves[0].gates
    assert gates["outcome"] == "pass", gates
    assert gates["healthy"] == 3 and r.record.nodes["node-2"].slot == "b"


def errors(t: float, requests: int, errors: int) -> RouterStats:
    return RouterStats(epoch=1.0, time=t, slots={"b": SlotTraffic(
        requests=requests, errors=errors, latency=hist(b10=requests))})


@pytest.mark.parametrize(
    ("end", "outcome", "why"),
    [
        pytest.param(None, "inconclusive", "no router counters reported at the bake's end",
                     id="router-gone"),
        pytest.param(errors(1.0, 0, 0), "inconclusive",
                     "router counters read 0s apart, less than the 30s bake", id="stale"),
        pytest.param(errors(31.0, 1000, 0), "pass", "", id="honest"),
    ],
)
def test_a_node_whose_counters_do_not_cover_the_bake_is_never_a_pass(
    end: RouterStats | None, outcome: str, why: str,
) -> None:
    """node-2's traffic is unknown, not zero: left out and named once the grace is over, so
    the wave is inconclusive; with every node's counters covering the bake it passes."""
    r = rollout(2, batch="2", max_unavailable="2", bake=30.0, gates=Gates(max_error_rate=0.05))
    d1, d2 = writes(r.handle(Start(), 0.0))
    for d in (d1, d2):
        r.handle(ObservedChanged(d.node, observed(d, 1.0, router=errors(1.0, 0, 0))), 1.0)
    r.handle(ObservedChanged("node-1", observed(d1, 31.0, router=errors(31.0, 1000, 0))), 31.0)
    r.handle(ObservedChanged("node-2", observed(d2, 31.0, router=end)), 31.0)
    if not r.done:
        r.handle(Tick(), 45.0)
    gates = r.record.waves[0].gates
    assert gates["outcome"] == outcome, gates
    assert gates["untrusted"] == ({"node-2": why} if why else {})


def test_the_old_requests_in_flight_at_the_last_switch_do_not_set_the_old_p99() -> None:
    """The last wave's old slot answers only 3 slow requests left in flight: too few for a p99,
    so the previous wave's old traffic is the reference and a 9x regression fails."""
    r = rollout(2, batch="1", max_unavailable="1", bake=30.0, prestage="0",
                gates=Gates(max_p99_ratio=1.5))
    (d1,) = writes(r.handle(Start(), 0.0))
    old2 = r.record.nodes["node-2"].previous
    assert old2 is not None
    r.handle(ObservedChanged("node-2", observed(old2, 1.0, router=stats(
        1.0, a=hist(b10=5000)))), 1.0)
    r.handle(ObservedChanged("node-1", observed(d1, 1.0, router=stats(
        1.0, a=hist(b10=5000), b=hist()))), 1.0)
    r.handle(ObservedChanged("node-2", observed(old2, 31.0, router=stats(
        31.0, a=hist(b10=6000)))), 31.0)
    cmds = r.handle(ObservedChanged("node-1", observed(d1, 31.0, router=stats(
        31.0, a=hist(b10=5000), b=hist(b10=1000)))), 31.0)
    assert r.record.waves[0].gates["outcome"] == "pass"
    (d2,) = writes(cmds)
    r.handle(ObservedChanged("node-2", observed(d2, 33.0, router=stats(
        33.0, a=hist(b10=6000), b=hist()))), 33.0)
    leftover = hist(b10=6000)
    leftover[40] = 3  # ~1.9 s each, finishing after the switch
    r.handle(ObservedChanged("node-1", observed(d1, 63.0, router=stats(
        63.0, a=hist(b10=5000), b=hist(b10=2000)))), 63.0)
    r.handle(ObservedChanged("node-2", observed(d2, 63.0, router=stats(
        63.0, a=leftover, b=hist(b20=1000)))), 63.0)
    if not r.done:
        r.handle(Tick(), 64.0)
    gates = r.record.waves[1].gates
    assert gates["outcome"] == "fail", gates
    assert gates["p99_old_from"] == "wave 1" and gates["old_requests"] == 1000
