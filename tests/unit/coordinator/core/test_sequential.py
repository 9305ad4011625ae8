"""Sequential analysis: e-values, fixed-sample bounds, the latency edge, and verdicts in words."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core import sequential as seq
from coordinator.core.gates import Window, figures
from coordinator.core.sequential import Counts, evidence, judge
from protocol.messages import LATENCY_BOUNDS_MS, Gates
from tests.unit.coordinator.kit import hist

SEQ = Gates(analysis="sequential", max_error_rate=0.05)

counts = st.integers(0, 2000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))
tolerances = st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2])


@pytest.mark.parametrize(("new", "old", "delta", "over", "finding"), [
    ((31, 60), (0, 600), 0.05, False, "fail"),  # half the answers fail: at once
    ((10, 20), (0, 60), 0.05, False, "fail"),  # ten errors of twenty are enough
    ((5, 10), (0, 30), 0.05, False, "open"),  # five of ten are not, at alpha 0.01
    ((0, 0), (0, 0), 0.01, True, "open"),  # no data is never a pass
    ((0, 40), (0, 120), 0.01, True, "open"),  # 40 clean requests cannot rule out 1 %
    ((0, 60), (0, 600), 0.05, True, "open"),  # 0.95^60 = 4.6 %: not ruled out at 1 %
    ((0, 200), (0, 600), 0.05, True, "pass"),
    ((0, 200), (0, 600), 0.05, False, "open"),  # a pass waits for the bake's end
    ((0, 600), (0, 3000), 0.01, True, "pass"),
    ((13, 1000), (100, 10000), 0.005, True, "open"),  # 1.3 % vs 1 %: neither way yet
    ((60, 1000), (100, 10000), 0.01, False, "fail"),  # 6 % vs 1 %, tolerance 1 point
])
def test_findings(new: tuple[int, int], old: tuple[int, int], delta: float, over: bool,
                  finding: str) -> None:
    """Each table row: the counts, the tolerance and whether the bake is over give the finding."""
    ev = evidence(Counts(*new), Counts(*old), delta, 0.01)
    assert judge(ev, delta, 0.01, over) == finding, ev


def test_no_data_is_an_e_value_of_one() -> None:
    """Without any request the evidence is exactly neutral, and the rise is unbounded."""
    ev = evidence(Counts(0, 0), Counts(0, 0), 0.01, 0.01)
    assert ev.e_fail == pytest.approx(1.0)
    assert ev.rise_at_most == 1.0


@given(counts, counts, tolerances)
def test_estimate_inside_the_null_is_no_evidence(new: tuple[int, int], old: tuple[int, int],
                                                  delta: float) -> None:
    """When new's observed rate is within old's + tolerance, the e-value is at most 1."""
    n, o = Counts(*new), Counts(*old)
    if seq.rate(n) <= seq.rate(o) + delta:
        assert evidence(n, o, delta, 0.01).e_fail <= 1.0 + 1e-9


@given(counts, counts, tolerances)
def test_more_errors_on_new_never_lowers_the_bound_on_the_rise(
    new: tuple[int, int], old: tuple[int, int], delta: float,
) -> None:
    """One more error among new's requests never makes a pass easier."""
    k, n = new
    if k < n:
        a = evidence(Counts(k, n), Counts(*old), delta, 0.01)
        b = evidence(Counts(k + 1, n), Counts(*old), delta, 0.01)
        assert b.rise_at_most >= a.rise_at_most - 1e-9


@given(counts, tolerances)
def test_without_old_traffic_nothing_is_evidence(new: tuple[int, int], delta: float) -> None:
    """Old's rate unknown (it could be as high as new's): no count of new's errors fails it."""
    ev = evidence(Counts(*new), Counts(0, 0), delta, 0.01)
    assert ev.e_fail <= 1.0 + 1e-9
    assert judge(ev, delta, 0.01, over=True) != "fail"


@given(counts, st.sampled_from([0.001, 0.01, 0.05]))
def test_bounds_hold_the_estimate(c: tuple[int, int], a: float) -> None:
    """The Chernoff bounds are on either side of the observed rate, within [0, 1]."""
    x = Counts(*c)
    assert 0.0 <= seq.lower(x, a) <= seq.rate(x) + 1e-12
    assert seq.rate(x) - 1e-12 <= seq.upper(x, a) <= 1.0


