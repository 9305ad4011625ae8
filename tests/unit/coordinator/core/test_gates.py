"""Gates: windows over cumulative router counters, histogram quantiles, and verdicts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core import evidence, gates_shadow
from coordinator.core import gates as gatelib
from coordinator.core.gates import (
    NO_TRAFFIC,
    Window,
    evaluate,
    figures,
    mirror_window,
    quantile,
    total,
    window,
)
from protocol.messages import LATENCY_BOUNDS_MS, Gates, MirrorTraffic, RouterStats, SlotTraffic
from tests.unit.coordinator.kit import NB, hist


def stats(epoch: float = 1.0, **slots: tuple[int, int, list[int]]) -> RouterStats:
    return RouterStats(epoch=epoch, slots={
        s: SlotTraffic(requests=r, errors=e, latency=lat) for s, (r, e, lat) in slots.items()
    })


def test_quantile_is_the_upper_bound_of_the_bucket_holding_the_rank() -> None:
    """p99 of 100 requests is the bound of the bucket holding the 99th fastest."""
    h = hist(b10=98, b20=1, b30=1)
    assert quantile(h, 0.99) == LATENCY_BOUNDS_MS[20]
    assert quantile(h, 0.5) == LATENCY_BOUNDS_MS[10]
    assert quantile([0] * NB, 0.99) is None
    h7 = hist(b1=692, b2=7)  # 699 requests: 0.99 * 699 = 692.01, rank 693 is in bucket 2
    assert quantile(h7, 0.99) == LATENCY_BOUNDS_MS[2]
    h_exact = hist(b1=99, b2=1)  # rank 99 exactly: still bucket 1, never rounded up to 100
    assert quantile(h_exact, 0.99) == LATENCY_BOUNDS_MS[1]


def test_quantile_of_the_overflow_bucket_is_finite() -> None:
    """Requests slower than the last bound give a finite figure above it (JSON-safe)."""
    q = quantile(hist(**{f"b{NB - 1}": 5}), 0.99)
    assert q is not None and q > LATENCY_BOUNDS_MS[-1]


def test_window_is_the_difference_of_two_snapshots() -> None:
    """Within one router epoch the window subtracts the start counters."""
    w = window(stats(b=(10, 1, hist(b3=10))), stats(b=(110, 6, hist(b3=60, b9=50))), "b")
    assert (w.requests, w.errors) == (100, 5)
    assert w.latency[3] == 50 and w.latency[9] == 50


def test_window_after_a_router_restart_counts_from_zero() -> None:
    """A new epoch means the counters reset: the window is the end snapshot alone."""
    before = stats(epoch=1.0, b=(500, 0, hist(b3=500)))
    w = window(before, stats(epoch=2.0, b=(7, 1, hist(b3=7))), "b")
    assert (w.requests, w.errors) == (7, 1)


def test_window_with_counters_going_backwards_counts_from_zero() -> None:
    """Counters lower than at the start (an unannounced reset) never give negative traffic."""
    w = window(stats(b=(500, 9, [])), stats(b=(20, 0, [])), "b")
    assert (w.requests, w.errors) == (20, 0)


def test_window_of_missing_data_is_empty() -> None:
    """No end snapshot or an absent slot is an empty window, not an error."""
    assert window(None, None, "a") == Window()
    assert window(None, stats(), "a") == Window()


def test_mirror_window() -> None:
    """Shadow comparisons are windowed like the slot counters."""
    a = RouterStats(epoch=1.0, mirror=MirrorTraffic(compared=10, mismatched=1))
    b = RouterStats(epoch=1.0, mirror=MirrorTraffic(compared=60, mismatched=6))
    assert mirror_window(a, b) == (50, 5)
    assert mirror_window(b, RouterStats(epoch=2.0, mirror=MirrorTraffic(compared=3))) == (3, 0)
    assert mirror_window(a, RouterStats(epoch=1.0)) == (0, 0)


def fig(requests: int = 1000, errors: int = 0, new_bucket: int = 10, old_bucket: int = 10,
        old_requests: int = 1000, healthy: int = 4, nodes: int = 4, compared: int = 0,
        mismatched: int = 0):  # type: ignore[no-untyped-def]
    new = Window(requests, errors, tuple(hist(**{f"b{new_bucket}": requests})))
    old = Window(old_requests, 0, tuple(hist(**{f"b{old_bucket}": old_requests})))
    return figures(nodes, healthy, [new], [old], [(compared, mismatched)])


@pytest.mark.parametrize(
    ("name", "gates", "figs", "outcome", "says"),
    [
        ("no gates pass", Gates(), fig(requests=0, old_requests=0), "pass", ""),
        ("healthy enough", Gates(min_healthy=0.75), fig(healthy=3), "pass", ""),
        ("too few healthy", Gates(min_healthy=1.0), fig(healthy=3), "fail", "min-healthy"),
        ("error rate under", Gates(max_error_rate=0.01), fig(errors=5), "pass", ""),
        ("error rate over", Gates(max_error_rate=0.01), fig(errors=50), "fail", "error rate 5.00%"),
        ("no traffic is never a pass", Gates(max_error_rate=0.01), fig(requests=0),
         "inconclusive", "no request"),
        ("below min-requests", Gates(max_error_rate=0.5, min_requests=2000), fig(),
         "inconclusive", "fewer than min-requests 2000"),
        ("min-requests alone", Gates(min_requests=10), fig(requests=10), "pass", ""),
        ("p99 ratio ok", Gates(max_p99_ratio=1.5), fig(new_bucket=11), "pass", ""),
        ("p99 ratio over", Gates(max_p99_ratio=1.5), fig(new_bucket=20), "fail", "max-p99-ratio"),
        ("p99 without old traffic", Gates(max_p99_ratio=1.5), fig(old_requests=0),
         "inconclusive", "no old-release traffic"),
        ("p99 from a few slow old requests", Gates(max_p99_ratio=1.5),
         fig(new_bucket=20, old_bucket=40, old_requests=3), "inconclusive",
         "read from 3 requests, fewer than 100"),
        ("p99 old floor follows min-requests", Gates(max_p99_ratio=1.5, min_requests=500),
         fig(old_requests=400), "inconclusive", "fewer than 500"),
        ("mismatch ok", Gates(max_mismatch_rate=0.1), fig(compared=100, mismatched=5), "pass", ""),
        ("mismatch over", Gates(max_mismatch_rate=0.01), fig(compared=100, mismatched=5),
         "fail", "mismatch rate"),
        ("mismatch no data", Gates(max_mismatch_rate=0.01), fig(), "inconclusive", "mirrored"),
        ("fail beats inconclusive", Gates(min_healthy=1.0, min_requests=5000), fig(healthy=1),
         "fail", "min-healthy"),
    ],
)
def test_verdict_table(name: str, gates: Gates, figs, outcome: str, says: str) -> None:  # type: ignore[no-untyped-def]
    """Each gate passes, fails or is inconclusive as documented, with a reason naming it."""
    v = evaluate(gates, figs)
    assert v.outcome == outcome, (name, v.reasons)
    assert says in v.reason
    assert v.figures["thresholds"]["min_healthy"] == gates.min_healthy


counters = st.integers(0, 10_000)


@given(a=counters, b=counters, ea=counters, eb=counters, same_epoch=st.booleans())
def test_window_never_negative(a: int, b: int, ea: int, eb: int, same_epoch: bool) -> None:
    """Whatever two snapshots say, the window's counts are never negative."""
    start = stats(epoch=1.0, b=(a, min(ea, a), []))
    end = stats(epoch=1.0 if same_epoch else 2.0, b=(b, min(eb, b), []))
    w = window(start, end, "b")
    assert w.requests >= 0 and w.errors >= 0
    assert w.requests <= b


