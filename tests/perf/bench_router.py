"""Router benchmark: the same load direct to an upstream and through the router in front of it.

Usage: python tests/perf/bench_router.py [--json] [--duration 5] [--concurrency 1,4,16]
           [--rate 1000] [--upstream canned|example|both] [--repeat 1] [--no-wrk] [--relay]
           [--version 2.0.0] [--host 127.0.21.1] [--cohort]

Two upstreams, each measured direct and through the router with the same client and the same load:

- ``example`` (issue 8's figure): the example service ``deploy/examples/hello/app.py``
  started as the agent starts a slot: its manifest's ``command`` in the release directory, the
  environment ``agent.host.slots.SlotSpec.env`` builds (``PORT``, ``FLEETWAVE_*``, the manifest's
  ``env``), its own session, output to a log file; plus ``BIND_HOST`` so that it listens on this
  benchmark's loopback address. The load is ``GET /``.
- ``canned``: a one-process asyncio server answering every request head with a canned response
  (~100k req/s with wrk). Its figures are the router's own ceiling: an upstream that costs almost
  nothing, so the router's cost is all that shows.

Loads, each for ``--duration`` seconds, direct then through the router:

- closed loop, per ``--concurrency`` level, with two clients: a small asyncio keep-alive client
  (``python``) and, when installed, ``wrk`` (one thread; a native client that does not share the
  Python client's overhead).
- open loop (``rate``): requests due at a fixed ``--rate`` per second, spread evenly, sent on a
  pool of 64 keep-alive connections, so that at a moderate rate a request never waits for a free
  connection (``queued`` counts those that did). Latency is measured from the send, so the
  scheduler's timer slack does not count as router latency; the sends stay open-loop (they never
  wait for answers).

**Moderate load**, for issue 8's p99 target (<= 1 ms added p99), is the open-loop run: 1000 req/s
by default, about 15 % of what the example service serves at best on the 2-core machine and under
5 % of the router's own ceiling, so neither side queues and the added p99 is the hop's own.

Printed per row: req/s, p50 and p99 latency direct and through the router, the ratios (throughput
router/direct, added p50/p99 in ms) and the router's CPU time per proxied request (user+system,
from /proc). The client, the upstream and the router share the machine's cores, so the throughput
ratio measures the router's cost *in that company*; see the CPU column for its own cost. With
``--repeat N`` the whole matrix runs N times and a summary gives each row's ratio and added p99 as
median [min..max]. With ``--relay`` a byte relay with no HTTP logic at all is measured too (its own
process, same event loop): the floor any Python hop pays in syscalls and wake-ups.

With ``--cohort`` (issue 15) every request carries an ``X-User`` header, the router splits two
slots (the same upstream) 80/20, and each load runs through the router twice in a row: split by
request, then by users (``--cohort-key header:X-User``: the header parsed and hashed per request).
``cohort_ratio`` is the second's throughput over the first's (the budget: >= 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (after the path: the benchmark runs from a checkout without the package installed too)
from perf_support import await_exit, run_dir, run_main  # noqa: E402

from agent.host.slots import SlotSpec  # noqa: E402
from agent.router import RouterClient, RouterConfig, Upstream, start_router  # noqa: E402
from coordinator.dev.examples import assembled  # noqa: E402
from protocol.manifest import load_manifest  # noqa: E402
from protocol.messages import CohortSpec  # noqa: E402

HOST = "127.0.21.1"  # this benchmark's loopback address (other engineers use other ones)
OPEN_LOOP_CONNS = 64

BODY = b'{"hello":"world"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)

Result = dict[str, float]
Load = Callable[[str, int, float], Awaitable[Result]]


# -- the canned upstream and the relay (each runs in its own process) ------------------------------


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


async def serve_upstream(host: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, 0, backlog=1024)
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

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.up: RelayUp | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(5):
                _, self.up = await loop.create_connection(
                    lambda: RelayUp(self), self.host, self.port)
        except (OSError, TimeoutError):
            # the client must see the failure (a closed connection), not wait for an answer
            self.transport.close()
            return
        for data in self.pending:
            self.up.transport.write(data)  # type: ignore[attr-defined]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.pending.append(data)
        else:
            self.up.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.transport.close()


async def serve_relay(host: str, up_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RelayDown(host, up_port), host, 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


# -- clients --------------------------------------------------------------------------------------


USER_HEADER = ""  # "X-User: ...\r\n" with --cohort (set once in main, before any load)


def _request(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\n{USER_HEADER}\r\n".encode()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> None:
    writer.write(req)
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        i = head.find(b"Content-Length: ") + 16
        await reader.readexactly(int(head[i : head.find(b"\r\n", i)]))


def _summary(latencies: list[float], elapsed: float) -> Result:
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
    }


async def drive(host: str, port: int, concurrency: int, duration: float) -> Result:
    """Closed loop: ``concurrency`` keep-alive connections, each sending as soon as answered."""
    latencies: list[float] = []
    req = _request(host)

    async def one(deadline: float) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await _exchange(reader, writer, req)
                latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(one(start + duration))
    return _summary(latencies, time.perf_counter() - start)


async def drive_rate(host: str, port: int, rate: float, duration: float) -> Result:
    """Open loop: requests due every 1/rate s, each taken by an idle connection of a pool."""
    latencies: list[float] = []
    idle = queued = 0
    due: asyncio.Queue[bool] = asyncio.Queue()  # one True per request due; False: stop
    req = _request(host)

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal idle
        while True:
            idle += 1
            go = await due.get()
            idle -= 1
            if not go:
                return
            t0 = time.perf_counter()
            await _exchange(reader, writer, req)
            latencies.append(time.perf_counter() - t0)

    conns = [await _warm(host, port, req) for _ in range(OPEN_LOOP_CONNS)]
    n = int(rate * duration)
    try:
        async with asyncio.TaskGroup() as tg:
            for reader, writer in conns:
                tg.create_task(worker(reader, writer))
            start = time.perf_counter() + 0.01
            for i in range(n):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # the schedule itself, not a wait for an event
                if idle <= due.qsize():
                    queued += 1  # every connection busy: this request waits for one
                due.put_nowait(True)
            for _ in conns:
                due.put_nowait(False)
    finally:
        for _, writer in conns:
            writer.close()
    result = _summary(latencies, time.perf_counter() - start)
    result["queued"] = queued
    return result


async def _warm(host: str, port: int, req: bytes) -> tuple[asyncio.StreamReader,
                                                           asyncio.StreamWriter]:
    """A connection of the open-loop pool, through to the upstream: one exchange before the
    schedule starts. A hop that connects upstream when a client connects (the relay) would
    otherwise open the pool's 64 upstream connections at once, overflowing the example
    service's accept backlog (5): SYNs dropped and retried after 1 s, then a TimeoutError."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _exchange(reader, writer, req)
    except BaseException:
        writer.close()
        raise
    return reader, writer


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def drive_wrk(host: str, port: int, concurrency: int, duration: float) -> Result:
    """The same closed loop with wrk (one thread, ``concurrency`` keep-alive connections)."""
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency",
        f"http://{host}:{port}/", stdout=subprocess.PIPE,
    )
    async with asyncio.timeout(duration + 30):
        out = (await proc.communicate())[0].decode()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses from port {port}")
    return {"requests": total, "rps": rps, "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"])}