def test_bound_matches_the_exact_binomial_tail_with_no_errors() -> None:
    """With k = 0 the Chernoff bound is exact: (1 - upper)^n = a."""
    for n in (10, 100, 1000):
        assert (1 - seq.upper(Counts(0, n), 0.005)) ** n == pytest.approx(0.005, rel=1e-6)


def test_false_rollbacks_stay_below_alpha_when_looking_every_tick() -> None:
    """Seeded: new and old at the same 5 % error rate, the evidence read after every batch of
    requests for 100 batches: the share of runs that ever cross 1/alpha stays below alpha."""
    rng = random.Random(18)
    alpha, runs, crossed = 0.05, 300, 0
    for _ in range(runs):
        n = o = Counts(0, 0)
        for _ in range(100):
            kn = sum(rng.random() < 0.05 for _ in range(10))
            ko = sum(rng.random() < 0.05 for _ in range(30))
            n, o = Counts(n.k + kn, n.n + 10), Counts(o.k + ko, o.n + 30)
            if judge(evidence(n, o, 0.0, alpha), 0.0, alpha, over=False) == "fail":
                crossed += 1
                break
    assert crossed / runs <= alpha


def test_p99_is_interpolated_inside_its_bucket() -> None:
    """The reference's p99 lies inside its bucket, log-linearly by its rank; None when empty."""
    lower, upper = LATENCY_BOUNDS_MS[9], LATENCY_BOUNDS_MS[10]
    assert seq.p99_ms(hist(b10=1000)) == pytest.approx(lower * (upper / lower) ** 0.99)
    assert seq.p99_ms(hist(b5=980, b10=20)) == pytest.approx(lower * (upper / lower) ** 0.5)
    assert seq.p99_ms([0] * (len(LATENCY_BOUNDS_MS) + 1)) is None
    assert seq.p99_ms(hist(**{f"b{len(LATENCY_BOUNDS_MS)}": 5})) == math.inf


def test_slow_counts_whole_buckets_above_the_edge_and_a_share_of_its_own() -> None:
    """Buckets wholly above the edge count whole; the edge's bucket by its log share above it."""
    lower, upper = LATENCY_BOUNDS_MS[9], LATENCY_BOUNDS_MS[10]
    middle = math.sqrt(lower * upper)
    assert seq.slow(hist(b5=5, b10=10, b20=3), middle) == Counts(3 + 5, 18)
    assert seq.slow(hist(b5=5, b10=10, b20=3), upper) == Counts(3, 18)
    assert seq.slow(hist(b5=5), LATENCY_BOUNDS_MS[-1] * 2) == Counts(0, 5)


def test_error_verdict_says_the_evidence_in_words() -> None:
    """A 50 % canary fails mid-bake with its counts, versions, e-value and bound in the reason."""
    fig = figures(1, 1, [Window(60, 31)], [Window(600, 0)])
    v = seq.evaluate(SEQ, fig, over=False, names=("2.0.0", "1.0.0"))
    assert v.outcome == "fail"
    assert v.reason == "errors 31/60 on 2.0.0 vs 0/600 on 1.0.0: e-value 2.0e20 >= " \
        "1/alpha = 100: fail"
    assert v.figures["e_error"] == pytest.approx(2.0e20, rel=0.05)
    assert v.figures["thresholds"]["analysis"] == "sequential"


def test_mid_bake_only_a_failure_is_final() -> None:
    """While the bake runs, clean traffic is not a pass: the verdict says go on (inconclusive)."""
    fig = figures(1, 1, [Window(500, 0)], [Window(1500, 0)])
    assert seq.evaluate(SEQ, fig, over=False).outcome == "inconclusive"
    assert seq.evaluate(SEQ, fig, over=True).outcome == "pass"


def test_no_traffic_at_the_end_is_inconclusive_never_a_pass() -> None:
    """No request on the new release: inconclusive, as under threshold."""
    v = seq.evaluate(SEQ, figures(1, 1, [], [Window(600, 0)]), over=True)
    assert v.outcome == "inconclusive"
    assert "no request reached the new release" in v.reason


def test_min_requests_holds_a_pass_but_not_a_failure() -> None:
    """Below --min-requests a clean canary is inconclusive; a failing one still fails."""
    gates = Gates(analysis="sequential", max_error_rate=0.05, min_requests=1000)
    clean = figures(1, 1, [Window(500, 0)], [Window(1500, 0)])
    assert seq.evaluate(gates, clean, over=True).outcome == "inconclusive"
    bad = figures(1, 1, [Window(60, 31)], [Window(600, 0)])
    assert seq.evaluate(gates, bad, over=False).outcome == "fail"


