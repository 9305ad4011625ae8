"""The mirror's workers against a real shadow on loopback: nothing a response holds, and nothing
``compare`` raises, stops mirroring; what a copy carries and what a sample keeps are bounded."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest

from agent.router import mirror as mirror_mod
from agent.router.mirror import WORKERS, Answer, Mirror, MirrorJob
from agent.router.stats import MirrorCounters
from agent.router.upstream import Pool
from tests.integration.mirror_upstream import RecordingUpstream

DEPTH = 100_000  # far past Python's recursion limit, yet well under the capture limit
DEEP_LIVE = b"[" * DEPTH + b"1" + b"]" * DEPTH
DEEP_SHADOW = b"[" * DEPTH + b"2" + b"]" * DEPTH
OK = b'{"ok": true}'


def answer(body: bytes, status: int = 200) -> Answer:
    return Answer(status=status, headers=[(b"Content-Type", b"application/json")],
                  digest=hashlib.sha256(body).hexdigest(), body=body, truncated=False,
                  latency_ms=1.0)


def job(port: int, target: str, live: bytes, headers: bytes = b"") -> MirrorJob:
    head = b"GET %s HTTP/1.1\r\nHost: svc\r\n%s\r\n" % (target.encode(), headers)
    return MirrorJob(host="127.0.0.1", port=port, method="GET", target=target, head=head,
                     body=b"", live=answer(live), ignore_headers=frozenset(),
                     ignore_json_fields=())


def shadow_reply(path: str) -> bytes:
    if path.startswith("/deep"):
        return DEEP_SHADOW
    if path.startswith("/account"):
        return b'{"user": "bob@example.com", "token": "shadow-s3cr3t"}'
    return OK


@pytest.fixture
async def shadow() -> AsyncIterator[RecordingUpstream]:
    up = await RecordingUpstream(shadow_reply).start()
    try:
        yield up
    finally:
        await up.close()


@pytest.fixture
async def mirror() -> AsyncIterator[Mirror]:
    pools: dict[tuple[str, int], Pool] = {}

    def pool_for(host: str, port: int) -> Pool:
        return pools.setdefault((host, port), Pool(host, port))

    m = Mirror(MirrorCounters(), pool_for)
    m.start()
    try:
        yield m
    finally:
        await m.close()
        for pool in pools.values():
            pool.close()


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_deeply_nested_json_does_not_stop_mirroring(
    shadow: RecordingUpstream, mirror: Mirror
) -> None:
    """Twice as many deeply nested JSON answers as there are workers are each counted as a
    mismatch (compared by digest), and the copies after them are still compared."""
    deep = 2 * WORKERS
    for i in range(deep):
        mirror.offer(job(shadow.port, f"/deep/{i}", DEEP_LIVE))
    for i in range(3):
        mirror.offer(job(shadow.port, f"/ok/{i}", OK))
    c = mirror.counters
    await until(lambda: c.compared == deep + 3)
    assert (c.mismatched, c.shadow_errors) == (deep, 0)
    assert all("body digest" in s.what and "deeper than" in s.what for s in c.samples)
    assert all(not t.done() for t in mirror._tasks)


async def test_whatever_compare_raises_is_a_mismatch_logged_once(
    shadow: RecordingUpstream, mirror: Mirror, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in compare costs a mismatch with the reason, one log line, and no worker."""

    def broken(*args: object, **kwargs: object) -> str | None:
        raise ValueError("a bug in compare")

    monkeypatch.setattr(mirror_mod, "compare", broken)
    for i in range(2 * WORKERS):
        mirror.offer(job(shadow.port, f"/ok/{i}", OK))
    c = mirror.counters
    await until(lambda: c.compared == 2 * WORKERS)
    assert c.mismatched == 2 * WORKERS
    assert {s.what for s in c.samples} == {"not compared: ValueError"}
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1 and "comparing" in failures[0].getMessage()
    assert all(not t.done() for t in mirror._tasks)


async def test_samples_keep_no_query_values_and_no_body_bytes(
    shadow: RecordingUpstream, mirror: Mirror
) -> None:
    """A mismatch sample names the path and the query's keys, never their values, and
    describes each answer by status, size and digest, never by its bytes."""
    live = b'{"user": "alice@example.com", "token": "live-s3cr3t"}'
    mirror.offer(job(shadow.port, "/account?email=alice%40example.com&token=q-s3cr3t&x", live))
    c = mirror.counters
    await until(lambda: c.compared == 1)
    (sample,) = c.samples
    assert sample.path == "/account?email=REDACTED&token=REDACTED&x"
    assert sample.what == "json field $.token"
    wire = msgspec.json.encode(sample)
    for secret in (b"alice", b"bob", b"s3cr3t", b"example"):
        assert secret not in wire, wire
    digest = hashlib.sha256(live).hexdigest()
    assert sample.live == f"200, {len(live)} bytes, sha256:{digest[:16]}"


async def test_the_shadow_gets_no_credentials_unless_kept(
    shadow: RecordingUpstream, mirror: Mirror
) -> None:
    """Cookie and Authorization (any case) never reach the shadow; a kept one does; the rest
    of the head arrives as it was."""
    creds = b"cookie: sid=1\r\nAuthorization: Bearer t\r\nX-Foo: 1\r\nCOOKIE: b=2\r\n"
    mirror.offer(job(shadow.port, "/ok/1", OK, creds))
    await shadow.wait_for(1)
    assert shadow.heads[0] == b"GET /ok/1 HTTP/1.1\r\nHost: svc\r\nX-Foo: 1\r\n\r\n"
    kept = job(shadow.port, "/ok/2", OK, creds)
    kept.keep_headers = frozenset({b"cookie"})
    mirror.offer(kept)
    await shadow.wait_for(2)
    assert shadow.heads[1] == (
        b"GET /ok/2 HTTP/1.1\r\nHost: svc\r\ncookie: sid=1\r\nX-Foo: 1\r\nCOOKIE: b=2\r\n\r\n"
    )
