"""The shadow error gate counts copies sent, so a shadow that never answers fails it instead of
pausing the rollout as inconclusive."""

from __future__ import annotations

import pytest

from coordinator.core.gates_shadow import ShadowFigures, ShadowWindow, evaluate_shadow
from protocol.messages import Gates


@pytest.mark.parametrize(
    ("gates", "window", "outcome", "says"),
    [
        pytest.param(Gates(max_error_rate=0.1, min_requests=4),
                     ShadowWindow(mirrored=200, dropped=188, shadow_errors=12), "fail",
                     "12 of 12 copies unanswered", id="hanging-shadow-fails"),
        pytest.param(Gates(max_error_rate=0.1, max_mismatch_rate=0.01, min_requests=4),
                     ShadowWindow(shadow_errors=12), "fail", "shadow error rate",
                     id="hanging-fails-even-with-a-mismatch-gate"),
        pytest.param(Gates(max_error_rate=0.1), ShadowWindow(shadow_errors=1), "fail",
                     "100.00%", id="hanging-without-min-requests"),
        pytest.param(Gates(max_error_rate=0.1, min_requests=20),
                     ShadowWindow(compared=5, shadow_errors=5), "inconclusive",
                     "10 copies sent to the shadow, fewer than min-requests 20",
                     id="too-few-copies"),
        pytest.param(Gates(max_error_rate=0.1), ShadowWindow(), "inconclusive",
                     "no request was mirrored", id="nothing-sent-is-never-a-pass"),
        pytest.param(Gates(max_error_rate=0.1), ShadowWindow(compared=90, shadow_errors=10),
                     "pass", "", id="at-threshold-over-copies-sent"),
        pytest.param(Gates(max_error_rate=0.1), ShadowWindow(compared=89, shadow_errors=11),
                     "fail", "11 of 100", id="above-threshold"),
        pytest.param(Gates(min_requests=4), ShadowWindow(shadow_errors=12), "inconclusive",
                     "0 mirrored requests compared", id="min-requests-alone-counts-pairs"),
        pytest.param(Gates(max_mismatch_rate=0.01, min_requests=0), ShadowWindow(),
                     "inconclusive", "no mirrored request was compared",
                     id="min-requests-0-mismatch-gate-with-nothing-compared"),
        pytest.param(Gates(max_error_rate=0.01, min_requests=0), ShadowWindow(),
                     "inconclusive", "no request was mirrored",
                     id="min-requests-0-error-gate-with-nothing-sent"),
    ],
)
def test_error_gate_over_copies_sent(gates: Gates, window: ShadowWindow, outcome: str,
                                     says: str) -> None:
    """Shadow errors are judged per copy sent (compared + unanswered), dropped copies aside."""
    verdict = evaluate_shadow(gates, ShadowFigures(2, 2, window))
    assert verdict.outcome == outcome, verdict.reasons
    assert says in "; ".join(verdict.reasons)
    assert verdict.figures["sent"] == window.compared + window.shadow_errors


def test_error_rate_figure_is_per_copy_sent() -> None:
    """The report's error rate is unanswered / sent, None when nothing was sent."""
    assert ShadowFigures(1, 1, ShadowWindow(compared=3, shadow_errors=1)).error_rate == 0.25
    assert ShadowFigures(1, 1, ShadowWindow(dropped=50)).error_rate is None
