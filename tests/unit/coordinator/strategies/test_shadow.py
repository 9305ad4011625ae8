"""Shadow in the rollout engine and its gates, in virtual time: stage with a mirror, bake over
the router's mirror counters, report, then retire or continue with --then."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.core.engine import (
    Command,
    IllegalTransition,
    ObservedChanged,
    Promote,
    Resume,
    Rollout,
    Start,
    Tick,
)
from coordinator.core.gates_shadow import (
    ShadowFigures,
    ShadowWindow,
    evaluate_shadow,
    shadow_window,
)
from coordinator.errors import UsageError
from coordinator.strategies import plan
from protocol.messages import (
    LATENCY_BOUNDS_MS,
    DesiredState,
    Gates,
    MirrorSpec,
    MirrorTraffic,
    MismatchSample,
    NodeView,
    ObservedState,
    RolloutSpec,
    RouterStats,
    SlotStatus,
)
from protocol.testing import NEW, OLD
from tests.unit.coordinator import kit
from tests.unit.coordinator.kit import kinds, writes

NB = len(LATENCY_BOUNDS_MS) + 1


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {"strategy": "shadow", "mirror": 10.0, "bake": 60.0}
    return RolloutSpec(service="hello", version="2.0.0", **(base | kw))  # type: ignore[arg-type]


def rollout(n: int = 2, **kw: object) -> Rollout:
    base: dict[str, object] = {"strategy": "shadow", "mirror": 10.0, "bake": 60.0}
    return kit.rollout(n, id="sh", **(base | kw))


def hist(bucket: int, count: int) -> list[int]:
    h = [0] * NB
    h[bucket] = count
    return h


def mirror(compared: int, mismatched: int = 0, errors: int = 0, *, epoch: float = 1.0,
           shadow_bucket: int = 10, live_bucket: int = 10,
           samples: list[MismatchSample] | None = None) -> RouterStats:
    """Router stats whose mirror compared ``compared`` pairs in total since ``epoch``."""
    return RouterStats(epoch=epoch, mirror=MirrorTraffic(
        mirrored=compared, compared=compared, mismatched=mismatched, shadow_errors=errors,
        shadow_latency=hist(shadow_bucket, compared), live_latency=hist(live_bucket, compared),
        samples=samples or []))


def observed(d: DesiredState, t: float, router: RouterStats | None = None) -> ObservedState:
    """An agent converged on ``d``: every slot healthy, positive weights applied."""
    return ObservedState(
        node=d.node, service="hello", generation=d.generation, observed_generation=d.generation,
        slots={s: SlotStatus(slot=s, status="healthy", version=r.version)
               for s, r in d.slots.items()},
        weights={s: w for s, w in d.weights.items() if w > 0}, phase="converged", time=t,
        router=router)


def report_all(r: Rollout, t: float, router: RouterStats | None) -> list[Command]:
    out: list[Command] = []
    for d in r.intended():
        out += r.handle(ObservedChanged(d.node, observed(d, t, router)), t)
    return out


def baked(r: Rollout, start: RouterStats | None, end: RouterStats | None,
          t_end: float = 61.0) -> list[Command]:
    """Stage (converged at t=1 with ``start``), report ``end`` at t=30, tick at ``t_end``."""
    r.handle(Start(), 0.0)
    report_all(r, 1.0, start)
    assert r.record.waves[0].state == "baking"
    report_all(r, 30.0, end)
    return r.handle(Tick(), t_end)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        pytest.param({"mirror": 0.0}, "--mirror", id="no-mirror"),
        pytest.param({"mirror": 150.0}, "--mirror", id="mirror-over-100"),
        pytest.param({"mirror_methods": []}, "mirror-methods", id="no-methods"),
        pytest.param({"mirror_methods": ["GET /x"]}, "HTTP method", id="bad-method"),
        pytest.param({"then": "canary"}, "--then", id="then-canary"),
        pytest.param({"mirror_keep_headers": ["a b"]}, "--mirror-keep-header", id="bad-kept"),
        pytest.param({"ignore_headers": ["x:"]}, "--ignore-header", id="bad-ignored"),
    ],
)
def test_plan_refuses_bad_shadow_settings(kw: dict[str, object], match: str) -> None:
    """Bad shadow settings are a one-line usage error before anything moves."""
    with pytest.raises(UsageError, match=match):
        plan([NodeView(id="node-1")], spec(**kw))


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        pytest.param({}, [(0, 4)], id="alone"),
        pytest.param({"then": "blue-green"}, [(0, 4), (100, 4)], id="then-blue-green"),
        pytest.param({"then": "rolling", "batch": "2", "max_unavailable": "2"},
                     [(0, 4), (100, 2), (100, 2)], id="then-rolling"),
    ],
)
def test_plan_shapes(kw: dict[str, object], expected: list[tuple[int, int]]) -> None:
    """A shadow wave over every node, then the waves of --then."""
    waves = plan([NodeView(id=f"node-{i}") for i in range(1, 5)], spec(**kw))
    assert [(w.weight, len(w.nodes)) for w in waves] == expected
    assert [w.index for w in waves] == list(range(len(expected)))


def test_start_stages_every_node_with_the_mirror_and_no_weight() -> None:
    """Every node gets the new release at weight 0 and a mirror to it, in one batch."""
    r = rollout(3, mirror_methods=["get"], ignore_headers=["date"], ignore_json_fields=["$.ts"],
                mirror_keep_headers=["x-foo"])
    ds = writes(r.handle(Start(), 0.0))
    assert len(ds) == 3
    for d in ds:
        assert d.slots == {"a": OLD, "b": NEW} and d.weights == {"a": 100, "b": 0}
        assert d.mirror == MirrorSpec(slot="b", percent=10.0, methods=["GET"],
                                      ignore_headers=["date"], ignore_json_fields=["$.ts"],
                                      keep_headers=["x-foo"])


def test_gates_pass_without_then_retire_the_shadow_and_succeed_with_a_report() -> None:
    """Passing gates end the shadow: previous states again, succeeded, figures reported."""
    r = rollout(2, gates=Gates(max_mismatch_rate=0.1, min_requests=50))
    cmds = baked(r, mirror(100), mirror(200, 5))
    assert r.state == "succeeded" and "shadow.retired" in kinds(cmds)
    assert all(d.slots == {"a": OLD} and d.weights == {"a": 100} and d.mirror is None
               and d.generation == 9 for d in writes(cmds))
    rep = kit.report(r.record)["shadow"]
    assert (rep["compared"], rep["mismatched"], rep["mismatch_rate"]) == (200, 10, 0.05)
    assert rep["keep_headers"] == []  # the report says whether credentials reached the shadow
    assert rep["outcome"] == "pass" and rep["window"] == [1.0, 61.0]
    assert r.record.waves[0].gates["compared"] == 200


def test_a_node_whose_router_reports_nothing_at_the_end_is_no_pass() -> None:
    """node-2's mirror figures are unknown, not zero: left out and named, so the shadow pauses
    as inconclusive rather than pass on node-1's clean pairs alone."""
    r = rollout(2, gates=Gates(max_mismatch_rate=0.1, min_requests=50))
    r.handle(Start(), 0.0)
    report_all(r, 1.0, mirror(100))
    for d in r.intended():
        end = None if d.node == "node-2" else mirror(200)
        r.handle(ObservedChanged(d.node, observed(d, 30.0, end)), 30.0)
    cmds = r.handle(Tick(), 61.0)
    assert "gate.inconclusive" in kinds(cmds) and r.state == "paused"
    assert r.record.waves[0].gates["untrusted"] == {
        "node-2": "no router counters reported at the bake's end"}


def test_a_node_cannot_fail_a_shadow_with_impossible_mismatches() -> None:
    """A node claiming more mismatches than comparisons would fail the shadow; its mirror
    figures are left out, and the rollout pauses naming it (untrusted evidence is no pass)."""
    r = rollout(2, gates=Gates(max_mismatch_rate=0.1, min_requests=50))
    r.handle(Start(), 0.0)
    report_all(r, 1.0, mirror(100))
    liar = msgspec.structs.replace(mirror(200), mirror=msgspec.structs.replace(
        mirror(200).mirror, mismatched=900))
    for d in r.intended():
        end = liar if d.node == "node-2" else mirror(200)
        r.handle(ObservedChanged(d.node, observed(d, 30.0, end)), 30.0)
    cmds = r.handle(Tick(), 61.0)
    assert "gate.inconclusive" in kinds(cmds) and r.state == "paused"
    rep = kit.report(r.record)["shadow"]
    assert (rep["compared"], rep["mismatched"], rep["outcome"]) == (100, 0, "inconclusive")
    assert "node-2's router figures are invalid (mirror: mismatched 900 > compared 200)" \
        in r.record.reason


@pytest.mark.parametrize(
    ("gates", "end", "reason"),
    [
        pytest.param(Gates(max_mismatch_rate=0.01), mirror(200, 20), "mismatch rate",
                     id="mismatch"),
        pytest.param(Gates(max_error_rate=0.05), mirror(200, 0, 30), "shadow error rate",
                     id="shadow-errors"),
        pytest.param(Gates(max_p99_ratio=1.5), mirror(200, shadow_bucket=20, epoch=2.0),
                     "p99", id="p99-ratio"),
    ],
)
def test_failing_gates_retire_the_shadow_and_end_rolled_back(gates: Gates, end: RouterStats,
                                                            reason: str) -> None:
    """A failed gate restores every node and ends rolled back with the report, even with
    on-failure pause."""
    r = rollout(2, gates=gates, on_failure="pause")
    cmds = baked(r, mirror(100), end)
    assert "gate.failed" in kinds(cmds) and r.record.phase == "rollback"
    assert all(d.slots == {"a": OLD} and d.weights == {"a": 100} for d in writes(cmds))
    report_all(r, 62.0, end)
    assert r.state == "rolled_back" and reason in r.record.reason
    assert kit.report(r.record)["shadow"]["outcome"] == "fail"


