"""A small load generator: steady HTTP/1.1 traffic to the nodes' routers, every answer checked.

Used by the demo and by end-to-end tests to prove "zero failed requests": workers send ``GET /``
in a loop to a list of targets, half of them on keep-alive connections and half opening a fresh
connection per request (the two ways a switch can drop a request), and record for every response
its status, latency and the version it names (the example service answers JSON with ``version``).
A failed request is a connection error, a timeout, or a 5xx; each is kept with its reason.

Theory: one asyncio task per worker, owned by ``Traffic``; ``stop()`` cancels and awaits them.
Requests are paced (``rate`` per worker per second) so that the load is steady, not a flood that
measures the laptop. How a connection is opened is a parameter (``connect``, by default
``asyncio.open_connection``), so that a test bed can send the load from another network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from protocol.loop import bounded

REQUEST_TIMEOUT = 5.0

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connector = Callable[[str, int], Awaitable[Connection]]
"""Opens a TCP connection to (host, port); ``asyncio.open_connection`` by default."""


@dataclass
class TrafficReport:
    requests: int = 0
    failed: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first few reasons
    latencies: list[float] = field(default_factory=list)

    def p(self, q: float) -> float:
        """Latency quantile in milliseconds (0 when nothing was measured)."""
        if not self.latencies:
            return 0.0
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests, "failed": self.failed,
            "versions": dict(self.versions),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "p50_ms": round(self.p(0.5), 2), "p99_ms": round(self.p(0.99), 2),
            "failures": self.failures[:5],
        }


class Traffic:
    """Steady GET traffic to ``targets`` (host, port) until ``stop()``."""

    def __init__(
        self, targets: list[tuple[str, int]], *, workers_per_target: int = 2, rate: float = 50.0,
        path: str = "/", connect: Connector | None = None,
    ) -> None:
        self.targets = targets
        self.connect: Connector = connect or asyncio.open_connection
        self.workers_per_target = workers_per_target
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.path = path
        self.report = TrafficReport()
        self._tasks: list[asyncio.Task[None]] = []
        # Checked by every worker too: on Python 3.11 asyncio.wait_for can swallow a cancel that
        # arrives as its request completes, and the worker would then run (and stop() wait) forever.
        self._stopped = False

    def start(self) -> None:
        self._stopped = False
        for host, port in self.targets:
            for i in range(self.workers_per_target):
                keep_alive = i % 2 == 0
                self._tasks.append(asyncio.create_task(self._worker(host, port, keep_alive)))

    async def stop(self) -> TrafficReport:
        self._stopped = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        return self.report

    def snapshot(self) -> TrafficReport:
        """Counters so far (a copy, so the caller can diff two snapshots)."""
        r = self.report
        return TrafficReport(
            r.requests, r.failed, Counter(r.versions), Counter(r.statuses), list(r.failures), [],
        )

    async def _worker(self, host: str, port: int, keep_alive: bool) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while not self._stopped:
                started = time.monotonic()
                if conn is None:
                    try:
                        conn = await bounded(
                            self.connect(host, port), REQUEST_TIMEOUT
                        )
                    except (OSError, TimeoutError) as exc:
                        self._fail(f"{host}:{port} connect: {type(exc).__name__}: {exc}")
                        await asyncio.sleep(max(self.interval, 0.05))
                        continue
                try:
                    status, body, closes = await bounded(
                        _get(conn, host, self.path, keep_alive), REQUEST_TIMEOUT
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    self._fail(f"{host}:{port} request: {type(exc).__name__}: {exc}")
                    _close(conn)
                    conn = None
                    continue
                self._record(started, status, body, host, port)
                if closes or not keep_alive:
                    _close(conn)
                    conn = None
                pause = self.interval - (time.monotonic() - started)
                if pause > 0:
                    await asyncio.sleep(pause)
        finally:
            if conn is not None:
                _close(conn)

    def _record(self, started: float, status: int, body: bytes, host: str, port: int) -> None:
        r = self.report
        r.requests += 1
        r.statuses[status] += 1
        r.latencies.append(time.monotonic() - started)
        if status >= 500:
            self._fail(f"{host}:{port} answered {status}: {body[:80]!r}", counted=True)
            return
        with contextlib.suppress(ValueError, AttributeError):
            r.versions[str(json.loads(body).get("version", "?"))] += 1

    def _fail(self, reason: str, *, counted: bool = False) -> None:
        r = self.report
        if not counted:
            r.requests += 1
        r.failed += 1
        if len(r.failures) < 20:
            r.failures.append(reason)


async def probe_version(
    host: str, port: int, path: str = "/", connect: Connector | None = None
) -> str:
    """One GET on a fresh connection: the version named in the answer, or why there is none."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            conn = await (connect or asyncio.open_connection)(host, port)
            try:
                status, body, _ = await _get(conn, host, path, keep_alive=False)
            finally:
                _close(conn)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        return f"<{type(exc).__name__}>"
    if status >= 500:
        return f"<{status}>"
    try:
        return str(json.loads(body).get("version", "?"))
    except (ValueError, AttributeError):
        return "<not json>"


async def _get(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str, path: str, keep_alive: bool
) -> tuple[int, bytes, bool]:
    reader, writer = conn
    connection = "keep-alive" if keep_alive else "close"
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    closes = headers.get("connection", "").lower() == "close"
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _chunked(reader)
    else:
        body = await reader.read()
        closes = True
    return status, body, closes


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    with contextlib.suppress(Exception):
        conn[1].close()