# -- processes ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def spawn_server(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    """One of this file's servers in its own process, and the port it printed."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        stop(proc)
        raise RuntimeError(f"{' '.join(args)}: the server exited before printing its port")
    return proc, int(line)


async def spawn_example(
    version: str, host: str, log_dir: Path
) -> tuple[subprocess.Popen[str], int]:
    """The example service in its release dir with the env the agent gives a slot; once healthy."""
    release = assembled(version)
    manifest = load_manifest(release / "fleetwave.toml")
    port = free_port(host)
    spec = SlotSpec(
        service=manifest.name, slot="a", node="bench", release_dir=release, manifest=manifest,
        digest="", port=port, log_dir=log_dir, host=host,
    )
    env = spec.env() | {"BIND_HOST": host}
    with spec.log_path.open("ab") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220  # returns at once; nothing runs yet
            manifest.command, cwd=release, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=log, start_new_session=True, text=True,
        )
    deadline = time.monotonic() + manifest.health.start_timeout
    health = f"GET {manifest.health.http} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    while True:
        try:
            async with asyncio.timeout(1):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(health.encode())
                status = await reader.readline()
                writer.close()
            if status.split(b" ")[1:2] == [b"200"]:
                return proc, port
        except (OSError, TimeoutError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"example {version} did not become healthy; see {spec.log_path}")
        await asyncio.sleep(0.05)  # polling the health endpoint, bounded by start_timeout


# -- the matrix -----------------------------------------------------------------------------------


def _loads(levels: list[int], rate: float, use_wrk: bool) -> list[tuple[str, str, Load]]:
    def closed(run_load: Callable[[str, int, int, float], Awaitable[Result]], c: int) -> Load:
        return lambda host, port, duration: run_load(host, port, c, duration)

    def open_loop(host: str, port: int, duration: float) -> Awaitable[Result]:
        return drive_rate(host, port, rate, duration)

    loads: list[tuple[str, str, Load]] = [("python", str(c), closed(drive, c)) for c in levels]
    if use_wrk:
        loads += [("wrk", str(c), closed(drive_wrk, c)) for c in levels]
    if rate > 0:
        loads.append(("python", f"{rate:g}/s", open_loop))
    return loads


