"""coordinator.core.reconnects: a burst of the agents' registrations, the nodes that registered
counted over a sliding window; at least LEAST of them, or SHARE of the fleet if more."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from coordinator.core.reconnects import LEAST, STEP_BACK, Reconnects


def test_a_lone_reconnect_is_no_burst() -> None:
    r = Reconnects()
    assert not any(r.note(100.0 + i, 1000, 10.0, f"n{i}") for i in range(5))
    assert r.last is None and r.began is None and r.counted == 5


def test_least_registrations_within_the_window_make_a_burst() -> None:
    r = Reconnects()
    got = [r.note(100.0 + i * 0.1, 10, 10.0, f"n{i}") for i in range(LEAST)]
    assert got == [False] * (LEAST - 1) + [True]
    assert r.began == r.last == pytest.approx(100.0 + (LEAST - 1) * 0.1)


def test_a_large_fleet_needs_its_share() -> None:
    """5 % of 10,000 is 500: 499 registrations are no burst, the 500th is."""
    r = Reconnects()
    assert not any(r.note(100.0, 10_000, 30.0, f"n{i}") for i in range(499))
    assert r.note(100.5, 10_000, 30.0, "n499")


def test_registrations_older_than_the_window_are_forgotten() -> None:
    """Spread thin (one every 2 s over a 10 s window), however many: never a burst."""
    r = Reconnects()
    assert not any(r.note(100.0 + 2 * i, 10, 10.0, f"n{i}") for i in range(100))
    assert r.counted == 6  # 80, 82 ... 90 at 198 s's: the window's own, its edge included


def test_a_burst_goes_on_while_more_come_and_a_later_one_is_new() -> None:
    r = Reconnects(least=3)
    for i, t in enumerate((100.0, 100.5, 101.0)):
        r.note(t, 10, 10.0, f"a{i}")
    assert (r.began, r.last) == (101.0, 101.0)
    for i, t in enumerate((105.0, 106.0)):
        assert r.note(t, 10, 10.0, f"b{i}")  # within the window of the others: the same burst
    assert (r.began, r.last, r.end) == (101.0, 106.0, 106.0)
    for i, t in enumerate((200.0, 200.1, 200.2)):
        r.note(t, 10, 10.0, f"c{i}")
    assert (r.began, r.last) == (200.2, 200.2)  # after a quiet window: a new burst


@pytest.mark.parametrize(("least", "share"), [(0, 0.05), (20, 0.0), (20, 1.5)])
def test_nonsense_settings_are_refused(least: int, share: float) -> None:
    with pytest.raises(ValueError, match="least must be"):
        Reconnects(least, share)


def test_a_burst_is_under_way_until_a_window_passes_without_one() -> None:
    r = Reconnects(least=2)
    assert not r.under_way(100.0)
    r.note(100.0, 10, 10.0, "a")
    r.note(100.5, 10, 10.0, "b")
    assert r.under_way(100.5) and r.under_way(110.5)
    assert not r.under_way(110.6)


def test_a_node_counts_once_however_often_it_registers() -> None:
    """Ten agents in crash loops, registering every 0.5 s, are ten nodes: never a burst."""
    r = Reconnects()
    assert not any(r.note(100.0 + k * 0.5 + i * 0.01, 10, 10.0, f"n{i}")
                   for k in range(100) for i in range(10))
    assert r.counted == 10 and r.last is None


def test_churn_ends_the_burst_one_window_after_its_first_registration() -> None:
    """More than LEAST nodes registering again and again: the burst began with the first
    LEAST, and ends (``end``, what the excuse runs from) one window later, however long the
    churn goes on; the pace says no burst a window after that; no new burst begins."""
    r = Reconnects(least=3)
    for k in range(1000):  # 4 nodes every 2 s, for 2,000 s
        for i in range(4):
            r.note(100.0 + 2 * k + i * 0.01, 10, 10.0, f"n{i}")
    assert r.began == pytest.approx(100.02) and r.last == pytest.approx(2098.03)
    assert r.end == pytest.approx(110.02)
    assert r.under_way(120.0) and not r.under_way(120.1) and not r.under_way(2098.1)


def test_what_is_counted_lies_within_the_window() -> None:
    """A registration a window and a fraction old no longer counts: one lone registration
    after a burst's tail is no second burst (found by a review: buckets kept window + 1 s)."""
    r = Reconnects(least=25)
    for i in range(25):
        r.note(100.0 + i * 0.01, 400, 7.0, f"n{i}")
    assert r.began == pytest.approx(100.24)
    assert not r.note(107.9, 400, 7.0, "late")
    assert r.counted == 1 and r.began == pytest.approx(100.24)


def test_a_clock_that_steps_back_forgets_what_was_counted() -> None:
    """An NTP step or a restored VM: the times no longer compare, so nothing counted before
    makes a burst of what comes after, and no burst is under way."""
    r = Reconnects(least=3)
    for i in range(3):
        r.note(5000.0 + i * 0.1, 10, 10.0, f"n{i}")
    assert r.under_way(5000.5)
    assert not r.under_way(5000.2 - STEP_BACK - 3600)
    assert not r.note(1400.0, 10, 10.0, "n9")
    assert r.counted == 1 and r.last is None and r.began is None


def test_a_registration_looks_only_at_what_leaves_the_window() -> None:
    """A fleet-wide restart: 5,000 nodes register within one window, then the window slides over
    them. Each registration looks at the nodes it drops and at one it keeps, not at every node
    counted (session 34: a copy of them all at each registration made 20,000 registrations cost
    the leader 11.8 s of CPU)."""
    looked = [0]

    class Counting(OrderedDict[str, float]):
        def items(self):  # type: ignore[override]
            for item in super().items():
                looked[0] += 1
                yield item

    r = Reconnects()
    r._seen = Counting()
    n = 5_000
    for i in range(n):  # all within the window: every one kept
        r.note(100.0 + i * 0.0001, n, 10.0, f"n{i}")
    assert r.counted == n
    for i in range(n):  # one window later: each drops what left it
        r.note(111.0 + i * 0.0001, n, 10.0, f"m{i}")
    assert r.counted == n
    assert looked[0] <= 4 * n, f"{looked[0]} entries looked at for {2 * n} registrations"