def test_latency_regression_fails_on_slow_requests_and_splits_alpha() -> None:
    """+200 ms on every answer: the slow-request test fails at 1/(alpha/2) with both tests on."""
    gates = Gates(analysis="sequential", max_error_rate=0.05, max_p99_ratio=1.5)
    fig = figures(1, 1, [Window(60, 0, tuple(hist(b30=60)))],
                  [Window(600, 0, tuple(hist(b10=600)))])
    v = seq.evaluate(gates, fig, hist(b10=5000), over=False, names=("2.3.0", "2.0.0"))
    assert v.outcome == "fail"
    assert v.reason.startswith("requests slower than ")
    assert "60/60 on 2.3.0 vs 0/600 on 2.0.0" in v.reason and "1/alpha = 200" in v.reason
    assert v.figures["slow_new"] == 60 and v.figures["slow_old"] == 0


def test_latency_without_history_uses_the_window_and_says_so() -> None:
    """With fewer than MIN_REFERENCE old requests before the window the edge is the window's."""
    gates = Gates(analysis="sequential", max_p99_ratio=1.5)
    fig = figures(1, 1, [Window(60, 0, tuple(hist(b30=60)))],
                  [Window(600, 0, tuple(hist(b10=600)))])
    v = seq.evaluate(gates, fig, (), over=False)
    assert v.outcome == "fail" and "window's own old traffic" in v.reason


def test_latency_without_old_traffic_is_inconclusive() -> None:
    """Nothing to compare latency with: never a pass."""
    gates = Gates(analysis="sequential", max_p99_ratio=1.5)
    fig = figures(1, 1, [Window(600, 0, tuple(hist(b10=600)))], [])
    v = seq.evaluate(gates, fig, (), over=True)
    assert v.outcome == "inconclusive" and "no old-release traffic" in v.reason


def test_e_text_is_short() -> None:
    """e-values read as 2.1e5, 370, 37, 0.52."""
    assert [seq.e_text(x) for x in (2.1e5, 370.2, 37.3, 0.523, 3e-4, math.inf)] == \
        ["2.1e5", "370", "37", "0.52", "3.0e-4", "inf"]


def test_a_tolerance_of_everything_does_not_crash_the_engine() -> None:
    """A record with --max-error-rate 100% (refused at deploy) is judged, not raised on."""
    gates = Gates(analysis="sequential", max_error_rate=1.0)
    v = seq.evaluate(gates, figures(1, 1, [Window(60, 60)], [Window(600, 0)]), over=True)
    assert v.outcome == "inconclusive"


BIG = 2**53  # the largest count a node's report may hold (protocol.messages)
in_bounds = st.one_of(st.integers(0, 10), st.integers(0, BIG), st.sampled_from([BIG, BIG - 1]))
histograms = st.lists(st.one_of(st.integers(0, 5), st.integers(0, BIG)), max_size=60).map(tuple)


@settings(max_examples=400, deadline=None)
@given(new=st.builds(Window, in_bounds, in_bounds, histograms),
       old=st.builds(Window, in_bounds, in_bounds, histograms), reference=histograms,
       rise=st.one_of(st.none(), st.floats(0, 1)),
       ratio=st.one_of(st.none(), st.floats(0.001, 1e6)), alpha=st.floats(1e-12, 0.999),
       over=st.booleans())
def test_no_figures_within_the_reports_bounds_crash_the_analysis(
        new: Window, old: Window, reference: tuple[int, ...], rise: float | None,
        ratio: float | None, alpha: float, over: bool) -> None:
    """Whatever windows reach it (counts up to 2**53, more errors than requests, histograms of
    any length and total), the analysis gives a verdict: a review made ``math.lgamma`` raise
    "math domain error" with an old window of 0 requests and 2**52 errors (two valid snapshots
    of one node, 100 requests with no error, then 100 with 50, make such a window: the driver
    of the rollout then crashed at every resync, and the rollout hung)."""
    gates = Gates(analysis="sequential", max_error_rate=rise, max_p99_ratio=ratio, alpha=alpha)
    fig = figures(3, 3, [new], [old])
    verdict = seq.evaluate(gates, fig, reference, over=over)
    assert verdict.outcome in ("pass", "fail", "inconclusive")
