"""Router benchmark: the same keep-alive load direct to an upstream and through the router.

Usage: python tests/perf/bench_router.py [--json] [--duration 5] [--concurrency 1,4,16] [--no-wrk]
                                         [--relay]

An asyncio HTTP/1.1 upstream runs in its own process; the router is started with ``start_router``
in front of it; a small asyncio keep-alive client with fixed concurrency drives each target for
``--duration`` seconds per concurrency level. Printed per level: requests/s, p50 and p99 latency
direct and proxied, the ratios (throughput proxied/direct, added p50/p99 in ms), and the router's
CPU time per proxied request (user+system, from /proc). When ``wrk`` is installed the same levels
run again with wrk as the client (a native client: a second opinion that does not share the
Python client's overhead). The client, the upstream and the router share the machine's cores, so
the ratios measure the router's cost *in that company*; see the CPU column for its own cost.
With ``--relay`` a third target is measured: a byte relay with no HTTP logic at all (its own
process, same event loop), the floor any Python hop pays in syscalls and wake-ups.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
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


class RelayUp(asyncio.Protocol):
    """The upstream side of one relayed connection: bytes back to the client as they come."""

    def __init__(self, down: RelayDown) -> None:
        self.down = down

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.down.transport.is_closing():
            self.down.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.transport.close()


class RelayDown(asyncio.Protocol):
    """The floor: a byte relay with no HTTP at all, one upstream connection per client."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.up: RelayUp | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            _, self.up = await loop.create_connection(
                lambda: RelayUp(self), "127.0.0.1", self.port
            )
        for data in self.pending:
            self.up.transport.write(data)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.pending.append(data)
        else:
            self.up.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.transport.close()


async def serve_relay(up_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RelayDown(up_port), "127.0.0.1", 0, backlog=1024)
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


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def drive_wrk(port: int, concurrency: int, duration: float) -> dict[str, float]:
    """The same load with wrk (one thread, ``concurrency`` keep-alive connections)."""
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency",
        f"http://127.0.0.1:{port}/bench", stdout=subprocess.PIPE,
    )
    async with asyncio.timeout(duration + 30):
        out = (await proc.communicate())[0].decode()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"requests": total, "rps": rps, "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"])}


async def bench(
    duration: float, levels: list[int], use_wrk: bool, use_relay: bool
) -> list[dict[str, object]]:
    upstream = subprocess.Popen(  # noqa: ASYNC220  # returns at once; nothing runs yet
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    tmp = Path(tempfile.mkdtemp(prefix="fwbench"))
    router_pid = None
    relay: subprocess.Popen[str] | None = None
    try:
        assert upstream.stdout is not None
        up_port = int(upstream.stdout.readline())
        if use_relay:
            relay = subprocess.Popen(  # noqa: ASYNC220  # returns at once; nothing runs yet
                [sys.executable, __file__, "--serve-relay", str(up_port)],
                stdout=subprocess.PIPE, text=True,
            )
            assert relay.stdout is not None
            relay_port = int(relay.stdout.readline())
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
        clients = [("python", drive)] + ([("wrk", drive_wrk)] if use_wrk else [])
        for client_name, run_load in clients:
            for c in levels:
                direct = await run_load(up_port, c, duration)
                cpu0 = cpu_seconds(router_pid)
                proxied = await run_load(stats.port, c, duration)
                cpu = cpu_seconds(router_pid) - cpu0
                proxied["router_cpu_us_per_req"] = cpu * 1e6 / max(1.0, proxied["requests"])
                floor: dict[str, object] = {}
                if relay is not None:
                    cpu0 = cpu_seconds(relay.pid)
                    relayed = await run_load(relay_port, c, duration)
                    cpu = cpu_seconds(relay.pid) - cpu0
                    relayed["router_cpu_us_per_req"] = cpu * 1e6 / max(1.0, relayed["requests"])
                    floor = {"relay": relayed, "relay_ratio": relayed["rps"] / direct["rps"]}
                rows.append(
                    {
                        **floor,
                        "client": client_name,
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
        if relay is not None:
            relay.send_signal(signal.SIGTERM)
            relay.wait(10)
            if relay.stdout is not None:
                relay.stdout.close()
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
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk runs")
    parser.add_argument(
        "--relay", action="store_true",
        help="also measure a byte relay with no HTTP logic (the floor for any Python hop)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-relay", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run(serve_upstream())
        return
    if args.serve_relay:
        run(serve_relay(args.serve_relay))
        return
    levels = [int(x) for x in args.concurrency.split(",")]
    use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    rows = run(bench(args.duration, levels, use_wrk, args.relay))
    assert isinstance(rows, list)
    if not args.json:
        print(f"{'client':>6} {'conc':>4} {'target':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'hop cpu/req':>14}")
        for r in rows:
            for name in ("direct", "router", "relay"):
                if name not in r:
                    continue
                f = r[name]
                cpu = f.get("router_cpu_us_per_req")
                print(f"{r['client']:>6} {r['concurrency']:>4} {name:>7} {f['rps']:>9.0f} "
                      f"{f['p50_ms']:>8.3f} {f['p99_ms']:>8.3f} "
                      f"{'' if cpu is None else f'{cpu:.1f} us':>14}")
            print(f"{'':>6} {'':>4} {'ratio':>7} {r['throughput_ratio']:>9.2f} "
                  f"{r['added_p50_ms']:>+8.3f} {r['added_p99_ms']:>+8.3f}"
                  + (f"   (relay {r['relay_ratio']:.2f})" if "relay" in r else ""))
    print(json.dumps({"benchmark": "router", "duration_s": args.duration, "results": rows}))


if __name__ == "__main__":
    main()
