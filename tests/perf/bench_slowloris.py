"""Slowloris benchmark: trickling clients against the router, and what an ordinary client sees.

Usage: python tests/perf/bench_slowloris.py [--attackers 1500] [--attack 20] [--duration 3]
           [--max-connections 1000] [--body-timeout 5] [--fill-kb 16] [--pace 1]
           [--host 127.0.22.1] [--json]

Everything runs on one loopback address and stops by itself within about ``--attack`` plus
``2 * --duration`` seconds plus start-up: a router process (started as the agent starts it) in
front of bench_router's canned upstream, an ordinary client (a closed loop on 4 keep-alive
connections opened before the attack) and ``--attackers`` trickling connections from this
process. Each attacker sends a POST head announcing a large body, ``--fill-kb`` KiB of it at
once, then one byte every ``--pace`` seconds (well within the per-read timeout, so only a
whole-body deadline stops it).

Printed: the ordinary client's req/s and p50/p99 before and during the attack; during the attack,
how many new connections an ordinary client got served, and once a second how many attackers
the router still holds, its descriptors and its resident memory; how many attackers were refused
(503) at connect. The router is configured with ``--max-connections`` and ``--body-timeout``; a
router from before those options (run this file with that checkout's ``PYTHONPATH``) ignores them,
which is the "before" figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_router import (
    ROOT,
    Result,
    _exchange,
    _request,
    _summary,
    run_loop,
    spawn_server,
    stop,
)
from perf_support import await_exit

from agent.router import RouterClient, RouterConfig, Upstream, start_router

HOST = "127.0.22.1"  # this benchmark's loopback address (other benchmarks use other ones)
CONNECT_BATCH = 100  # attackers connecting at once


class Attacker(asyncio.Protocol):
    """One trickling connection; notes how the router ended it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.answer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport is one

    def data_received(self, data: bytes) -> None:
        if len(self.answer) < 64:
            self.answer += data

    def eof_received(self) -> bool:
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    @property
    def status(self) -> int:
        parts = self.answer.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def steady(host: str, conns: list[Conn], duration: float) -> Result:
    """Closed loop on keep-alive connections opened before any attack (so no cap refuses them)."""
    latencies: list[float] = []
    req = _request(host)

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await _exchange(reader, writer, req)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    deadline = start + duration
    async with asyncio.TaskGroup() as tg:
        for reader, writer in conns:
            tg.create_task(one(reader, writer))
    return _summary(latencies, time.perf_counter() - start)


async def open_attackers(host: str, port: int, n: int, fill: int) -> list[Attacker]:
    loop = asyncio.get_running_loop()
    head = (f"POST /upload HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Length: {fill + 10**9}\r\n\r\n").encode()
    out: list[Attacker] = []

    async def one() -> None:
        try:
            async with asyncio.timeout(10):
                _, att = await loop.create_connection(Attacker, host, port)
        except (OSError, TimeoutError):
            return
        att.send(head + b"x" * fill)
        out.append(att)

    for i in range(0, n, CONNECT_BATCH):
        await asyncio.gather(*(one() for _ in range(min(CONNECT_BATCH, n - i))))
    return out


async def trickle(attackers: list[Attacker], pace: float, until: float) -> None:
    """One byte per attacker every ``pace`` seconds until ``until`` (perf_counter)."""
    while time.perf_counter() < until:
        for att in attackers:
            att.send(b"x")
        await asyncio.sleep(min(pace, max(0.0, until - time.perf_counter())))  # the trickle


async def probe_new_connections(host: str, port: int, until: float) -> dict[str, int]:
    """An ordinary client opening a new connection for one GET every 100 ms: served or not."""
    served = refused = failed = 0
    req = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    while time.perf_counter() < until:
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(req)
                status = (await reader.readuntil(b"\r\n")).split(b" ")[1]
                writer.close()
            if status == b"200":
                served += 1
            else:
                refused += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            failed += 1
        await asyncio.sleep(0.1)  # the probe's pace
    return {"served": served, "refused": refused, "failed": failed}


