"""Bounding and retrying bus calls: how long the runtime waits for NATS, and what it retries.

``bounded`` gives one call at most ``OP_TIMEOUT`` (a timeout becomes a BusError, like any other
failure of the bus). ``Retrying`` runs an operation until it succeeds: a BusError is retried with
backoff (0.1 s doubling to 2 s) until its deadline, then raised; a Conflict is an answer (someone
else wrote), never retried.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from coordinator.runtime.ports import RunnerBus
from protocol.bus import Behind, CatchUp, Entry
from protocol.errors import BusError, Conflict, ProtocolError

OP_TIMEOUT = 12.0  # one bus call; the Bus has its own 10 s timeouts inside
TEARDOWN = 10.0  # seconds cancelled tasks have to stop, a round (``stop_all``)
STOP_ROUNDS = 3
COMMAND_DEADLINE = 20.0  # how long one command is retried before the driver is rebuilt from KV

T = TypeVar("T")

log = logging.getLogger("fleetwave.coordinator.runner")


ABANDONED: set[asyncio.Future[Any]] = set()  # tasks that would not stop (``stop_all``)


async def stop_all(tasks: Sequence[asyncio.Future[Any]], teardown: float = TEARDOWN, *,
                   what: str = "tasks") -> None:
    """Cancel ``tasks`` and wait for them, ``teardown`` seconds a round: what has not stopped
    by then is cancelled again, with a line naming where each task being cancelled waits.
    Python 3.11 can lose a cancel (``asyncio.wait_for`` returning a result that came as the
    cancel landed; see ``cancelled_meanwhile`` for two more), and a TaskGroup cancels its
    tasks once only: a runner's observed feed lost its cancel so, and the coordinator of
    50,000 nodes waited for ever, leading no one. After ``STOP_ROUNDS`` rounds what is left
    runs on (kept in ``ABANDONED``, logged), so that its owner goes on."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(STOP_ROUNDS):
        if not pending:
            return
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=teardown)
        if pending:
            log.error("%s did not stop within %gs of a cancel: %s", what, teardown,
                      "; ".join(_where(t) for t in asyncio.all_tasks() if t.cancelling()))
    if pending:
        log.error("left %d of %s running; going on without them", len(pending), what)
        ABANDONED.update(pending)


def _where(task: asyncio.Task[Any]) -> str:
    """``task``'s name and the line it waits at."""
    frames = task.get_stack(limit=1)
    at = (f"{frames[-1].f_code.co_filename.rsplit('/', 1)[-1]}:{frames[-1].f_lineno}"
          if frames else "?")
    return f"{task.get_name()} at {at}"


def cancelled_meanwhile() -> None:
    """Raise CancelledError if this task is being cancelled, though what it awaited ended in
    an error instead: the loops that log and go on after a failure call it first, so a cancel
    a callee turned into an error still ends them. Python 3.11 does that in two places: a
    cancel that lands as an ``asyncio.timeout`` expires becomes TimeoutError (``bounded``:
    BusError), and a TaskGroup with a failed child raises its errors, not the cancel. A
    coordinator of 50,000 nodes lost its lease so, and its runner's observed feed, told to
    stop, logged a BusError and waited on: the daemon waited for it, leading no one."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Deposed(Conflict):
    """Another coordinator leads now: this one's writes are refused; it must stop leading.
    (Here, below ``coordinator.runtime.lease``, which names it, so that ``all_of`` knows it.)"""


async def all_of(work: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run ``work`` concurrently (a TaskGroup) until all ended; a failure raises its first
    cause (a BusError, Deposed), never an exception group, and leaves no cancel request of the
    TaskGroup's own standing on this task. Python 3.11's TaskGroup cancels its parent when a
    child fails while it waits for the others, and does not withdraw that request (3.12
    does): ``cancelled_meanwhile`` then took a failed write for a cancel, and a resync's or the
    observed feed's failure ended the task instead of being logged. Only that one request is
    withdrawn: a real cancel that came meanwhile still stands. Children that failed together
    raise a Deposed among them before any other cause: a leader told that another leads must
    stop at once, not drop the rollout for a bus error and learn it again at the next resync."""
    task = asyncio.current_task()
    tg = asyncio.TaskGroup()
    try:
        async with tg:
            for coro in work:
                tg.create_task(coro)  # nothing awaited here: children fail in __aexit__'s wait
    except BaseExceptionGroup as group:
        if (sys.version_info < (3, 12) and task is not None and task.cancelling()
                and getattr(tg, "_parent_cancel_requested", False)):
            task.uncancel()
        causes = _leaves(group)
        raise next((e for e in causes if isinstance(e, Deposed)), causes[0]) from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of ``group`` and of the groups in it, in order."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def bounded(work: Awaitable[T]) -> T:
    """Await ``work`` for at most OP_TIMEOUT; a timeout is a BusError."""
    try:
        async with asyncio.timeout(OP_TIMEOUT):
            return await work
    except TimeoutError:
        raise BusError(f"NATS did not answer within {OP_TIMEOUT:g}s") from None


async def scanned(bus: RunnerBus, bucket: str, pattern: str) -> list[Entry]:
    """Every live entry of ``bucket`` matching ``pattern`` (``Bus.kv_scan``: paged, for buckets
    too big for one watch), each page bounded: the whole scan takes as long as the bucket needs.
    Read again from the start while the server that read it was behind (``Behind``)."""
    catch_up = CatchUp()
    while True:
        try:
            return await _scanned_once(bus, bucket, pattern)
        except Behind as exc:
            await catch_up.again(exc)


async def _scanned_once(bus: RunnerBus, bucket: str, pattern: str) -> list[Entry]:
    out: list[Entry] = []
    pages = bus.kv_scan(bucket, pattern)
    try:
        while True:
            try:
                out += await bounded(anext(pages))
            except StopAsyncIteration:
                return out
    finally:
        close = getattr(pages, "aclose", None)  # its consumer goes with it
        if close is not None:
            await close()


async def readable_before(bus: RunnerBus, bucket: str, entry: Entry,
                          parse: Callable[[bytes], T]) -> tuple[T | None, int]:
    """The newest value ``bucket`` still keeps of ``entry``'s key before ``entry`` that
    ``parse`` reads (a ProtocolError: it does not): (it, its revision); (None, 0) when the key
    was deleted before it; (None, -1) when no revision kept before it reads. For a key holding
    what no coordinator writes (``lease.Fenced._refence``)."""
    for kept in reversed(await bounded(bus.kv_history(bucket, entry.key))):
        if kept.revision >= entry.revision:
            continue
        if kept.value is None:
            return None, 0
        try:
            return parse(kept.value), kept.revision
        except ProtocolError:
            continue
    return None, -1


class Retrying:
    """Runs an operation until it succeeds, retrying BusError until ``deadline`` seconds."""

    def __init__(self, deadline: float = COMMAND_DEADLINE) -> None:
        self.deadline = deadline

    async def __call__(self, op: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline
        delay = 0.1
        while True:
            try:
                return await op()
            except Conflict:
                raise
            except BusError as exc:
                cancelled_meanwhile()
                if loop.time() + delay > deadline:
                    raise
                log.warning("retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
