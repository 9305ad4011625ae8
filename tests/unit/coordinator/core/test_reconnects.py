"""coordinator.core.reconnects: a burst of the agents' registrations, counted over a sliding
window in one-second buckets; at least LEAST of them, or SHARE of the fleet if more."""

from __future__ import annotations

import pytest

from coordinator.core.reconnects import LEAST, Reconnects


def test_a_lone_reconnect_is_no_burst() -> None:
    r = Reconnects()
    assert not any(r.note(100.0 + i, 1000, 10.0) for i in range(5))
    assert r.last is None and r.began is None and r.counted == 5


def test_least_registrations_within_the_window_make_a_burst() -> None:
    r = Reconnects()
    got = [r.note(100.0 + i * 0.1, 10, 10.0) for i in range(LEAST)]
    assert got == [False] * (LEAST - 1) + [True]
    assert r.began == r.last == pytest.approx(100.0 + (LEAST - 1) * 0.1)


def test_a_large_fleet_needs_its_share() -> None:
    """5 % of 10,000 is 500: 499 registrations are no burst, the 500th is."""
    r = Reconnects()
    assert not any(r.note(100.0, 10_000, 30.0) for _ in range(499))
    assert r.note(100.5, 10_000, 30.0)


def test_registrations_older_than_the_window_are_forgotten() -> None:
    """Spread thin (one every 2 s over a 10 s window), however many: never a burst."""
    r = Reconnects()
    assert not any(r.note(100.0 + 2 * i, 10, 10.0) for i in range(100))
    assert r.counted <= 7


def test_a_burst_goes_on_while_more_come_and_a_later_one_is_new() -> None:
    r = Reconnects(least=3)
    for t in (100.0, 100.5, 101.0):
        r.note(t, 10, 10.0)
    assert (r.began, r.last) == (101.0, 101.0)
    for t in (105.0, 106.0):
        assert r.note(t, 10, 10.0)  # still within the window of the others: the same burst
    assert (r.began, r.last) == (101.0, 106.0)
    for t in (200.0, 200.1, 200.2):
        r.note(t, 10, 10.0)
    assert (r.began, r.last) == (200.2, 200.2)  # after a quiet window: a new burst


@pytest.mark.parametrize(("least", "share"), [(0, 0.05), (20, 0.0), (20, 1.5)])
def test_nonsense_settings_are_refused(least: int, share: float) -> None:
    with pytest.raises(ValueError, match="least must be"):
        Reconnects(least, share)


def test_a_burst_is_under_way_until_a_window_passes_without_one() -> None:
    r = Reconnects(least=2)
    assert not r.under_way(100.0)
    r.note(100.0, 10, 10.0)
    r.note(100.5, 10, 10.0)
    assert r.under_way(100.5) and r.under_way(110.5)
    assert not r.under_way(110.6)