async def timeline(
    attackers: list[Attacker], pid: int, until: float
) -> list[dict[str, float]]:
    """Once a second: attackers still held, the router's descriptors and resident MiB."""
    proc = psutil.Process(pid)
    start = time.perf_counter()
    rows = []
    while True:
        now = time.perf_counter()
        rows.append({
            "t": round(now - start, 1),
            "held": sum(not a.closed for a in attackers),
            "fds": proc.num_fds(),
            "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        })
        if now >= until:
            return rows
        await asyncio.sleep(min(1.0, until - now))  # the sampling period


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    host = args.host
    tmp = Path(tempfile.mkdtemp(prefix="fwloris"))
    sock = tmp / "r.sock"
    router_pid = await start_router(sock, tmp / "router.log")
    client = RouterClient(sock)
    upstream, up_port = spawn_server(["--serve", host])
    attackers: list[Attacker] = []
    try:
        limits = {"max_connections": args.max_connections, "body_timeout": args.body_timeout}
        # (a router from before these options has none: it runs with no limits, the "before")
        limits = {k: v for k, v in limits.items() if k in RouterConfig.__struct_fields__}
        st = await client.configure(RouterConfig(
            service="loris", listen_host=host, listen_port=0,
            upstreams=[Upstream(slot="a", host=host, port=up_port, weight=1, healthy=True)],
            **limits,  # type: ignore[arg-type]  # the fields this checkout has
        ))
        port = st.port
        assert port is not None
        conns = [await asyncio.open_connection(host, port) for _ in range(4)]
        quiet = await steady(host, conns, args.duration)
        rss0 = psutil.Process(router_pid).memory_info().rss / 2**20
        attackers = await open_attackers(host, port, args.attackers, args.fill_kb * 1024)
        until = time.perf_counter() + args.attack
        trickler = asyncio.create_task(trickle(attackers, args.pace, until))
        sampler = asyncio.create_task(timeline(attackers, router_pid, until))
        prober = asyncio.create_task(probe_new_connections(host, port, until))
        during = await steady(host, conns, args.duration)
        for _, writer in conns:
            writer.close()
        rows = await sampler
        probes = await prober
        await trickler
        refused = sum(a.status == 503 for a in attackers)
        cut = sum(a.status == 408 for a in attackers)
        await client.shutdown()
        return {
            "code": str(ROOT), "attackers": len(attackers), "refused_503": refused,
            "cut_408": cut, "quiet": quiet, "during": during, "new_connections": probes,
            "router_rss_mb_before": round(rss0, 1), "timeline": rows,
            "config": {"limits": limits, "fill_kb": args.fill_kb, "pace": args.pace,
                       "attack_s": args.attack},
        }
    finally:
        for att in attackers:
            att.close()
        stop(upstream)
        await await_exit(router_pid)


def print_report(r: dict[str, Any]) -> None:
    q, d = r["quiet"], r["during"]
    print(f"router code: {r['code']}   config: {r['config']}")
    print(f"attackers connected: {r['attackers']}  refused at connect (503): {r['refused_503']}"
          f"  cut by the body deadline (408): {r['cut_408']}")
    print(f"ordinary client (4 keep-alive conns): quiet {q['rps']:.0f} req/s p50 "
          f"{q['p50_ms']:.2f} ms p99 {q['p99_ms']:.2f} ms; under attack {d['rps']:.0f} req/s "
          f"p50 {d['p50_ms']:.2f} ms p99 {d['p99_ms']:.2f} ms")
    print(f"new connections during the attack: {r['new_connections']}")
    print(f"router RSS before the attack: {r['router_rss_mb_before']} MiB")
    print(f"{'t s':>6} {'held':>6} {'fds':>6} {'rss MiB':>8}")
    for row in r["timeline"]:
        print(f"{row['t']:>6} {row['held']:>6} {row['fds']:>6} {row['rss_mb']:>8}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attackers", type=int, default=1500, help="trickling connections")
    parser.add_argument("--attack", type=float, default=20.0, help="seconds the attack lasts")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds of each ordinary-client measurement")
    parser.add_argument("--max-connections", type=int, default=1000)
    parser.add_argument("--body-timeout", type=float, default=5.0)
    parser.add_argument("--fill-kb", type=int, default=16,
                        help="body KiB each attacker sends first")
    parser.add_argument("--pace", type=float, default=1.0, help="seconds between trickled bytes")
    parser.add_argument("--host", default=HOST, help="loopback address for everything started")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    result = run_loop(bench(args))
    if not args.json:
        print_report(result)
    print(json.dumps({"benchmark": "slowloris", **result}))


if __name__ == "__main__":
    main()