@given(h=st.lists(st.integers(0, 50), min_size=1, max_size=NB))
def test_quantiles_are_ordered(h: list[int]) -> None:
    """p50 <= p99 <= p100 for any histogram with data."""
    if sum(h) == 0:
        assert quantile(h, 0.99) is None
        return
    q50, q99, q100 = quantile(h, 0.5), quantile(h, 0.99), quantile(h, 1.0)
    assert q50 is not None and q99 is not None and q100 is not None
    assert q50 <= q99 <= q100


def test_total_adds_windows_of_any_histogram_length() -> None:
    """``total`` is the bucket-wise sum, a shorter histogram counting as zeros, and skips the
    shared no-traffic window without changing the result."""
    parts = [Window(3, 1, (1, 2)), NO_TRAFFIC, Window(5, 0, (0, 1, 4)), Window(0, 0, ())]
    assert total(parts) == Window(8, 1, (1, 3, 4))
    assert total([]) == Window() == NO_TRAFFIC


def test_a_window_with_no_new_traffic_is_the_shared_empty_one() -> None:
    """Equal counters on both snapshots give NO_TRAFFIC; a counter that went backwards counts
    everything since the restart."""
    a = RouterStats(epoch=1.0, slots={"a": SlotTraffic(requests=10, errors=1, latency=[4, 6])})
    assert window(a, a, "a") is NO_TRAFFIC
    assert window(a, a, "b") is NO_TRAFFIC
    later = RouterStats(epoch=1.0, slots={"a": SlotTraffic(requests=12, errors=1, latency=[5, 7])})
    assert window(a, later, "a").requests == 2 and window(a, later, "a").latency == (1, 1)
    reset = RouterStats(epoch=1.0, slots={"a": SlotTraffic(requests=3, errors=0, latency=[3])})
    assert window(a, reset, "a").requests == 3


