"""Per-node log lines in bursts (``coordinator.core.lines``): a few nodes log as they come; a
fleet coming online at once logs the first ``burst`` and one line for the rest."""

from __future__ import annotations

import pytest

from coordinator.core.lines import Lines


def test_lines_one_at_a_time_are_all_logged_and_nothing_is_summed_up() -> None:
    """A small fleet's transitions, one every few seconds, log as before: all, no summary."""
    lines = Lines(burst=3, window=5.0)
    for t in range(0, 100, 6):  # one a window: never more than the burst
        assert lines.admit("node.online", float(t))
        assert lines.due(float(t) + 0.1) == []
    assert lines.due(1000.0) == []


def test_a_burst_logs_its_first_lines_and_sums_up_the_rest_once_its_window_closes() -> None:
    """50,000 online within 5 s: 3 lines, then one summary of 49,997 once, when it closes."""
    lines = Lines(burst=3, window=5.0)
    admitted = [lines.admit("node.online", 10.0 + i * 0.00009) for i in range(50_000)]
    assert admitted[:3] == [True] * 3 and not any(admitted[3:])
    assert lines.due(14.9) == []  # the window is still open
    [said] = lines.due(15.0)
    assert said.startswith("49,997 more nodes came online in 5s than the 3 logged one by one")
    assert "node.online event" in said and "fleetwave events" in said
    assert lines.due(16.0) == []  # once
    assert lines.admit("node.online", 16.0)  # a new window


def test_kinds_have_windows_of_their_own() -> None:
    """A burst of one kind does not hold back another's lines; one held line is singular."""
    lines = Lines(burst=1, window=5.0)
    assert lines.admit("node.online", 0.0) and not lines.admit("node.online", 0.1)
    assert lines.admit("node.offline", 0.2) and not lines.admit("node.offline", 0.3)
    assert lines.admit("node.registered", 0.4)
    said = lines.due(5.5)
    assert len(said) == 2
    assert any(s.startswith("1 more node came online in 6s") for s in said)
    assert any(s.startswith("1 more node went offline in 5s") for s in said)


def test_lines_held_in_a_closed_window_not_yet_summed_up_are_counted_in_it() -> None:
    """A line after its window closed but before ``due`` asked: counted with the window's held
    lines (the ticker sums them up a tick later), not logged ahead of that summary."""
    lines = Lines(burst=1, window=5.0)
    assert lines.admit("node.online", 0.0)
    assert not lines.admit("node.online", 1.0)
    assert not lines.admit("node.online", 6.0)
    [said] = lines.due(6.1)
    assert said.startswith("2 more nodes came online in 6s")
    assert lines.admit("node.online", 6.2)


def test_a_registration_summary_does_not_point_at_events_there_are_none_of() -> None:
    """Registrations are no events: their summary points at ``fleetwave nodes``."""
    lines = Lines(burst=0, window=1.0)
    assert not lines.admit("node.registered", 0.0)
    [said] = lines.due(1.0)
    assert said.startswith("1 more online node registered again") and "event" not in said
    assert "fleetwave nodes" in said


@pytest.mark.parametrize(("burst", "window"), [(-1, 5.0), (3, 0.0), (3, float("nan"))])
def test_nonsense_limits_are_refused(burst: int, window: float) -> None:
    """A negative burst or a window that is not a positive number is a programming error."""
    with pytest.raises(ValueError):
        Lines(burst=burst, window=window)


def test_a_stopping_process_says_its_open_windows_with_their_real_length() -> None:
    """On the way out every window is said, an open one too, in seconds it really lasted (it
    read "in infs" when the stop asked with an infinite time)."""
    lines = Lines(burst=1, window=10.0)
    for t in (0.0, 1.0, 2.0):
        lines.admit("node.registered", t)
    assert lines.due(3.0) == []
    [said] = lines.due(3.0, every=True)
    assert said.startswith("2 more online nodes registered again in 3s than the 1 logged")