def test_too_few_compared_pairs_pause_as_inconclusive_and_resume_rebakes() -> None:
    """Fewer compared pairs than --min-requests pause the rollout; resume bakes again."""
    r = rollout(1, gates=Gates(max_mismatch_rate=0.1, min_requests=500))
    baked(r, mirror(100), mirror(150))
    assert r.state == "paused" and "fewer than min-requests 500" in r.record.reason
    r.handle(Resume(), 70.0)
    assert r.record.waves[0].state == "baking" and r.record.waves[0].bake_until == 130.0
    report_all(r, 100.0, mirror(900))
    r.handle(Tick(), 131.0)
    assert r.state == "succeeded" and kit.report(r.record)["shadow"]["compared"] == 750


def test_router_restart_inside_the_window_counts_from_zero() -> None:
    """A new router epoch in the window: the end snapshot alone is the window."""
    r = rollout(1, gates=Gates(max_mismatch_rate=0.5))
    baked(r, mirror(1000, 900), mirror(40, 2, epoch=2.0))
    rep = kit.report(r.record)["shadow"]
    assert (rep["compared"], rep["mismatched"]) == (40, 2) and r.state == "succeeded"


def test_report_keeps_sample_mismatches() -> None:
    """Sample mismatches (node, path, what differed) go into the report."""
    samples = [MismatchSample(method="GET", path=f"/p{i}", what="status 200 vs 500")
               for i in range(8)]
    r = rollout(1)
    baked(r, mirror(10), mirror(20, 3, samples=samples))
    got = kit.report(r.record)["shadow"]["samples"]
    assert len(got) == 5 and got[0]["node"] == "node-1" and got[-1]["path"] == "/p7"
    assert got[0]["what"] == "status 200 vs 500"


def test_then_blue_green_switches_every_node_after_passing() -> None:
    """With --then blue-green the staged slots take all traffic at once, mirror dropped."""
    r = rollout(3, then="blue-green", gates=Gates(max_mismatch_rate=0.1), scale_down_delay=0.0)
    cmds = baked(r, mirror(10), mirror(100))
    ds = writes(cmds)
    assert len(ds) == 3 and "bluegreen.switching" in kinds(cmds)
    assert all(d.weights == {"a": 0, "b": 100} and d.mirror is None for d in ds)
    out = report_all(r, 62.0, None)
    assert r.state == "running" and r.record.waves[1].state == "baking"  # post-switch bake
    out = r.handle(Tick(), 122.0)
    assert r.state == "succeeded"
    assert all(d.slots == {"b": NEW} for d in writes(out))