# -- trust: figures left out (core.evidence) never make a pass ------------------------------------


def test_untrusted_figures_are_named_and_never_a_pass() -> None:
    """Traffic gates that would pass on the trusted nodes alone are inconclusive when a node's
    figures were left out, and the reason names the node and why."""
    good = Window(1000, 0, tuple(hist(b10=1000)))
    figs = gatelib.figures(3, 3, [good], [good],
                         untrusted={"node-3": "slot 'b': errors 50 > requests 10"})
    v = evaluate(Gates(max_error_rate=0.01), figs)
    assert v.outcome == "inconclusive"
    assert v.reasons == ("node-3's router figures are invalid (slot 'b': errors 50 > requests "
                         "10); left out",)
    assert v.figures["untrusted"] == {"node-3": "slot 'b': errors 50 > requests 10"}


def test_untrusted_figures_do_not_hide_a_failure_of_the_trusted_ones() -> None:
    """Errors on the trusted nodes still fail the gate, and the left-out node is named too."""
    bad = Window(1000, 300, tuple(hist(b10=1000)))
    v = evaluate(Gates(max_error_rate=0.01),
                 gatelib.figures(2, 2, [bad], [bad], untrusted={"node-2": "why"}))
    assert v.outcome == "fail"
    assert "error rate 30.00%" in v.reason and "node-2's router figures are invalid" in v.reason


def test_untrusted_figures_leaving_too_few_requests_are_inconclusive() -> None:
    """A node left out counts none of its requests: below --min-requests is inconclusive."""
    few = Window(40, 0, tuple(hist(b10=40)))
    v = evaluate(Gates(max_error_rate=0.01, min_requests=100),
                 gatelib.figures(2, 2, [few], [few], untrusted={"node-2": "why"}))
    assert v.outcome == "inconclusive" and "fewer than min-requests 100" in v.reason


def test_untrusted_figures_do_not_matter_to_gates_that_read_no_traffic() -> None:
    """Only --min-healthy set (a stage wave): router figures are not evidence, so no pause."""
    v = evaluate(Gates(min_healthy=1.0),
                 gatelib.figures(2, 2, [], [], untrusted={"node-2": "why"}))
    assert v.outcome == "pass"


def test_untrusted_shadow_figures_are_named_and_never_a_pass() -> None:
    """The shadow gates read the same untrusted list and treat it the same way."""
    w = gates_shadow.ShadowWindow(mirrored=100, compared=100, mismatched=0,
                           shadow_latency=tuple(hist(b3=100)), live_latency=tuple(hist(b3=100)))
    v = gates_shadow.evaluate_shadow(Gates(max_mismatch_rate=0.1),
                              gates_shadow.ShadowFigures(2, 2, w, untrusted={"node-2": "why"}))
    assert v.outcome == "inconclusive" and "node-2's router figures are invalid (why)" in v.reason


def test_many_untrusted_nodes_are_counted_not_all_listed() -> None:
    """Reasons name the first few nodes and count the rest; figures list a bounded number, so
    a fleet of lying nodes cannot grow the rollout record without bound."""
    untrusted = {f"node-{i:03}": "slot 'b': errors -1 is negative" for i in range(500)}
    v = evaluate(Gates(max_error_rate=0.01), gatelib.figures(500, 500, [], [],
                                                              untrusted=untrusted))
    assert v.outcome == "inconclusive"
    assert len(v.reasons) == 1 + evidence.MAX_NAMED + 1  # no traffic, five named, the rest
    assert v.reasons[-1].startswith(f"{500 - evidence.MAX_NAMED} more nodes'")
    assert len(v.figures["untrusted"]) == evidence.MAX_LISTED
    assert v.figures["untrusted_nodes"] == 500
