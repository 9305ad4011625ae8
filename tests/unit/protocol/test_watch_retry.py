"""The backoff of a watch whose start failed (``protocol.bus.retry_delay``)."""

from __future__ import annotations

from typing import Any

import protocol.bus as bus_mod
from protocol.bus import WATCH_RETRY_BASE, WATCH_RETRY_CAP, retry_delay


def _bounds(monkeypatch: Any, failures: int, spread: float = 0.0) -> tuple[float, float]:
    """The least and the most ``retry_delay`` can draw."""
    monkeypatch.setattr(bus_mod.random, "uniform", lambda a, b: a)
    low = retry_delay(failures, spread)
    monkeypatch.setattr(bus_mod.random, "uniform", lambda a, b: b)
    return low, retry_delay(failures, spread)


def test_it_doubles_from_the_base_with_half_of_each_step_drawn(monkeypatch: Any) -> None:
    assert _bounds(monkeypatch, 1) == (WATCH_RETRY_BASE / 2, WATCH_RETRY_BASE)
    assert _bounds(monkeypatch, 2) == (WATCH_RETRY_BASE, 2 * WATCH_RETRY_BASE)
    assert _bounds(monkeypatch, 4) == (4 * WATCH_RETRY_BASE, 8 * WATCH_RETRY_BASE)


def test_it_stops_growing_at_the_cap_or_the_spread_if_larger(monkeypatch: Any) -> None:
    """A fleet whose watches keep failing (no bucket yet, a server that cannot keep up) asks
    at most about once per cap each; a large fleet (its spread) less often still."""
    assert _bounds(monkeypatch, 50) == (WATCH_RETRY_CAP / 2, WATCH_RETRY_CAP)
    assert _bounds(monkeypatch, 10**6) == (WATCH_RETRY_CAP / 2, WATCH_RETRY_CAP)
    assert _bounds(monkeypatch, 50, spread=60.0) == (30.0, 60.0)
    assert _bounds(monkeypatch, 1, spread=60.0) == (WATCH_RETRY_BASE / 2, WATCH_RETRY_BASE)
    assert _bounds(monkeypatch, 50, spread=3.0) == (WATCH_RETRY_CAP / 2, WATCH_RETRY_CAP)


def test_a_zero_failure_count_is_the_first_step(monkeypatch: Any) -> None:
    assert _bounds(monkeypatch, 0) == _bounds(monkeypatch, 1)
