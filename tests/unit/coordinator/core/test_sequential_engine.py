"""The engine under ``--analysis sequential``, in virtual time: a regression fails the wave on the
first report that carries the evidence, mid-bake; a pass still waits for the bake's end."""

from __future__ import annotations

from coordinator.core.engine import Command, ObservedChanged, Rollout, Start, Tick
from coordinator.core.engine_bake import EVIDENCE_EVERY
from protocol.messages import Gates, RouterStats
from protocol.testing import desired, report, router_stats
from tests.unit.coordinator.kit import events, kinds, rollout, writes

SEQ = Gates(analysis="sequential", max_error_rate=0.05, max_p99_ratio=1.5)


def started(r: Rollout, t: float = 1.0) -> None:
    """Wave 0 (node-1) converged at ``t`` with empty counters; node-2 still serves 1.0.0."""
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-2", report(desired("node-2"), t,
                                              router_stats(at=t, a=(5000, 0, 10)))), t)
    r.handle(ObservedChanged("node-1", report(d, t, router_stats(at=t, a=(5000, 0, 10)))), t)
    assert r.record.waves[0].state == "baking"


def reported(r: Rollout, t: float, new: RouterStats, old: RouterStats) -> list[Command]:
    """node-2 reports ``old``, then node-1 (the wave) ``new``, both read at ``t``."""
    (target,) = [p.target for p in r.record.nodes.values() if p.node == "node-1"]
    assert target is not None
    cmds = r.handle(ObservedChanged("node-2", report(desired("node-2"), t, old)), t)
    return cmds + r.handle(ObservedChanged("node-1", report(target, t, new)), t)


def counters(r: Rollout, t: float, new: RouterStats, old: RouterStats) -> list[Command]:
    """``reported``, and the runner's next tick (the evidence is weighed once a tick)."""
    cmds = reported(r, t, new, old)
    return cmds + r.handle(Tick(), t + EVIDENCE_EVERY)


def test_a_bad_release_fails_on_the_first_report_with_the_evidence_in_words() -> None:
    """Half the answers fail: 2 s into a 60 s bake the wave fails and rolls back, and the
    reason says the counts, the versions, the e-value and 1/alpha."""
    r = rollout(2, bake=60.0, gates=SEQ)
    started(r)
    cmds = counters(r, 3.0, router_stats(at=3.0, a=(5000, 0, 10), b=(60, 31, 10)),
                    router_stats(at=3.0, a=(5600, 0, 10)))
    assert "gate.failed" in kinds(cmds)
    assert r.record.phase == "rollback"
    assert "errors 31/60 on 2.0.0 vs 0/600 on 1.0.0: e-value" in r.record.reason
    assert ">= 1/alpha = 200: fail" in r.record.reason  # two tests: alpha/2 each
    g = r.record.waves[0].gates
    assert g["outcome"] == "fail" and g["thresholds"]["analysis"] == "sequential"
    assert g["e_error"] > 200


def test_threshold_analysis_waits_for_the_bake_as_before() -> None:
    """The same counters under the default analysis: nothing happens until the bake is over."""
    r = rollout(2, bake=60.0, gates=Gates(max_error_rate=0.05, max_p99_ratio=1.5))
    started(r)
    cmds = counters(r, 3.0, router_stats(at=3.0, a=(5000, 0, 10), b=(60, 31, 10)),
                    router_stats(at=3.0, a=(5600, 0, 10)))
    assert kinds(cmds) == []
    assert r.record.waves[0].state == "baking" and r.record.waves[0].gates == {}


def test_a_slow_release_fails_on_the_slow_request_share() -> None:
    """Every answer 16 buckets slower than old's p99: the latency test fails mid-bake."""
    r = rollout(2, bake=60.0, gates=SEQ)
    started(r)
    counters(r, 3.0, router_stats(at=3.0, a=(5000, 0, 10), b=(60, 0, 26)),
             router_stats(at=3.0, a=(5600, 0, 10)))
    assert r.record.phase == "rollback"
    assert r.record.reason.startswith("wave 0 gates failed: requests slower than ")


def test_clean_traffic_bakes_on_with_the_evidence_so_far_then_passes_at_the_end() -> None:
    """Clean traffic mid-bake: still baking, the evidence in the wave's gates; a pass only at
    the bake's end, once the bounds rule out the tolerated regressions."""
    r = rollout(2, bake=60.0, gates=SEQ)
    started(r)
    counters(r, 3.0, router_stats(at=3.0, a=(5000, 0, 10), b=(900, 0, 10)),
             router_stats(at=3.0, a=(8000, 0, 10)))
    w = r.record.waves[0]
    assert w.state == "baking" and w.gates["outcome"] == "baking"
    assert w.gates["evidence"][0].startswith("errors 0/900 on 2.0.0 vs 0/3000 on 1.0.0")
    cmds = counters(r, 61.0, router_stats(at=61.0, a=(5000, 0, 10), b=(1200, 0, 10)),
                    router_stats(at=61.0, a=(9000, 0, 10)))
    passed = events(cmds, "gate.passed")
    assert [e.message for e in passed] == ["wave 0: gates passed"]
    assert "rise at most" in passed[0].data["evidence"][0]
    assert r.record.waves[0].state == "passed"


def test_too_little_clean_traffic_is_inconclusive_at_the_end() -> None:
    """40 clean requests cannot rule out a 5 % error rate: the rollout pauses, saying so."""
    r = rollout(2, bake=10.0, gates=SEQ)
    started(r)
    counters(r, 11.0, router_stats(at=11.0, a=(5000, 0, 10), b=(40, 0, 10)),
             router_stats(at=11.0, a=(5120, 0, 10)))
    r.handle(Tick(), 11.5)
    assert r.state == "paused"
    assert "too little data to rule out the regression" in r.record.reason


def test_the_evidence_is_weighed_on_new_counters_at_most_once_a_tick() -> None:
    """A wave's agents report one by one: the first new report is weighed at once, the next
    within EVIDENCE_EVERY on the tick after it; the same counters again weigh nothing."""
    r = rollout(2, bake=60.0, gates=SEQ)
    started(r)
    cmds = reported(r, 3.0, router_stats(at=3.0, a=(5000, 0, 10), b=(60, 31, 10)),
                    router_stats(at=3.0, a=(5600, 0, 10)))
    first = dict(r.record.waves[0].gates)
    assert kinds(cmds) == [] and first["requests"] == 0 and first["evidence_at"] == 3.0
    assert r.handle(Tick(), 3.0 + EVIDENCE_EVERY / 2) == []
    cmds = r.handle(Tick(), 3.0 + EVIDENCE_EVERY)
    assert "gate.failed" in kinds(cmds) and r.record.waves[0].gates["requests"] == 60
