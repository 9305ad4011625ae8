"""Shadow traffic: send copies of live requests to the mirror slot and compare the answers.

The proxy serves the user from a live slot first, then ``offer``s a ``MirrorJob`` (the request as
sent upstream, and what the live slot answered). Jobs go through a bounded queue to a fixed number
of workers, so a slow or dead shadow costs the user nothing: when the queue is full the copy is
dropped and counted. A worker replays the request on the shadow under a timeout, and ``compare``
(pure) says what differs: status class, body (sha256, or JSON after removing ignored dotted
fields), headers (minus hop-by-hop, Date, framing and ignored ones). Latency is recorded, not
compared. The shadow's answer goes nowhere else.

What leaves the live exchange is bounded, because the shadow is a release under test and the
samples end up in observed states, rollout records and ``fleetwave status``:

- the copy loses the user's credentials (``CREDENTIAL_HEADERS``) unless the mirror keeps them
  (``MirrorSpec.keep_headers``, ``--mirror-keep-header``): the shadow must not act as the user;
- a mismatch sample names the path and the query's keys, never their values, and describes each
  answer by status, size and digest, never by its bytes;
- JSON is compared structurally only down to ``MAX_JSON_DEPTH`` levels (deeper: by digest), so no
  response can exhaust the stack; and a worker survives whatever ``compare`` raises (the pair
  counts as a mismatch with the reason: a pair nobody could judge must not pass a gate).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.router.errors import Broken, HttpError
from agent.router.http11 import HOP_BY_HOP, MAX_HEAD, parse_response
from agent.router.stats import MirrorCounters
from agent.router.upstream import BodyReader, Capture, Pool, close_conn
from protocol.messages import MismatchSample

log = logging.getLogger(__name__)

MIRROR_BODY_LIMIT = 256 * 1024  # requests with larger bodies are not mirrored
CAPTURE_LIMIT = 1024 * 1024  # bytes of a response kept for the JSON comparison
QUEUE_SIZE = 64
WORKERS = 4
SHADOW_TIMEOUT = 5.0
MAX_JSON_DEPTH = 64  # JSON nested deeper is compared by digest (bounded recursion)
MAX_SAMPLE_TEXT = 200  # characters of a sample's path or difference
REDACTED = "REDACTED"
# The user's credentials: the shadow does not get them unless the mirror keeps them.
# (Proxy-Authorization is hop-by-hop and so never reaches any upstream: listed for the record.)
CREDENTIAL_HEADERS = frozenset({b"cookie", b"authorization", b"proxy-authorization"})
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
    keep_headers: frozenset[bytes] = frozenset()  # credential headers the shadow gets all the same


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


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels (iterative: nothing to overflow)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _json(body: bytes) -> tuple[str, Any]:
    """("json", value), ("text", None), or ("deep", None) when nested beyond MAX_JSON_DEPTH."""
    if body.lstrip()[:1] not in (b"{", b"["):
        return "text", None
    try:
        value = json.loads(body)
    except RecursionError:  # the decoder's own guard: nested deeper than the stack allows
        return "deep", None
    except ValueError:
        return "text", None
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:  # (the usual, small case)
        return "json", value
    return ("deep", None) if _deeper_than(value, MAX_JSON_DEPTH) else ("json", value)


def _body_difference(live: Answer, shadow: Answer, ignore_json_fields: Sequence[str]) -> str:
    """Why two bodies whose digests differ differ; "" if only ignored JSON fields do."""
    if live.truncated or shadow.truncated:
        return "body digest"
    kind_live, value_live = _json(live.body)
    kind_shadow, value_shadow = _json(shadow.body)
    if "deep" in (kind_live, kind_shadow):
        return f"body digest (JSON deeper than {MAX_JSON_DEPTH} levels)"
    if kind_live != "json" or kind_shadow != "json":
        return "body digest"
    a = strip_json_fields(value_live, ignore_json_fields)
    b = strip_json_fields(value_shadow, ignore_json_fields)
    where = first_difference(a, b)
    return "" if where is None else f"json field {where}"


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
        what = _body_difference(live, shadow, ignore_json_fields)
        if what:
            diffs.append(what)
    lh = _comparable_headers(live.headers, ignore_headers)
    sh = _comparable_headers(shadow.headers, ignore_headers)
    if lh != sh:
        for name in sorted(set(lh) | set(sh)):
            if lh.get(name) != sh.get(name):
                diffs.append(f"header {name.decode('latin-1')}")
    return "; ".join(diffs) if diffs else None


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_SAMPLE_TEXT else text[:MAX_SAMPLE_TEXT] + "..."


def redact_target(target: str) -> str:
    """A request target fit for a stored sample: the path, and the query's keys with their
    values replaced (they carry tokens, e-mail addresses, search terms); no userinfo."""
    path, sep, query = target.partition("?")
    path = path.partition("#")[0]
    if "://" in path:  # absolute-form: keep the scheme, host and path
        scheme, _, rest = path.partition("://")
        authority, slash, tail = rest.partition("/")
        path = f"{scheme}://{authority.rpartition('@')[2]}{slash}{tail}"
    if sep:
        pairs = (p.partition("=") for p in query.partition("#")[0].split("&"))
        path += "?" + "&".join(key + (f"={REDACTED}" if eq else "") for key, eq, _ in pairs)
    return _bounded(path)


def summary(answer: Answer) -> str:
    """An answer in a mismatch sample: status, size and digest, never the body's bytes."""
    size = f"{len(answer.body)}{'+' if answer.truncated else ''}"
    return f"{answer.status}, {size} bytes, sha256:{answer.digest[:16]}"


