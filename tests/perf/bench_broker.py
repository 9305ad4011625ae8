"""What each agent costs the fleet's NATS server at rest, and the server a fleet of N needs.

Usage: python tests/perf/bench_broker.py [--agents 5000] [--fleets 1000,10000,50000]
       [--idle 10] [--json]

An operator sizing the servers of a large fleet asks what one more agent costs them. Each agent
holds, on the server: a client connection (with its subscriptions: the leader's pace, its
requests' inbox, its publish acks), one watch of its desired states (a consumer the server
keeps, with its idle heartbeats), and its node's entries in the fleet's buckets (its signed
desired state on disk, its observed state in memory, its registration). On one fresh server
(R1, file storage, ``sync_interval: always``, the default 1 MB ``max_payload``, the fleet's
buckets as the coordinator makes them), ``--agents`` of each are added in turn, and the
server's resident memory is read after each step settles (nats-server is a Go program: its
RSS includes the heap's headroom, which is what a host must have):

- stored: the N agents' entries (a desired state of two slots signed as the coordinator signs
  them, an observed state of two slots with router counters as an agent reports it, a
  registration as an agent sends it);
- connections: N plain TCP clients speaking the NATS protocol (raw sockets, three
  subscriptions each as an agent holds them, answering the server's pings), so that this
  process can hold thousands (a nats-py client per agent would be the limit);
- watches: N watches of one node's keys through ``Bus.watch`` (the agent's own call, over 20
  clients, the idle heartbeat the agents of a fleet that size ask for), and the server's CPU
  while they sit idle (``--idle`` seconds) and while they are made (``bench_restart`` makes
  them again after a restart, at 500 a second: ``WATCH_RESTART_RATE``).

Figures: each step's memory per agent and the store's bytes on disk per agent; the server's
CPU per watch made and per second with N idle; then, for each of ``--fleets``, the server's
memory for that many agents (its own at rest plus N times the three: linear, as each step
measured it; TLS adds its buffers to each connection, not measured here), its disk, the cores
its watches' heartbeats take at rest (at the heartbeat that fleet's agents ask for), and how
long making every watch again after a restart takes and the cores it takes meanwhile.

Read the three parts as one: nats-server is a Go program, and a step's growth depends on what
the heap had free after the one before (the connections' share shrinks, the watches' grows, if
the order is changed); their sum, per agent, is what the measurement gives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reread import BATCH, FLEET, states
from perf_support import emit, run_dir, run_main

from agent.manager.desired import watch_heartbeat
from coordinator.dev.broker import Broker
from protocol import subjects
from protocol.bus import WATCH_RESTART_RATE, Bus, restart_spread
from protocol.codec import encode
from protocol.loop import bounded
from protocol.messages import (
    NodeInfo,
    ObservedState,
    RouterStats,
    SlotStatus,
    SlotTraffic,
)
from protocol.signing import generate_seed

SETTLE = 3.0  # seconds the server is left alone before its memory is read
CLIENTS = 20  # nats-py clients the watches are spread over
CONNECT_AT_ONCE = 200  # raw connections opened together
DIGEST = "sha256:" + "c" * 64


def observed(i: int) -> bytes:
    """An agent's observed state of one service, two slots behind its router, as it reports
    it once a rollout has switched (counters and a latency histogram included)."""
    traffic = SlotTraffic(requests=123_456, errors=7, failures=1, latency=[40, 30, 20, 9, 1, 0],
                          codes={"2xx": 123_000, "4xx": 449, "5xx": 7}, latency_sum_ms=9876.5)
    now = time.time()
    return encode(ObservedState(
        node=f"node-{i}", service="hello", generation=3, observed_generation=3,
        slots={s: SlotStatus(slot=s, status="healthy", version=v, digest=DIGEST, pid=4000 + i,
                             port=20_000 + n, since=now)
               for n, (s, v) in enumerate((("a", "1.0.0"), ("b", "2.0.0")))},
        weights={"a": 0, "b": 100},
        router=RouterStats(epoch=now, pid=3000 + i, port=8080, weights={"a": 0, "b": 100},
                           slots={"a": traffic, "b": traffic}, time=now),
        phase="converged", time=now))


def registration(i: int) -> bytes:
    """An agent's registration, as it sends it at its start."""
    return encode(NodeInfo(
        id=f"node-{i}", labels={"region": "eu-west", "role": "edge"}, agent_version="0.1.0",
        hostname=f"edge-{i:05d}.example.net", platform="Linux-6.1.0-x86_64", python="3.11.2",
        cpu_count=4, mem_total=8 << 30, bind_host="10.0.0.1", boot_time=time.time() - 86_400,
        started_at=time.time(), trust_keys=["C" + "A" * 55], features=["batch"]))


