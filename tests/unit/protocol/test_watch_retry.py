"""The backoff of a watch whose start failed (``protocol.bus.retry_delay``)."""

from __future__ import annotations

import random
import statistics
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
    assert _bounds(monkeypatch, 1, spread=60.0) == (WATCH_RETRY_BASE / 2, 60.0)
    assert _bounds(monkeypatch, 50, spread=3.0) == (WATCH_RETRY_CAP / 2, WATCH_RETRY_CAP)


def test_a_zero_failure_count_is_the_first_step(monkeypatch: Any) -> None:
    assert _bounds(monkeypatch, 0) == _bounds(monkeypatch, 1)


def test_a_fleets_watch_retries_within_its_spread_from_the_first_failure() -> None:
    """A failure at a fleet's scale is the server's: the first retry is drawn within the whole
    spread, not after 0.25 s (at a cold start of 20,000 watches the quick retries kept the
    storm going); the later ones no sooner."""
    rng = random.Random(7)
    draws = iter(rng.random() for _ in range(10**5))
    real = bus_mod.random.uniform
    try:
        bus_mod.random.uniform = lambda a, b: a + (b - a) * next(draws)  # type: ignore[assignment]
        first = [retry_delay(1, 40.0) for _ in range(2000)]
        later = [retry_delay(6, 40.0) for _ in range(2000)]
    finally:
        bus_mod.random.uniform = real  # type: ignore[assignment]
    assert min(first) >= WATCH_RETRY_BASE / 2 and max(first) <= 40.0
    assert 18.0 < statistics.median(first) < 22.0
    assert min(later) >= 4.0 and max(later) <= 40.0  # the backoff (4-8 s) or a draw within