async def measure(
    host: str, upstream: str, up_port: int, router: tuple[int, int], relay: tuple[int, int] | None,
    loads: list[tuple[str, str, Load]], duration: float, run: int,
    cohort: Callable[[bool], Awaitable[None]] | None = None,
) -> list[dict[str, object]]:
    """Every load direct, through the router (and the relay); one row each. ``cohort``
    reconfigures the router with (True) or without a cohort rule: each load then runs through
    the router by request and by users, one after the other."""
    router_pid, router_port = router
    await drive(host, router_port, 4, 0.5)  # warm up both paths (and the router's pool)
    await drive(host, up_port, 4, 0.5)
    rows: list[dict[str, object]] = []
    for client, load, run_load in loads:
        direct = await run_load(host, up_port, duration)
        cpu0 = cpu_seconds(router_pid)
        proxied = await run_load(host, router_port, duration)
        cpu = cpu_seconds(router_pid) - cpu0
        proxied["router_cpu_us_per_req"] = cpu * 1e6 / max(1.0, proxied["requests"])
        row: dict[str, object] = {
            "upstream": upstream, "client": client, "load": load, "run": run,
            "direct": direct, "router": proxied,
            "throughput_ratio": proxied["rps"] / direct["rps"],
            "added_p50_ms": proxied["p50_ms"] - direct["p50_ms"],
            "added_p99_ms": proxied["p99_ms"] - direct["p99_ms"],
        }
        if cohort is not None:
            await cohort(True)
            cpu0 = cpu_seconds(router_pid)
            users = await run_load(host, router_port, duration)
            users["router_cpu_us_per_req"] = (cpu_seconds(router_pid) - cpu0) * 1e6 / max(
                1.0, users["requests"])
            await cohort(False)
            row |= {"cohort": users, "cohort_ratio": users["rps"] / proxied["rps"]}
        if relay is not None:
            relay_pid, relay_port = relay
            cpu0 = cpu_seconds(relay_pid)
            relayed = await run_load(host, relay_port, duration)
            cpu = cpu_seconds(relay_pid) - cpu0
            relayed["router_cpu_us_per_req"] = cpu * 1e6 / max(1.0, relayed["requests"])
            row |= {"relay": relayed, "relay_ratio": relayed["rps"] / direct["rps"]}
        rows.append(row)
    return rows


async def bench(args: argparse.Namespace, use_wrk: bool) -> list[dict[str, object]]:
    host = args.host
    levels = [int(x) for x in args.concurrency.split(",") if x]
    loads = _loads(levels, args.rate, use_wrk)
    upstreams = ["example", "canned"] if args.upstream == "both" else [args.upstream]
    with run_dir("fwbench") as tmp:
        return await _bench(args, tmp, host, loads, upstreams)


async def _bench(args: argparse.Namespace, tmp: Path, host: str,
                 loads: list[tuple[str, str, Load]],
                 upstreams: list[str]) -> list[dict[str, object]]:
    sock = tmp / "r.sock"
    router_pid = await start_router(sock, tmp / "router.log")
    client = RouterClient(sock)
    procs: list[subprocess.Popen[str]] = []
    rows: list[dict[str, object]] = []
    try:
        for run in range(args.repeat):
            for upstream in upstreams:
                if upstream == "example":
                    proc, up_port = await spawn_example(args.version, host, tmp)
                else:
                    proc, up_port = spawn_server(["--serve", host])
                procs.append(proc)
                relay = None
                if args.relay:
                    relay_proc, relay_port = spawn_server(["--serve-relay", host, str(up_port)])
                    procs.append(relay_proc)
                    relay = (relay_proc.pid, relay_port)
                def config(by_users: bool, port: int = 0, up: int = up_port) -> RouterConfig:
                    if not args.cohort:
                        return RouterConfig(
                            service="bench", listen_host=host, listen_port=port,
                            upstreams=[Upstream(slot="a", host=host, port=up, weight=1,
                                                healthy=True)],
                        )
                    return RouterConfig(
                        service="bench", listen_host=host, listen_port=port,
                        upstreams=[Upstream(slot="a", host=host, port=up, weight=80,
                                            healthy=True),
                                   Upstream(slot="b", host=host, port=up, weight=20,
                                            healthy=True)],
                        cohort=CohortSpec(key="header:X-User", salt="bench", new="b")
                        if by_users else None,
                    )

                stats = await client.configure(config(False))
                assert stats.port is not None
                port = stats.port

                async def by_users(on: bool, port: int = port,
                                   config: Callable[..., RouterConfig] = config) -> None:
                    await client.configure(config(on, port))

                rows += await measure(
                    host, upstream, up_port, (router_pid, stats.port), relay, loads,
                    args.duration, run, by_users if args.cohort else None,
                )
                while procs:
                    stop(procs.pop())
        await client.shutdown()
        return rows
    finally:
        for proc in procs:
            stop(proc)
        await await_exit(router_pid)  # it exits on its own after the shutdown request


