"""Running a daemon's event loop: on uvloop where it is installed, else asyncio's own.

uvloop (libuv under asyncio's API; a dependency except on Windows) moves the transport's work,
socket writes and reads and the selector, out of Python: the router's whole job, and a tenth of
the simulated fleet's CPU, which shares the benchmarks' two cores with the coordinator. The
coordinator itself stays on asyncio's loop: on uvloop its peak RSS at 50,000 simulated nodes
went from 445 to 532 MiB for a rollout time within the machine's noise (``coordinator.cli.
fleet_cmds``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop's loop where uvloop is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


async def bounded(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw``, TimeoutError after ``timeout`` seconds (None: no bound): ``asyncio.wait_for``
    that a cancellation always stops. On Python 3.11, ``wait_for`` returns the result and drops
    the cancellation when both arrive in the same turn of the loop (CPython gh-86296, fixed in
    3.12): a loop cancelled as its event fired went on waiting for the next one, and whoever
    awaited its end waited for ever. ``asyncio.timeout`` never drops one."""
    async with asyncio.timeout(timeout):
        return await aw


async def first_set(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set (a daemon's stop, or its bus gone for good)."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
