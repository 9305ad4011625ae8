"""Running a daemon's event loop: on uvloop where it is installed, else asyncio's own.

uvloop (libuv under asyncio's API; a dependency except on Windows) moves the transport's work,
socket writes and reads and the selector, out of Python: the router's whole job, and about a
tenth of a coordinator's CPU in a 10,000-node rollout (``tests/perf/bench_control_plane.py
--profile``), where the coordinator's one core is what holds the time. The router, the
coordinator and the simulated fleet run on it; the event loop is the only thing that changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
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