# -- output ---------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'upstream':>8} {'client':>6} {'load':>7} {'target':>7} {'req/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'hop cpu/req':>12}")
    for r in rows:
        for name in ("direct", "router", "relay"):
            if name not in r:
                continue
            f = r[name]
            cpu = f.get("router_cpu_us_per_req")
            late = f" queued {int(f['queued'])}" if f.get("queued") else ""
            print(f"{r['upstream']:>8} {r['client']:>6} {r['load']:>7} {name:>7} {f['rps']:>9.0f} "
                  f"{f['p50_ms']:>8.3f} {f['p99_ms']:>8.3f} "
                  f"{'' if cpu is None else f'{cpu:.1f} us':>12}{late}")
        if "cohort" in r:
            f = r["cohort"]
            print(f"{r['upstream']:>8} {r['client']:>6} {r['load']:>7} {'users':>7} "
                  f"{f['rps']:>9.0f} {f['p50_ms']:>8.3f} {f['p99_ms']:>8.3f} "
                  f"{f['router_cpu_us_per_req']:>9.1f} us")
        print(f"{'':>8} {'':>6} {'':>7} {'ratio':>7} {r['throughput_ratio']:>9.2f} "
              f"{r['added_p50_ms']:>+8.3f} {r['added_p99_ms']:>+8.3f}"
              + (f"   (relay {r['relay_ratio']:.2f})" if "relay" in r else "")
              + (f"   (users/requests {r['cohort_ratio']:.3f})" if "cohort" in r else ""))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (upstream, client, load): the ratio, added p99 and CPU/request over the runs."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["upstream"], r["client"], r["load"]), []).append(r)

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return [
        {
            "upstream": u, "client": c, "load": load, "runs": len(rs),
            "throughput_ratio": spread([r["throughput_ratio"] for r in rs]),
            "added_p99_ms": spread([r["added_p99_ms"] for r in rs]),
            "router_cpu_us_per_req": spread([r["router"]["router_cpu_us_per_req"] for r in rs]),
        }
        for (u, c, load), rs in groups.items()
    ]


def print_summary(summary: list[dict[str, Any]]) -> None:
    def fmt(s: dict[str, float], spec: str) -> str:
        return f"{s['median']:{spec}} [{s['min']:{spec}}..{s['max']:{spec}}]"

    print(f"\n{'upstream':>8} {'client':>6} {'load':>7} {'runs':>4}  {'ratio':<18} "
          f"{'added p99 ms':<24} {'cpu us/req':<20}")
    for s in summary:
        print(f"{s['upstream']:>8} {s['client']:>6} {s['load']:>7} {s['runs']:>4}  "
              f"{fmt(s['throughput_ratio'], '.2f'):<18} {fmt(s['added_p99_ms'], '+.3f'):<24} "
              f"{fmt(s['router_cpu_us_per_req'], '.1f'):<20}")


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """``main`` on uvloop if installed; SIGTERM stops it as Ctrl-C does (``run_main``)."""
    try:
        import uvloop
    except ImportError:
        return run_main(main)
    return run_main(main, uvloop.run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop levels")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="open-loop requests/s (moderate load); 0 skips it")
    parser.add_argument("--upstream", choices=("canned", "example", "both"), default="both")
    parser.add_argument("--version", default="2.0.0", help="example service version directory")
    parser.add_argument("--host", default=HOST, help="loopback address for everything started")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole matrix N times")
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk runs")
    parser.add_argument(
        "--relay", action="store_true",
        help="also measure a byte relay with no HTTP logic (the floor for any Python hop)",
    )
    parser.add_argument(
        "--cohort", action="store_true",
        help="also measure the router splitting by users (--cohort-key header:X-User)",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--serve-relay", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_loop(serve_upstream(args.serve))
        return
    if args.serve_relay:
        run_loop(serve_relay(args.serve_relay[0], int(args.serve_relay[1])))
        return
    if args.cohort:
        global USER_HEADER
        USER_HEADER = "X-User: user-4711\r\n"
    use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    rows = run_loop(bench(args, use_wrk))
    summary = summarize(rows)
    if not args.json:
        print_table(rows)
        if args.repeat > 1:
            print_summary(summary)
    print(json.dumps({
        "benchmark": "router", "duration_s": args.duration, "rate": args.rate,
        "results": rows, "summary": summary,
    }))


if __name__ == "__main__":
    main()
