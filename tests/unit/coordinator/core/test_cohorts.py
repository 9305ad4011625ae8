"""The gates' cohort figures: users per side from the merged sketches, window counts."""

from __future__ import annotations

from coordinator.core.cohorts import cohort_figures
from protocol.cohort import Cohort, sketch_add
from protocol.messages import CohortSpec, CohortTraffic, RouterStats

RULE = Cohort(CohortSpec(key="header:X-User", salt="r", new="b"))


def stats(users: dict[str, range], fallback: int, epoch: float = 1.0) -> RouterStats:
    sketches: dict[str, list[int]] = {}
    for slot, ids in users.items():
        sketch = sketches.setdefault(slot, [])
        for i in ids:
            sketch_add(sketch, RULE.hash_of(b"u%d" % i))
    return RouterStats(epoch=epoch, cohort=CohortTraffic(fallback=fallback, users=sketches))


def test_users_merge_over_nodes_and_counts_are_windowed() -> None:
    """The same users on two nodes count once; the fallback counts only since the window's
    start (a restarted router: from zero)."""
    one = stats({"b": range(0, 40), "a": range(40, 200)}, fallback=7)
    two = stats({"b": range(0, 40), "a": range(40, 200)}, fallback=5, epoch=2.0)
    figs = cohort_figures([(stats({}, 2), one, "b", "a"), (stats({}, 3), two, "b", "a")])
    assert figs["users_new"] == 40
    assert abs(figs["users_old"] - 160) <= 0.25 * 160
    assert figs["fallback_requests"] == 5 + 5  # node-1: 7 - 2; node-2 restarted: 5


def test_no_rule_no_figures() -> None:
    """Routers without a cohort rule add nothing to the report."""
    assert cohort_figures([(RouterStats(), RouterStats(), "b", "a")]) == {}