def mismatch_sample(job: MirrorJob, shadow: Answer, what: str) -> MismatchSample:
    return MismatchSample(
        method=job.method,
        path=redact_target(job.target),
        what=_bounded(what),
        live=summary(job.live),
        shadow=summary(shadow),
    )


def shadow_head(head: bytes, keep: frozenset[bytes]) -> bytes:
    """The live request head without the credential headers not in ``keep`` (lower-case)."""
    drop = CREDENTIAL_HEADERS - keep
    lines = head.split(b"\r\n")
    # The names were checked as tokens when the request was parsed: the part before ":" is one.
    kept = [line for line in lines[1:] if line.partition(b":")[0].lower() not in drop]
    if len(kept) == len(lines) - 1:
        return head
    return b"\r\n".join([lines[0], *kept])


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
        self._compare_failed = False

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
                log.exception("mirror worker failed on %s %s", job.method,
                              redact_target(job.target))
                self.counters.shadow_errors += 1
                continue
            sample = self._judge(job, shadow)
            self.counters.compared_pair(job.live.latency_ms, shadow.latency_ms, sample)

    def _judge(self, job: MirrorJob, shadow: Answer) -> MismatchSample | None:
        """The mismatch sample of a compared pair, None if they agree. Whatever ``compare``
        raises is a mismatch with the reason, logged the first time only (a response that
        trips it may come with every request)."""
        try:
            what = compare(
                job.live,
                shadow,
                ignore_headers=job.ignore_headers,
                ignore_json_fields=job.ignore_json_fields,
            )
        except Exception as exc:
            if not self._compare_failed:
                self._compare_failed = True
                log.exception("mirror: comparing the answers to %s %s failed; such pairs count "
                              "as mismatches (logged once)", job.method, redact_target(job.target))
            what = f"not compared: {exc.__class__.__name__}"
        return None if what is None else mismatch_sample(job, shadow, what)

    async def _replay(self, job: MirrorJob) -> Answer:
        pool = self._pool_for(job.host, job.port)
        started = time.perf_counter()
        conn = pool.take_idle() or await pool.connect(self._timeout)
        reusable = False
        try:
            async with asyncio.timeout(self._timeout):
                conn.write(shadow_head(job.head, job.keep_headers) + job.body)
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
