"""A cancel some callee turns into an error (Python 3.11: ``asyncio.timeout`` expiring as the
cancel lands, a TaskGroup with a failed child) must still end the loops that log an error and
go on, and a leadership must end even when some of its work will not: a coordinator of
50,000 nodes once waited for ever on its runner's observed feed, leading no one."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from coordinator.runtime import daemon
from coordinator.runtime.calls import ABANDONED, Retrying, all_of, cancelled_meanwhile
from coordinator.runtime.lease import Deposed
from protocol.errors import BusError


async def cancel_made_an_error() -> None:
    """An operation that, cancelled, raises BusError instead (as ``bounded`` does when 3.11
    turns the cancel into a TimeoutError)."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        raise BusError("NATS did not answer within 12s") from None


async def test_retrying_ends_when_its_task_is_cancelled_whatever_the_error() -> None:
    task = asyncio.create_task(Retrying(deadline=3600)(cancel_made_an_error))
    await asyncio.sleep(0)
    task.cancel()
    async with asyncio.timeout(5):  # before the fix: retried for the deadline, an hour
        with pytest.raises(asyncio.CancelledError):
            await task


async def swallows_one_cancel(stopped: list[str]) -> None:
    with contextlib.suppress(asyncio.CancelledError):  # as a loop that logged and went on
        await asyncio.sleep(3600)
    try:
        await asyncio.sleep(3600)
    finally:
        stopped.append("swallower")


async def never_stops(until: asyncio.Event) -> None:
    """Swallows every cancel until the test lets it go (so that the test can end)."""
    while not until.is_set():
        try:
            await until.wait()
        except asyncio.CancelledError:
            continue


async def test_work_that_lost_a_cancel_is_cancelled_again(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    stopped: list[str] = []

    async def first() -> str:
        return "lease lost"

    with caplog.at_level(logging.ERROR):
        async with asyncio.timeout(5):
            why, crashed = await daemon._first_of(first(), swallows_one_cancel(stopped),
                                                  teardown=0.05)
    assert (why, crashed) == ("lease lost", False)
    assert stopped == ["swallower"]
    assert "the leadership's work did not stop within 0.05s of a cancel" in caplog.text


async def test_work_that_never_stops_is_left_and_the_leadership_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    async def first() -> str:
        return "lease lost"

    release = asyncio.Event()
    try:
        with caplog.at_level(logging.ERROR):
            async with asyncio.timeout(5):
                why, _ = await daemon._first_of(first(), never_stops(release), teardown=0.05)
        assert why == "lease lost"
        assert "left 1 of the leadership's work running" in caplog.text
        assert len(ABANDONED) == 1
    finally:
        release.set()
        for task in list(ABANDONED):  # this test's own
            await task
            ABANDONED.discard(task)


async def test_a_failed_child_of_all_of_is_its_error_and_no_cancel() -> None:
    """``all_of``: a child's BusError is raised as itself (not a group), its siblings are
    cancelled, and the caller is left with no cancel request (3.11's TaskGroup leaves one,
    which ``cancelled_meanwhile`` took for a real cancel); a real cancel still cancels."""
    ended: list[str] = []
    started = asyncio.Event()

    async def fails() -> None:
        await started.wait()  # the sibling runs: it is cancelled, not just never started
        raise BusError("NATS is away")

    async def waits() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            ended.append("sibling")

    with pytest.raises(BusError, match="NATS is away"):
        await all_of([fails(), waits()])
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0 and ended == ["sibling"]
    cancelled_meanwhile()  # raises nothing: no cancel stands
    started.clear()
    outer = asyncio.create_task(all_of([waits()]))
    await started.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer


async def test_children_of_all_of_that_fail_together_raise_deposed_before_a_bus_error() -> None:
    """Two writes fail in the same turn, the first with a bus error, the second refused by a
    later leader's fence: ``all_of`` raises Deposed (the leader must stop at once), not the
    BusError that came first (which dropped the rollout and left the deposition for later)."""
    go = asyncio.Event()

    async def bus_error() -> None:
        await go.wait()
        raise BusError("NATS is away")

    async def deposed() -> None:
        await go.wait()
        raise Deposed("another coordinator leads fleet 'default' now")

    async def release() -> None:  # started last: both writes already wait for it
        go.set()

    with pytest.raises(Deposed, match="another coordinator leads"):
        await all_of([bus_error(), deposed(), release()])
    go.clear()
    with pytest.raises(BusError, match="NATS is away"):  # alone, a bus error is itself
        await all_of([bus_error(), release()])


async def test_a_real_cancel_that_comes_with_a_failed_child_still_stands() -> None:
    """A child of ``all_of`` fails, and while the group winds down its caller is cancelled for
    real (here by the sibling being stopped): ``all_of`` withdraws only the TaskGroup's own
    cancel request, so the caller still sees the real one (``cancelled_meanwhile`` raises) and
    stops, rather than logging a BusError and going on."""
    seen: list[int] = []
    started = asyncio.Event()

    async def fails() -> None:
        await started.wait()
        raise BusError("NATS is away")

    async def cancels_the_caller_when_stopped() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # until the group stops it
        except asyncio.CancelledError:
            caller.cancel()
            raise

    async def caller_body() -> None:
        try:
            await all_of([fails(), cancels_the_caller_when_stopped()])
        except BusError:
            task = asyncio.current_task()
            assert task is not None
            seen.append(task.cancelling())
            cancelled_meanwhile()

    caller = asyncio.create_task(caller_body())
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert seen == [1]