async def settled_rss(server: psutil.Process) -> int:
    await asyncio.sleep(SETTLE)
    return int(server.memory_info().rss)


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def fill(bus: Bus, n: int) -> None:
    """The N agents' entries in the fleet's buckets."""
    desired = states(n, generate_seed())
    for bucket, entries in (
            (subjects.desired_bucket(FLEET), desired),
            (subjects.observed_bucket(FLEET),
             [(subjects.node_service_key(f"node-{i}", "hello"), observed(i)) for i in range(n)]),
            (subjects.nodes_bucket(FLEET), [(f"node-{i}", registration(i)) for i in range(n)])):
        for start in range(0, n, BATCH):
            failed = [r for r in await bus.kv_put_all(bucket, entries[start:start + BATCH])
                      if not isinstance(r, int)]
            if failed:
                raise RuntimeError(f"writing {bucket}: {failed[0]}")


class RawClient:
    """One connection speaking the NATS protocol over a plain socket, subscribed as an agent
    is (the pace, a request inbox, publish acks), answering the server's pings."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, host: str, port: int, i: int) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        info = await bounded(reader.readline(), 10)
        if not info.startswith(b"INFO "):
            raise RuntimeError(f"connection {i}: the server said {info[:80]!r}, not INFO")
        writer.write(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,'
            b'"protocol":1,"name":"raw-agent-%d","lang":"python","version":"bench"}\r\n' % i
            + b"SUB %s 1\r\n" % subjects.pace(FLEET).encode()
            + b"SUB _INBOX.raw%d.* 2\r\n" % i
            + b"SUB _ACKS.raw%d.* 3\r\nPING\r\n" % i)
        await writer.drain()
        line = await bounded(reader.readline(), 10)
        if line.strip() != b"PONG":
            raise RuntimeError(f"connection {i}: the server said {line[:80]!r}, not PONG")
        client = cls(reader, writer)
        client.task = asyncio.create_task(client._answer())
        return client

    async def _answer(self) -> None:
        while line := await self.reader.readline():
            if line.startswith(b"PING"):
                self.writer.write(b"PONG\r\n")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self.task
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def measure(n: int, idle_for: float) -> dict[str, Any]:
    with run_dir("bench-broker") as work:
        async with Broker(max_payload="1MB", store_dir=work / "store") as broker:
            server = psutil.Process(broker.pid)
            admin = await Bus.connect(broker.url, FLEET, name="bench-broker")
            raw: list[RawClient] = []
            clients: list[Bus] = []
            tasks: list[asyncio.Task[None]] = []
            try:
                await admin.ensure_fleet(1, raise_existing=True)
                base = await settled_rss(server)
                disk0 = store_bytes(work / "store")
                await fill(admin, n)
                stored = await settled_rss(server)
                disk = store_bytes(work / "store") - disk0
                host, port = broker.url.removeprefix("nats://").rsplit(":", 1)
                for start in range(0, n, CONNECT_AT_ONCE):
                    raw += await asyncio.gather(*(RawClient.connect(host, int(port), i)
                                                  for i in range(start,
                                                                 min(n, start + CONNECT_AT_ONCE))))
                connected = await settled_rss(server)
                heartbeat = watch_heartbeat(n)
                for c in range(CLIENTS):
                    clients.append(await Bus.connect(broker.url, FLEET, name=f"bench-broker-{c}"))
                started = asyncio.Semaphore(0)

                async def watch(i: int) -> None:
                    async for e in clients[i % CLIENTS].watch(
                            subjects.desired_bucket(FLEET), subjects.node_keys(f"node-{i}"),
                            heartbeat=lambda: heartbeat):
                        if e is None:
                            started.release()

                made0, t0 = sum(server.cpu_times()[:2]), time.perf_counter()
                for i in range(n):
                    tasks.append(asyncio.create_task(watch(i)))
                    if i % 100 == 99:
                        await asyncio.sleep(0.1)  # at most ~1,000 a second, as a spread fleet
                for _ in range(n):
                    await bounded(started.acquire(), 120)
                made = sum(server.cpu_times()[:2]) - made0
                made_s = time.perf_counter() - t0
                watched = await settled_rss(server)
                idle0, t1 = sum(server.cpu_times()[:2]), time.perf_counter()
                await asyncio.sleep(idle_for)
                idle = (sum(server.cpu_times()[:2]) - idle0) / (time.perf_counter() - t1)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.gather(*(c.close() for c in raw), return_exceptions=True)
                await asyncio.gather(*(b.close() for b in clients), return_exceptions=True)
                await admin.close()
    return figures(n, base, stored - base, disk, connected - stored, watched - connected,
                   made, made_s, idle, heartbeat)


def figures(n: int, base: int, stored: int, disk: int, connections: int, watches: int,
            made: float, made_s: float, idle: float, heartbeat: float) -> dict[str, Any]:
    kib = 1024
    per = {"stored_kib": stored / n / kib, "connection_kib": connections / n / kib,
           "watch_kib": watches / n / kib}
    per_agent = sum(per.values())
    watch_ms = made / n * 1e3
    return {
        "agents": n, "server_base_mib": round(base / 2**20, 1),
        **{k: round(v, 1) for k, v in per.items()},
        "agent_kib": round(per_agent, 1),
        "disk_bytes_per_agent": round(disk / n),
        "watch_made_ms": round(watch_ms, 3), "watches_made_s": round(made_s, 1),
        "idle_heartbeat_s": heartbeat, "idle_cores": round(idle, 3),
    }


def sizing(r: dict[str, Any], fleets: list[int]) -> dict[str, dict[str, float]]:
    """The server a fleet of each size needs, by the measured figures (linear in N): memory,
    disk, the cores its watches' idle heartbeats take (one heartbeat's cost, from the measured
    idle watches, at the heartbeat that fleet's agents ask for), and the cores and seconds of
    making every watch again after a restart, at the agents' spread."""
    heartbeat_s = r["idle_cores"] / (r["agents"] / r["idle_heartbeat_s"])  # CPU-s a heartbeat
    out = {}
    for n in fleets:
        rate = min(float(n), WATCH_RESTART_RATE)
        out[str(n)] = {
            "memory_gib": round((r["server_base_mib"] * 2**20 + n * r["agent_kib"] * 1024)
                                / 2**30, 2),
            "disk_mib": round(n * r["disk_bytes_per_agent"] / 2**20, 1),
            "idle_cores": round(n / watch_heartbeat(n) * heartbeat_s, 3),
            "restart_s": round(restart_spread(n), 1),
            "restart_cores": round(rate * r["watch_made_ms"] / 1e3, 2),
        }
    return out


