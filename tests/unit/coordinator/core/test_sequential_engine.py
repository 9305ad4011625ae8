"""The engine under ``--analysis sequential``, in virtual time: a regression fails the wave on the
first report that carries the evidence, mid-bake or while the wave is still updating (its evidence
counts from the wave's start); a pass still waits for the bake's end."""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from coordinator.core.engine import Command, ObservedChanged, Promote, Resume, Rollout, Start, Tick
from coordinator.core.engine_bake import EVIDENCE_EVERY
from protocol.codec import decode, encode
from protocol.messages import Gates, RolloutRecord, RouterStats
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
    assert r.record.reason.startswith("wave 1 gates failed: requests slower than ")


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
    assert [e.message for e in passed] == ["wave 1: gates passed"]
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


# -- evidence from the switch: the wave's start, not its bake --------------------------------------

OLD_NODE3 = router_stats(at=1.0, a=(5000, 0, 10))
# A first wave of two nodes (node-1, node-2) updated together; node-3 stays on 1.0.0.
TWO: dict[str, Any] = {"strategy": "canary", "steps": ["2", "100%"], "max_unavailable": "2"}


def begun(r: Rollout, t: float = 1.0) -> list[Command]:
    """The runner's order: every node's current state first (node-1 and node-2, the wave, with
    500 old requests served, and 5 errors left in slot b by some earlier release), then Start."""
    for n in ("node-1", "node-2"):
        r.handle(ObservedChanged(n, report(desired(n), t, router_stats(
            at=t, a=(500, 0, 10), b=(20, 5, 10)))), t)
    r.handle(ObservedChanged("node-3", report(desired("node-3"), t, OLD_NODE3)), t)
    cmds = r.handle(Start(), t)
    assert r.record.waves[0].nodes == ["node-1", "node-2"]
    return cmds


def test_a_sequential_wave_counts_its_evidence_from_its_start() -> None:
    """The wave's start snapshots every node's counters before any weight moves (slot b's old
    errors are not counted as 2.0.0's); a threshold wave does not, and its record is as before
    (no evidence_from key in its JSON)."""
    r = rollout(3, **TWO, bake=60.0, gates=SEQ)
    begun(r)
    since = r.record.waves[0].evidence_from
    assert isinstance(since, dict) and set(since) == {"node-1", "node-2", "node-3"}
    assert since["node-1"].slots["b"].errors == 5
    t = rollout(3, **TWO, bake=60.0, gates=Gates(max_error_rate=0.05))
    begun(t)
    assert t.record.waves[0].evidence_from is UNSET
    assert b'"evidence_from"' not in encode(t.record)


def test_a_bad_release_fails_while_its_wave_is_still_updating() -> None:
    """node-1 switched and serves errors while node-2 has not converged yet: the wave fails at
    once, before it bakes, with the usual rollback and the counts since the wave's start."""
    r = rollout(3, **TWO, bake=60.0, gates=SEQ)
    d1, _ = writes(begun(r))
    r.handle(ObservedChanged("node-3", report(desired("node-3"), 2.0, router_stats(
        at=2.0, a=(5600, 0, 10)))), 2.0)
    cmds = r.handle(ObservedChanged("node-1", report(d1, 2.0, router_stats(
        at=2.0, a=(560, 0, 10), b=(80, 45, 10)))), 2.0)
    cmds += r.handle(Tick(), 2.0 + EVIDENCE_EVERY)
    assert "wave.baking" not in kinds(cmds) and "gate.failed" in kinds(cmds)
    assert r.record.phase == "rollback"
    assert "errors 40/60 on 2.0.0 vs 0/660 on 1.0.0: e-value" in r.record.reason
    assert r.record.waves[0].state == "failed"


def test_clean_evidence_while_updating_is_kept_and_the_bake_still_decides() -> None:
    """Clean traffic from node-1 while node-2 converges: the evidence is shown (outcome
    "updating"), the wave bakes once node-2 is done, and the pass waits for the bake's end."""
    r = rollout(3, **TWO, bake=10.0, gates=SEQ)
    d1, d2 = writes(begun(r))
    r.handle(ObservedChanged("node-1", report(d1, 2.0, router_stats(
        at=2.0, a=(500, 0, 10), b=(320, 5, 10)))), 2.0)
    r.handle(Tick(), 2.0 + EVIDENCE_EVERY)
    w = r.record.waves[0]
    assert w.state == "updating" and w.gates["outcome"] == "updating"
    assert w.gates["evidence"][0].startswith("errors 0/300 on 2.0.0")
    r.handle(ObservedChanged("node-2", report(d2, 3.0, router_stats(
        at=3.0, a=(500, 0, 10), b=(20, 5, 10)))), 3.0)
    assert r.record.waves[0].state == "baking"
    cmds: list[Command] = []
    for n, d, b in (("node-1", d1, 1320), ("node-2", d2, 1020)):
        cmds += r.handle(ObservedChanged(n, report(d, 14.0, router_stats(
            at=14.0, a=(500, 0, 10), b=(b, 5, 10)))), 14.0)
    cmds += r.handle(ObservedChanged("node-3", report(desired("node-3"), 14.0, router_stats(
        at=14.0, a=(9000, 0, 10)))), 14.0)
    cmds += r.handle(Tick(), 14.5)
    assert "gate.passed" in kinds(cmds)
    assert r.record.waves[0].gates["requests"] == 2300  # since the wave's start, not the bake's
    assert r.record.waves[1].state == "updating"
    assert r.record.waves[0].evidence_from is UNSET  # dropped once the next wave started


