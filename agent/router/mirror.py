"""Shadow traffic: send copies of live requests to the mirror slot and compare the answers.

The proxy serves the user from a live slot first, then ``offer``s a ``MirrorJob`` (the request as
sent upstream, and what the live slot answered). Jobs go through a bounded queue to a fixed number
of workers, so a slow or dead shadow costs the user nothing: when the queue is full the copy is
dropped and counted. A worker replays the request on the shadow under a timeout, and ``compare``
(pure) says what differs: status class, body (sha256, or JSON after removing ignored dotted
fields), headers (minus hop-by-hop, Date, framing and ignored ones). Latency is recorded, not
compared. The shadow's answer goes nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.router.http11 import HOP_BY_HOP, MAX_HEAD, HttpError, parse_response
from agent.router.stats import MirrorCounters
from agent.router.upstream import BodyReader, Broken, Capture, Pool, close_conn
from protocol.messages import MismatchSample

log = logging.getLogger(__name__)

MIRROR_BODY_LIMIT = 256 * 1024  # requests with larger bodies are not mirrored
CAPTURE_LIMIT = 1024 * 1024  # bytes of a response kept for the JSON comparison
QUEUE_SIZE = 64
WORKERS = 4
SHADOW_TIMEOUT = 5.0
EXCERPT = 120
# Headers that differ between two healthy replicas for reasons unrelated to the release.
UNCOMPARED_HEADERS = HOP_BY_HOP | {b"date", b"content-length", b"transfer-encoding"}


@dataclass(slots=True)
class Answer:
    """One side of a comparison: what a slot answered."""

    status: int
    headers: list[tuple[bytes, bytes]]
    digest: str
    body: bytes
    truncated: bool
    latency_ms: float


@dataclass(slots=True)
class MirrorJob:
    """A live exchange to replay on the shadow."""

    host: str
    port: int
    method: str
    target: str
    head: bytes  # the request head exactly as sent to the live slot
    body: bytes  # the raw request body (framing included)
    live: Answer
    ignore_headers: frozenset[bytes]
    ignore_json_fields: tuple[str, ...]


# -- pure comparison -------------------------------------------------------------------------------


def strip_json_fields(value: Any, paths: Sequence[str]) -> Any:
    """A copy of ``value`` without the dotted ``paths``; a list applies the rest to each element."""
    for path in paths:
        value = _strip(value, path.removeprefix("$.").split("."))
    return value


def _strip(value: Any, parts: list[str]) -> Any:
    if not parts:
        return value
    if isinstance(value, list):
        return [_strip(v, parts) for v in value]
    if not isinstance(value, dict):
        return value
    head, rest = parts[0], parts[1:]
    if not rest:
        return {k: v for k, v in value.items() if k != head}
    return {k: (_strip(v, rest) if k == head else v) for k, v in value.items()}


def first_difference(a: Any, b: Any, path: str = "$") -> str | None:
    """The dotted path of the first place two JSON values differ, or None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}"
            found = first_difference(a[key], b[key], f"{path}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if type(a) is not type(b) or a != b:
        return path
    return None


def _json(body: bytes) -> tuple[bool, Any]:
    stripped = body.lstrip()
    if stripped[:1] not in (b"{", b"["):
        return False, None
    try:
        return True, json.loads(body)
    except ValueError:
        return False, None


def _comparable_headers(
    headers: list[tuple[bytes, bytes]], ignore: frozenset[bytes]
) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in UNCOMPARED_HEADERS or lower in ignore:
            continue
        out.setdefault(lower, []).append(value)
    return {k: sorted(v) for k, v in out.items()}


def compare(
    live: Answer,
    shadow: Answer,
    *,
    ignore_headers: frozenset[bytes] = frozenset(),
    ignore_json_fields: Sequence[str] = (),
) -> str | None:
    """What differs between the live and the shadow answer ("; "-joined), or None if they agree.

    ``ignore_headers`` are lower-case names.
    """
    diffs: list[str] = []
    if live.status // 100 != shadow.status // 100:
        diffs.append(f"status {live.status} vs {shadow.status}")
    if live.digest != shadow.digest:
        what = "body digest"
        if not live.truncated and not shadow.truncated:
            ok_live, value_live = _json(live.body)
            ok_shadow, value_shadow = _json(shadow.body)
            if ok_live and ok_shadow:
                a = strip_json_fields(value_live, ignore_json_fields)
                b = strip_json_fields(value_shadow, ignore_json_fields)
                where = first_difference(a, b)
                what = "" if where is None else f"json field {where}"
        if what:
            diffs.append(what)
    lh = _comparable_headers(live.headers, ignore_headers)
    sh = _comparable_headers(shadow.headers, ignore_headers)
    if lh != sh:
        for name in sorted(set(lh) | set(sh)):
            if lh.get(name) != sh.get(name):
                diffs.append(f"header {name.decode('latin-1')}")
    return "; ".join(diffs) if diffs else None


def excerpt(answer: Answer) -> str:
    """A short human-readable view of an answer for a mismatch sample."""
    text = answer.body[:EXCERPT].decode("utf-8", "replace")
    return f"{answer.status} {text}".rstrip()


# -- the shadow workers ----------------------------------------------------------------------------


class Mirror:
    """Bounded queue and workers replaying jobs on the shadow; owns its tasks (start/close)."""

    def __init__(
        self,
        counters: MirrorCounters,
        pool_for: Callable[[str, int], Pool],
        *,
        workers: int = WORKERS,
        queue_size: int = QUEUE_SIZE,
        timeout: float = SHADOW_TIMEOUT,
    ) -> None:
        self.counters = counters
        self._pool_for = pool_for
        self._queue: asyncio.Queue[MirrorJob] = asyncio.Queue(queue_size)
        self._workers = workers
        self._timeout = timeout
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for i in range(self._workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"mirror-{i}"))

    async def close(self) -> None:
        """Cancel the workers and wait for them (pending copies are abandoned)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def offer(self, job: MirrorJob) -> None:
        """Queue a copy, or drop and count it if the shadow has fallen behind."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counters.dropped += 1
        else:
            self.counters.mirrored += 1

    def discard_stale(self, target: tuple[str, int] | None) -> int:
        """Drop the queued copies bound for anything but ``target`` (host, port), counted as
        dropped; how many. Called when the routing changes: copies for a shadow that is gone or
        replaced (a hanging one leaves a full queue, each copy worth a timeout) must not delay
        the next shadow's. A copy a worker already holds finishes within the timeout."""
        keep: list[MirrorJob] = []
        stale = 0
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if (job.host, job.port) == target:
                keep.append(job)
            else:
                stale += 1
        for job in keep:
            self._queue.put_nowait(job)  # fewer than were taken out: never full
        self.counters.dropped += stale
        return stale

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                shadow = await self._replay(job)
            except (OSError, TimeoutError, Broken, HttpError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError):
                self.counters.shadow_errors += 1
                continue
            except Exception:  # a bug here must not kill the worker; say so once per event
                log.exception("mirror worker failed on %s %s", job.method, job.target)
                self.counters.shadow_errors += 1
                continue
            what = compare(
                job.live,
                shadow,
                ignore_headers=job.ignore_headers,
                ignore_json_fields=job.ignore_json_fields,
            )
            sample = None
            if what is not None:
                sample = MismatchSample(
                    method=job.method,
                    path=job.target,
                    what=what,
                    live=excerpt(job.live),
                    shadow=excerpt(shadow),
                )
            self.counters.compared_pair(job.live.latency_ms, shadow.latency_ms, sample)

    async def _replay(self, job: MirrorJob) -> Answer:
        pool = self._pool_for(job.host, job.port)
        started = time.perf_counter()
        conn = pool.take_idle() or await pool.connect(self._timeout)
        reusable = False
        try:
            async with asyncio.timeout(self._timeout):
                conn.write(job.head + job.body)
                head = await conn.readuntil(b"\r\n\r\n", MAX_HEAD)
                resp = parse_response(head, job.method)
                while 100 <= resp.status < 200:
                    head = await conn.readuntil(b"\r\n\r\n", MAX_HEAD)
                    resp = parse_response(head, job.method)
                capture = Capture(CAPTURE_LIMIT)
                body = BodyReader(conn, resp.body, resp.content_length, self._timeout, capture)
                while await body.read():
                    pass
            reusable = resp.keep_alive
        finally:
            if reusable:
                pool.give_back(conn)
            else:
                close_conn(conn)
        return Answer(
            status=resp.status,
            headers=resp.headers,
            digest=capture.digest,
            body=capture.body,
            truncated=capture.truncated,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )
