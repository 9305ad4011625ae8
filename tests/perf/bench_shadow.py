"""Shadow benchmark: what mirroring costs the users, with a healthy, a hanging and a dead shadow.

Usage: python tests/perf/bench_shadow.py [--json] [--duration 5] [--rounds 3] [--rate 200]
       [--connections 8] [--mirror 100]

One real router process (``agent.router.start_router``) serves slot ``a``: the example hello app
(1.0.0). Slot ``b`` is the shadow, and each phase points it elsewhere:

- ``none``: no mirror (the baseline);
- ``healthy``: the same hello app again (same version, so every pair compares equal);
- ``hanging``: the hello app with ``EXTRA_LATENCY_MS=600000`` (healthy, but ``GET /`` answers after
  10 minutes; the router's mirror workers time out and the copies queue up, then are dropped);
- ``dead``: a port nobody listens on (every copy is refused).

The same paced load (``--rate`` requests/s over ``--connections`` keep-alive connections, GET /)
runs through the router in every phase; phases are interleaved over ``--rounds`` rounds so that
the machine's drift hits them alike. Each user answer is checked: a failure is an error, a
timeout, a non-200, or an answer from any version but the live 1.0.0. Printed per phase: requests,
failures, p50/p99/max latency of the users' requests and p99 minus the baseline, and the router's
mirror counters (mirrored, compared, dropped, shadow errors). Latency is measured from the moment
a request was due (not when it was sent), so a stalled client cannot hide a stall
(no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import await_exit

from agent.router import RouterClient, RouterConfig, Upstream, start_router
from coordinator.dev.examples import assembled
from protocol.messages import MirrorSpec, MirrorTraffic

HOST = "127.0.0.1"
PHASES = ("none", "healthy", "hanging", "dead")
REQUEST_TIMEOUT = 10.0
READY_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_app(version: str, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    """The example hello app as ``version`` on a free port (its own process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=assembled("1.0.0"), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PORT": str(port), "BIND_HOST": HOST, "FLEETWAVE_VERSION": version,
             "FLEETWAVE_SLOT": "a", "GREETING": "hello", **env},
    )
    return proc, port


async def wait_healthy(port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                ok = (await reader.read()).startswith(b"HTTP/1.1 200")
                writer.close()
                if ok:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the hello app on port {port} did not become healthy in "
                               f"{READY_TIMEOUT:g}s")
        await asyncio.sleep(0.05)


class Load:
    """Paced keep-alive GETs; every answer checked; latency from when the request was due."""

    def __init__(self, port: int, rate: float, connections: int) -> None:
        self.port = port
        self.interval = connections / rate
        self.connections = connections
        self.latencies: list[float] = []
        self.failures: list[str] = []

    async def run(self, duration: float) -> None:
        deadline = time.perf_counter() + duration
        async with asyncio.TaskGroup() as tg:
            for i in range(self.connections):
                tg.create_task(self._conn(deadline, i * self.interval / self.connections))

    async def _conn(self, deadline: float, offset: float) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        due = time.perf_counter() + offset
        try:
            while due < deadline:
                pause = due - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        if conn is None:
                            conn = await asyncio.open_connection(HOST, self.port)
                        status, body = await _get(conn)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    if conn is not None:
                        conn[1].close()
                        conn = None
                else:
                    if status != 200 or b'"version": "1.0.0"' not in body:
                        self.failures.append(f"HTTP {status} {body[:80]!r}")
                    else:
                        self.latencies.append(time.perf_counter() - due)
                due += self.interval
        finally:
            if conn is not None:
                conn[1].close()


async def _get(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> tuple[int, bytes]:
    reader, writer = conn
    writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    i = head.lower().find(b"content-length:")
    if i < 0:
        raise ValueError("answer without Content-Length")
    length = int(head[i + 15:head.find(b"\r\n", i)])
    return status, await reader.readexactly(length)


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000.0


def counters(m: MirrorTraffic | None) -> dict[str, int]:
    keys = ("mirrored", "compared", "mismatched", "dropped", "shadow_errors")
    return {k: getattr(m, k) if m is not None else 0 for k in keys}


async def bench(duration: float, rounds: int, rate: float, connections: int,
                mirror: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fwshadow"))
    live, live_port = start_app("1.0.0")
    healthy, healthy_port = start_app("1.0.0")  # the same answers: every pair compares equal
    hanging, hanging_port = start_app("2.9.0", EXTRA_LATENCY_MS="600000")
    apps = [live, healthy, hanging]
    dead_port = free_port()  # nothing listens here: every copy is refused
    sock = tmp / "router.sock"
    router = RouterClient(sock)
    router_pid: int | None = None
    try:
        for port in (live_port, healthy_port, hanging_port):
            await wait_healthy(port)
        router_pid = await start_router(sock, tmp / "router.log")
        shadow_port = {"none": healthy_port, "healthy": healthy_port,
                       "hanging": hanging_port, "dead": dead_port}

        async def configure(phase: str) -> int:
            stats = await router.configure(RouterConfig(
                service="hello", listen_host=HOST, listen_port=listen_port,
                upstreams=[Upstream(slot="a", host=HOST, port=live_port, weight=100,
                                    healthy=True),
                           Upstream(slot="b", host=HOST, port=shadow_port[phase], weight=0,
                                    healthy=True)],
                mirror=None if phase == "none" else MirrorSpec(slot="b", percent=mirror),
            ))
            assert stats.port is not None
            return stats.port

        listen_port = 0
        listen_port = await configure("none")
        await Load(listen_port, rate, connections).run(1.0)  # warm up
        lat: dict[str, list[float]] = {p: [] for p in PHASES}
        per_round: dict[str, list[float]] = {p: [] for p in PHASES}
        fails: dict[str, list[str]] = {p: [] for p in PHASES}
        mir: dict[str, dict[str, int]] = {p: counters(None) for p in PHASES}
        for _ in range(rounds):
            for phase in PHASES:
                await configure(phase)
                before = counters((await router.stats()).mirror)
                load = Load(listen_port, rate, connections)
                await load.run(duration)
                after = counters((await router.stats()).mirror)
                lat[phase] += load.latencies
                per_round[phase].append(round(quantile(load.latencies, 0.99), 1))
                fails[phase] += load.failures
                for k in after:
                    # Counters are cumulative; a lower value means they were reset.
                    mir[phase][k] += after[k] - before[k] if after[k] >= before[k] else after[k]
        await router.shutdown()
        base_p99 = quantile(lat["none"], 0.99)
        rows = []
        for phase in PHASES:
            p99 = quantile(lat[phase], 0.99)
            rows.append({
                "phase": phase, "requests": len(lat[phase]) + len(fails[phase]),
                "failed": len(fails[phase]), "p50_ms": round(quantile(lat[phase], 0.5), 3),
                "p99_ms": round(p99, 3), "max_ms": round(quantile(lat[phase], 1.0), 3),
                "p99_vs_none_ms": round(p99 - base_p99, 3), "p99_per_round_ms": per_round[phase],
                **mir[phase],
                "failures": fails[phase][:3],
            })
        return {"duration_s": duration, "rounds": rounds, "rate": rate,
                "connections": connections, "mirror_percent": mirror, "phases": rows}
    finally:
        for proc in apps:
            proc.terminate()
        for proc in apps:
            try:
                proc.wait(5)  # the hanging app joins its sleeping threads: SIGKILL it
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if router_pid is not None:
            await await_exit(router_pid)


def table(result: dict[str, Any]) -> str:
    head = (f"users through the router: {result['rate']:g} req/s over "
            f"{result['connections']} keep-alive connections, mirror {result['mirror_percent']:g}%"
            f", {result['rounds']} x {result['duration_s']:g}s per phase")
    cols = ("phase", "requests", "failed", "p50_ms", "p99_ms", "max_ms", "p99_vs_none_ms",
            "mirrored", "compared", "dropped", "shadow_errors")
    lines = [head, "  ".join(f"{c:>14}" for c in cols)]
    for row in result["phases"]:
        lines.append("  ".join(f"{row[c]:>14}" for c in cols))
    lines.append("p99 of each round (ms), to show the machine's noise:")
    for row in result["phases"]:
        lines.append(f"  {row['phase']:>8}: {', '.join(f'{x:g}' for x in row['p99_per_round_ms'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the four phases")
    parser.add_argument("--rate", type=float, default=200.0, help="user requests per second")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--mirror", type=float, default=100.0, help="percent mirrored")
    args = parser.parse_args()
    result = asyncio.run(bench(args.duration, args.rounds, args.rate, args.connections,
                               args.mirror))
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
