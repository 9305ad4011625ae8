"""agent.cadence: periodic timers on one grid, so that they share the agent's wakeups."""

from __future__ import annotations

import asyncio

from agent.cadence import next_tick, sleep_to_tick


def test_next_tick_is_the_next_multiple_strictly_after_now() -> None:
    """The next grid point is the first multiple of the period after now, never now itself."""
    assert next_tick(10.3, 2.0) == 12.0
    assert next_tick(12.0, 2.0) == 14.0
    assert next_tick(17.0, 2.0) == 18.0  # late: the missed beats are skipped, no burst


def test_periods_that_divide_each_other_fall_due_together() -> None:
    """A 200 ms probe and a 2 s heartbeat are due at the same instant every 2 s (one wakeup)."""
    for now in (1234.5678, 99_999.91, 3.99):
        beat = next_tick(now, 2.0)
        probe = now
        while (probe := next_tick(probe, 0.2)) < beat - 1e-6:
            pass
        assert abs(probe - beat) < 1e-9


async def test_sleep_to_tick_wakes_on_the_grid() -> None:
    """sleep_to_tick returns at the next multiple of its period on the loop's clock."""
    loop = asyncio.get_running_loop()
    await sleep_to_tick(0.05)
    t = loop.time()
    assert abs(t / 0.05 - round(t / 0.05)) * 0.05 < 0.03  # at the grid point, give or take


async def test_sleep_to_tick_wakes_early_when_told() -> None:
    """With ``wake`` (a new heartbeat pace), it returns as soon as the event is set."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    loop.call_later(0.01, wake.set)
    start = loop.time()
    await asyncio.wait_for(sleep_to_tick(3600.0, wake=wake), timeout=10)
    assert wake.is_set() and loop.time() - start < 3600.0
