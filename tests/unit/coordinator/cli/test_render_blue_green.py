"""How the blue-green switch and switch back read in ``status`` and in a followed ``deploy``."""

from __future__ import annotations

import time
from typing import Any

from coordinator.cli.render import bluegreen_lines, progress_lines, status_text

SWITCH = {"at": 100.0, "wave": 1, "first": 100.010, "last": 100.014, "spread": 0.004,
          "lag": 0.014, "nodes": {"node-1": 100.010, "node-2": 100.012, "node-3": 100.014}}


def _status(report: dict[str, Any]) -> dict[str, Any]:
    return {"id": "r1", "service": "hello", "version": "2.0.0", "from_version": "1.0.0",
            "strategy": "blue-green", "state": "running", "reason": "", "phase": "forward",
            "current_wave": 1, "report": report, "waves": [], "nodes": {}}


def test_nothing_before_the_switch_is_reported() -> None:
    """A switch decided but not yet seen on every node says nothing (no spread yet)."""
    pending = {"at": 100.0, "wave": 1, "nodes": {"node-1": 100.01}}
    assert bluegreen_lines({"switch": pending}) == []
    assert bluegreen_lines({}) == []


def test_switch_spread_and_lag_in_milliseconds() -> None:
    """The switch line names the node count, the spread first to last and the lag."""
    assert bluegreen_lines({"switch": SWITCH}) == [
        "switched 3 nodes at once: spread 4.0ms (first to last), lag 14.0ms after the decision"
    ]


def test_warm_window_and_switch_back() -> None:
    """The warm window names its end; the switch back has its own spread line."""
    until = 400.0
    report = {"switch": {**SWITCH, "warm_until": until},
              "switch_back": {"at": 200.0, "first": 200.002, "last": 200.005, "spread": 0.003,
                              "lag": 0.005, "nodes": {"node-1": 200.002, "node-2": 200.005}}}
    lines = bluegreen_lines(report)
    clock = time.strftime("%H:%M:%S", time.localtime(until))
    assert lines[1] == (f"old slots stay warm until {clock}: a rollback before then is an "
                        "instant switch back")
    assert lines[2] == "switched 2 nodes back at once: spread 3.0ms, lag 5.0ms after the decision"


def test_progress_prints_each_line_once() -> None:
    """Following a rollout prints the switch when it appears, and not again on the next poll."""
    before, now = _status({"switch": {"at": 100.0, "nodes": {}}}), _status({"switch": SWITCH})
    first = progress_lines(before, now)
    assert sum("switched 3 nodes at once" in line for line in first) == 1
    assert not any("switched" in line for line in progress_lines(now, now))


def test_status_text_shows_the_switch() -> None:
    """``fleetwave status`` without a terminal carries the same line."""
    assert "switched 3 nodes at once" in status_text(_status({"switch": SWITCH}))


def test_malformed_report_is_ignored() -> None:
    """A report from another coordinator version with odd shapes renders nothing, not a crash."""
    assert bluegreen_lines({"switch": "x", "switch_back": {"spread": "?"}}) == []
    assert bluegreen_lines({"switch": {"spread": 0.1, "nodes": None, "lag": None}}) == [
        "switched 0 nodes at once: spread 100.0ms (first to last), lag n/a after the decision"
    ]
