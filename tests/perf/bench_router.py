"""Router benchmark: the same keep-alive load direct to an upstream and through the router.

Usage: python tests/perf/bench_router.py [--json] [--duration 5] [--concurrency 1,16]

An asyncio HTTP/1.1 upstream runs in its own process; the router is started with ``start_router``
in front of it; a small asyncio keep-alive client with fixed concurrency drives each target for
``--duration`` seconds per concurrency level. Printed per level: requests/s, p50 and p99 latency
direct and proxied, and the ratios (throughput proxied/direct, added p50/p99 in ms). With 2 cores
the client, the upstream and the router share the CPU, so the figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.router import RouterClient, RouterConfig, Upstream, start_router

BODY = b'{"hello":"world"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class UpstreamProtocol(asyncio.Protocol):
    """A fast keep-alive HTTP/1.1 server: one canned response per request head (no bodies)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(RESPONSE * n)  # type: ignore[attr-defined]


async def serve_upstream() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


async def client(port: int, deadline: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n"
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(request)
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                i = head.find(b"Content-Length: ") + 16
                await reader.readexactly(int(head[i : head.find(b"\r\n", i)]))
            latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def drive(port: int, concurrency: int, duration: float) -> dict[str, float]:
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(*(client(port, deadline, latencies) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
    }


async def bench(duration: float, levels: list[int]) -> list[dict[str, object]]:
    upstream = subprocess.Popen(  # noqa: ASYNC220  # returns at once; nothing runs yet
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    tmp = Path(tempfile.mkdtemp(prefix="fwbench"))
    router_pid = None
    try:
        assert upstream.stdout is not None
        up_port = int(upstream.stdout.readline())
        sock = tmp / "r.sock"
        router_pid = await start_router(sock, tmp / "r.log")
        stats = await RouterClient(sock).configure(
            RouterConfig(
                service="bench", listen_host="127.0.0.1", listen_port=0,
                upstreams=[Upstream(slot="a", port=up_port, weight=1, healthy=True)],
            )
        )
        assert stats.port is not None
        await drive(stats.port, 4, 0.5)  # warm up both paths
        await drive(up_port, 4, 0.5)
        rows: list[dict[str, object]] = []
        for c in levels:
            direct = await drive(up_port, c, duration)
            proxied = await drive(stats.port, c, duration)
            rows.append(
                {
                    "concurrency": c,
                    "direct": direct,
                    "router": proxied,
                    "throughput_ratio": proxied["rps"] / direct["rps"],
                    "added_p50_ms": proxied["p50_ms"] - direct["p50_ms"],
                    "added_p99_ms": proxied["p99_ms"] - direct["p99_ms"],
                }
            )
        await RouterClient(sock).shutdown()
        return rows
    finally:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait(10)
        if upstream.stdout is not None:
            upstream.stdout.close()
        if router_pid is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(router_pid, 0)
                except ProcessLookupError:
                    break
                await asyncio.sleep(0.05)


def run(main: object) -> object:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run(serve_upstream())
        return
    levels = [int(x) for x in args.concurrency.split(",")]
    rows = run(bench(args.duration, levels))
    assert isinstance(rows, list)
    if not args.json:
        print(f"{'conc':>4} {'target':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for r in rows:
            for name in ("direct", "router"):
                f = r[name]
                print(f"{r['concurrency']:>4} {name:>7} {f['rps']:>9.0f} {f['p50_ms']:>8.3f} "
                      f"{f['p99_ms']:>8.3f}")
            print(f"{'':>4} {'ratio':>7} {r['throughput_ratio']:>9.2f} "
                  f"{r['added_p50_ms']:>+8.3f} {r['added_p99_ms']:>+8.3f}")
    print(json.dumps({"benchmark": "router", "duration_s": args.duration, "results": rows}))


if __name__ == "__main__":
    main()