def test_a_retried_wave_counts_afresh_from_its_resume() -> None:
    """Under --on-failure pause a wave failed while updating; resumed, it is retried with its
    evidence counted from the resume, so the errors that failed it do not fail it again."""
    r = rollout(3, **TWO, bake=60.0, gates=SEQ, on_failure="pause")
    d1, _ = writes(begun(r))
    bad = router_stats(at=2.0, a=(560, 0, 10), b=(80, 45, 10))
    r.handle(ObservedChanged("node-1", report(d1, 2.0, bad)), 2.0)
    r.handle(Tick(), 2.0 + EVIDENCE_EVERY)
    assert r.state == "paused" and r.record.waves[0].state == "failed"
    r.handle(Resume(), 5.0)
    assert r.record.waves[0].state == "updating"
    r.handle(Tick(), 5.5)
    assert r.state == "running" and r.record.waves[0].state == "updating"
    assert r.record.waves[0].gates["errors"] == 0


def test_a_promoted_wave_is_not_failed_while_updating() -> None:
    """An operator's promote skips the wave's gates: errors while updating fail nothing."""
    r = rollout(3, **TWO, bake=60.0, gates=SEQ)
    d1, _ = writes(begun(r))
    r.handle(Promote(full=False, who="op"), 1.5)
    r.handle(ObservedChanged("node-1", report(d1, 2.0, router_stats(
        at=2.0, a=(560, 0, 10), b=(80, 45, 10)))), 2.0)
    cmds = r.handle(Tick(), 2.0 + EVIDENCE_EVERY)
    assert "gate.failed" not in kinds(cmds) and r.record.waves[0].state == "updating"


def test_a_router_restart_while_updating_counts_from_the_restart() -> None:
    """node-1's router restarted (a new epoch) after the wave's start: its window is the new
    epoch's counters alone, and errors there still fail the wave."""
    r = rollout(3, **TWO, bake=60.0, gates=SEQ)
    d1, _ = writes(begun(r))
    r.handle(ObservedChanged("node-1", report(d1, 2.0, router_stats(
        epoch=2.0, at=2.0, a=(10, 0, 10), b=(50, 25, 10)))), 2.0)
    r.handle(ObservedChanged("node-3", report(desired("node-3"), 2.0, router_stats(
        at=2.0, a=(5600, 0, 10)))), 2.0)
    r.handle(Tick(), 2.0 + EVIDENCE_EVERY)
    assert r.record.phase == "rollback"
    assert "errors 25/50 on 2.0.0 vs 0/610 on 1.0.0" in r.record.reason


def test_an_older_record_without_evidence_from_decodes_and_bakes_as_before() -> None:
    """A record written before evidence_from existed decodes (UNSET) and its windows start at
    the bake's baseline."""
    r = rollout(2, bake=60.0, gates=SEQ)
    started(r)
    raw = encode(r.record)
    assert b'"evidence_from":{}' in raw  # Start before any report: nothing to count from
    old = decode(RolloutRecord, raw.replace(b',"evidence_from":{}', b""))
    assert old.waves[0].evidence_from is UNSET
    again = Rollout(old, fleet=r.fleet)
    target = old.nodes["node-1"].target
    assert target is not None
    again.handle(ObservedChanged("node-1", report(target, 3.0, router_stats(
        at=3.0, a=(5000, 0, 10), b=(60, 31, 10)))), 3.0)
    again.handle(Tick(), 3.0 + EVIDENCE_EVERY)
    assert again.record.phase == "rollback"


def test_a_blue_green_switch_counts_from_the_switch_and_its_stage_not_at_all() -> None:
    """The stage wave carries no traffic: no evidence_from; the switch wave counts from its
    start, when every node's new slot still holds none."""
    r = rollout(3, strategy="blue-green", gates=SEQ)
    for n in ("node-1", "node-2", "node-3"):
        r.handle(ObservedChanged(n, report(desired(n), 1.0, router_stats(
            at=1.0, a=(500, 0, 10)))), 1.0)
    staged = writes(r.handle(Start(), 1.0))
    assert r.record.waves[0].evidence_from is UNSET
    for d in staged:
        r.handle(ObservedChanged(d.node, report(d, 2.0, router_stats(at=2.0, a=(600, 0, 10)))),
                 2.0)
    r.handle(Tick(), 2.5)
    stage, switch = r.record.waves
    assert stage.state == "passed" and switch.state == "updating"
    assert isinstance(switch.evidence_from, dict) and len(switch.evidence_from) == 3