def test_then_rolling_moves_weights_in_waves_within_max_unavailable() -> None:
    """With --then rolling the staged slots take traffic one batch at a time."""
    r = rollout(3, then="rolling", batch="1", max_unavailable="1")
    cmds = baked(r, mirror(10), mirror(100))
    (d,) = writes(cmds)
    assert d.node == "node-1" and d.weights == {"a": 0, "b": 100} and d.mirror is None
    seen = [d.node]
    t = 70.0
    for _ in range(10):
        if r.state != "running":
            break
        cmds = report_all(r, t, None) + r.handle(Tick(), t + 60.0)  # converge, then bake
        seen += [w.node for w in writes(cmds) if w.weights.get("b") == 100 and len(w.slots) > 1]
        t += 61.0
    assert r.state == "succeeded" and seen == ["node-1", "node-2", "node-3"]


def test_promote_while_inconclusive_passes_without_then() -> None:
    """Promote on an inconclusive shadow passes it; without --then that retires it."""
    r = rollout(1, gates=Gates(max_mismatch_rate=0.1, min_requests=500))
    baked(r, mirror(0), mirror(10))
    cmds = r.handle(Promote(), 70.0)
    assert r.state == "succeeded" and writes(cmds)[0].slots == {"a": OLD}


def test_illegal_transitions_raise_and_change_nothing() -> None:
    """Start while baking raises and leaves the record byte-identical."""
    r = rollout(1)
    r.handle(Start(), 0.0)
    before = msgspec.json.encode(r.record)
    with pytest.raises(IllegalTransition, match="cannot start"):
        r.handle(Start(), 1.0)
    assert msgspec.json.encode(r.record) == before


# -- the gates alone -------------------------------------------------------------------------------


def test_shadow_window_subtracts_within_an_epoch_and_survives_counters_going_back() -> None:
    """The window is end - start within an epoch; counters that fell back count from zero."""
    w = shadow_window(mirror(100, 10, 1), mirror(300, 15, 4))
    assert (w.compared, w.mismatched, w.shadow_errors) == (200, 5, 3)
    assert sum(w.shadow_latency) == 200
    w = shadow_window(mirror(100, 10), mirror(50, 1))
    assert (w.compared, w.mismatched) == (50, 1)
    assert shadow_window(None, RouterStats()) == ShadowWindow()


@pytest.mark.parametrize(
    ("gates", "window", "outcome"),
    [
        pytest.param(Gates(), ShadowWindow(), "pass", id="no-gates-report-only"),
        pytest.param(Gates(max_mismatch_rate=0.1), ShadowWindow(), "inconclusive",
                     id="no-data-is-never-a-pass"),
        pytest.param(Gates(max_mismatch_rate=0.1, min_requests=10),
                     ShadowWindow(compared=9, mismatched=9), "inconclusive",
                     id="below-min-requests"),
        pytest.param(Gates(max_mismatch_rate=0.1), ShadowWindow(compared=10, mismatched=1),
                     "pass", id="at-threshold"),
        pytest.param(Gates(max_mismatch_rate=0.1), ShadowWindow(compared=10, mismatched=2),
                     "fail", id="above-threshold"),
        pytest.param(Gates(max_p99_ratio=2.0, max_error_rate=0.5),
                     ShadowWindow(compared=10, shadow_latency=tuple(hist(5, 10))),
                     "inconclusive", id="no-live-latency"),
        pytest.param(Gates(min_healthy=1.0, max_mismatch_rate=0.5), ShadowWindow(),
                     "fail", id="fail-beats-inconclusive"),
    ],
)
def test_evaluate_shadow(gates: Gates, window: ShadowWindow, outcome: str) -> None:
    """Each shadow gate gives pass, fail or inconclusive as documented."""
    healthy = 1 if gates.min_healthy else 2
    verdict = evaluate_shadow(gates, ShadowFigures(2, healthy, window))
    assert verdict.outcome == outcome, verdict.reasons
    assert verdict.figures["thresholds"]["max_mismatch_rate"] == gates.max_mismatch_rate
