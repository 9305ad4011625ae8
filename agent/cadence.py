"""One grid for the agent's periodic timers, so that they wake the process together.

An idle agent is made of timers: the health probes of every slot, the heartbeat, the router
stats, the log cap check. Each timer that fires on its own is one more wakeup of the process
(a trip through the kernel and round the event loop), and an idle agent's CPU is made of
wakeups. So every periodic loop sleeps until the next multiple of its period on the event loop's
clock (``next_tick``) rather than one period after it last ran: timers whose periods divide one
another then fall due at the same instants (a 200 ms probe, a 2 s heartbeat and 2 s router stats
share one wakeup every 2 s instead of three), and asyncio runs every timer due at that instant in
one pass of the loop.

A loop that ran late (a slow probe, a stalled loop) waits for the next grid point, so it skips
the missed beats rather than bunching them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import math


def next_tick(now: float, period: float) -> float:
    """The first multiple of ``period`` strictly after ``now``."""
    return (math.floor(now / period) + 1) * period


async def sleep_to_tick(period: float, wake: asyncio.Event | None = None) -> None:
    """Sleep until the next multiple of ``period`` on the running loop's clock, or until
    ``wake`` is set if one is given (the caller clears it)."""
    loop = asyncio.get_running_loop()
    delay = max(0.0, next_tick(loop.time(), period) - loop.time())
    if wake is None:
        await asyncio.sleep(delay)
    else:
        await sleep_or_wake(delay, wake)


async def sleep_or_wake(delay: float, wake: asyncio.Event) -> None:
    """Sleep ``delay`` seconds, or until ``wake`` is set (the caller clears it)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, delay)):
            await wake.wait()