def rows(r: dict[str, Any], fleets: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    n = r["agents"]
    out = [
        ("the server alone", f"{r['server_base_mib']:.1f} MiB (the fleet's buckets made, empty)"),
        ("an agent's entries", f"{r['stored_kib']:.1f} KiB of memory (desired state, observed "
                               f"state in memory, registration); {r['disk_bytes_per_agent']:,} "
                               "bytes on disk"),
        ("an agent's connection", f"{r['connection_kib']:.1f} KiB (plain TCP, 3 subscriptions)"),
        ("an agent's watch", f"{r['watch_kib']:.1f} KiB (its consumer, idle heartbeat every "
                             f"{r['idle_heartbeat_s']:g} s)"),
        ("an agent, in all", f"{r['agent_kib']:.1f} KiB of the server's memory"),
        ("making a watch", f"{r['watch_made_ms']:.3f} ms of the server's CPU ({n:,} made in "
                           f"{r['watches_made_s']:g} s)"),
        (f"{n:,} watches idle", f"{r['idle_cores']:.3f} of a core (their heartbeats)"),
    ]
    for size, f in fleets.items():
        out.append((f"a fleet of {int(size):,}",
                    f"~{f['memory_gib']:.2f} GiB of memory, ~{f['disk_mib']:.0f} MiB on disk, "
                    f"~{f['idle_cores']:.2f} of a core for its watches' heartbeats; after a "
                    f"restart, its watches made again within {f['restart_s']:g} s: "
                    f"~{f['restart_cores']:.2f} of a core meanwhile"))
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=5000,
                    help="agents' entries, connections and watches to measure with (default "
                         "5000; this process holds them all)")
    ap.add_argument("--fleets", default="1000,10000,50000",
                    help="comma-separated fleet sizes to size the server for (default "
                         "1000,10000,50000)")
    ap.add_argument("--idle", type=float, default=10.0,
                    help="seconds the watches sit idle while the server's CPU is read "
                         "(default 10)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    if args.agents < 10:
        ap.error("--agents must be at least 10")
    if args.idle <= 0:
        ap.error("--idle must be a positive number of seconds")
    try:
        fleets = [int(x) for x in args.fleets.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--fleets: {args.fleets!r} is not a comma-separated list of numbers")
    r = await measure(args.agents, args.idle)
    sized = sizing(r, fleets)
    emit(args.json, f"what {args.agents:,} agents cost one nats-server at rest",
         {**r, "fleets": sized}, rows(r, sized))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main()))
