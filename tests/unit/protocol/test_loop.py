"""protocol.loop.bounded: asyncio.wait_for without Python 3.11's dropped cancellation."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from protocol.loop import bounded

ROOT = Path(__file__).resolve().parents[3]


async def waited_then_cancelled(wait: str, turns: int) -> str:
    """A task waiting (``wait``) for an event, the event set and the task cancelled ``turns``
    turns of the loop later: what became of the task."""
    fired = asyncio.Event()
    waits = {"bounded": lambda: bounded(fired.wait(), 5),
             "wait_for": lambda: asyncio.wait_for(fired.wait(), 5)}
    task = asyncio.create_task(waits[wait]())
    await asyncio.sleep(0)  # the task waits
    fired.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    if task.done():
        return "ended first"
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "went on after cancel()"


@pytest.mark.parametrize("turns", range(4))
async def test_a_wait_cancelled_as_its_event_fires_is_cancelled(turns: int) -> None:
    """Cancelled in any turn between its event firing and its waking, the task is cancelled
    (or had ended before the cancel): never handed the result as if not cancelled."""
    assert await waited_then_cancelled("bounded", turns) in {"ended first", "cancelled"}


async def test_the_harness_sees_wait_for_drop_a_cancellation_where_it_does() -> None:
    """The same harness catches asyncio.wait_for dropping the cancellation on this Python
    (3.11); on 3.12+ wait_for is asyncio.timeout inside and drops none."""
    import sys
    seen = {await waited_then_cancelled("wait_for", t) for t in range(4)}
    dropped = "went on after cancel()" in seen
    assert dropped == (sys.version_info < (3, 12)), seen


async def test_bounded_times_out_and_leaves_no_bound_with_none() -> None:
    with pytest.raises(TimeoutError):
        await bounded(asyncio.Event().wait(), 0.01)
    assert await bounded(asyncio.sleep(0, "done"), None) == "done"


def test_no_package_uses_asyncio_wait_for() -> None:
    """Every bounded wait in the packages and the benchmarks goes through ``bounded``."""
    found = []
    for pkg in ("agent", "coordinator", "protocol", "tests/perf"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Attribute) and node.attr == "wait_for"
                        and isinstance(node.value, ast.Name) and node.value.id == "asyncio"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], f"use protocol.loop.bounded instead of asyncio.wait_for: {found}"
