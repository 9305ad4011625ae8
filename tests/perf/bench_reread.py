"""What agents' re-reads of their desired states cost the broker, at fleet sizes.

Usage: python tests/perf/bench_reread.py [--nodes 1000,10000,50000] [--reads 2000]
       [--watches 5000] [--json]

Every agent watches its keys of the fleet's desired bucket and, as a safety net under the watch,
re-reads them now and then (``agent.manager.desired``): a snapshot through an ordered consumer,
which the server makes, walks and drops for each read. For each N: a fresh server (R1, file
storage, ``sync_interval: always``), the fleet's buckets as the coordinator makes them, N signed
desired states of a real size (one key a node, ``node-<i>.hello``), then ``--reads`` snapshots of
one node's keys through ``Bus.kv_entries`` (the agent's own call), 20 in flight at a time, spread
over the nodes. Figures:

- per re-read: the server's CPU (nats-server's user + system time over the reads, divided by
  their number), the client's, and the wall time of the whole run;
- what the fleet's re-reads cost the server in the steady state, as cores busy for ever: N
  agents re-reading every 30 s (before session 25: ``REREAD`` for every fleet), and at the
  mean interval agents now take from the leader's pace (``reread_every``: 30 s up to 3,000
  nodes, then 100 re-reads a second in all, at most every 10 minutes).

And the watches' idle heartbeats (``--watches`` of them, one a node as agents hold, on one
fresh server, each held idle for 10 s at 1 s and at 5 s): nats-server's CPU at each, the cost
of one heartbeat from the difference, and what the fleet's heartbeats cost it for ever at each
N: every agent at 1 s (before session 25) and at ``watch_heartbeat(N)`` (now: 1 s up to 10,000
nodes, then 10,000 heartbeats a second in all, at most 5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import emit, run_main

from agent.manager.desired import reread_every, watch_heartbeat
from agent.manager.service import REREAD
from coordinator.dev.broker import Broker
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import encode
from protocol.loop import bounded
from protocol.messages import DesiredState, ReleaseRef
from protocol.signing import generate_seed, sign_batch

FLEET = "bench"
CONCURRENCY = 20
BATCH = 500


def states(n: int, seed: bytes) -> list[tuple[str, bytes]]:
    """N signed desired states, one a node, as a rollout leaves them (two slots)."""
    old = ReleaseRef(service="hello", version="1.0.0", digest="sha256:" + "a" * 64)
    new = ReleaseRef(service="hello", version="2.0.0", digest="sha256:" + "b" * 64)
    out: list[tuple[str, bytes]] = []
    for start in range(0, n, BATCH):
        batch = [DesiredState(fleet=FLEET, node=f"node-{i}", service="hello", generation=3,
                              slots={"a": old, "b": new}, weights={"a": 0, "b": 100},
                              rollout="r-bench", time=time.time())
                 for i in range(start, min(n, start + BATCH))]
        out += [(f"{d.node}.hello", encode(env)) for d, env in zip(batch, sign_batch(seed, batch),
                                                                   strict=True)]
    return out


async def fleet_of(bus: Bus, n: int) -> list[tuple[str, bytes]]:
    """The fleet's buckets as the coordinator makes them, and N signed desired states written
    to them (``states``); those states."""
    await bus.ensure_fleet(1, raise_existing=True)
    bucket = subjects.desired_bucket(FLEET)
    written = states(n, generate_seed())
    for start in range(0, n, BATCH):
        failed = [r for r in await bus.kv_put_all(bucket, written[start:start + BATCH])
                  if not isinstance(r, int)]
        if failed:
            raise RuntimeError(f"writing the desired states: {failed[0]}")
    return written


async def measure(n: int, reads: int) -> dict[str, Any]:
    async with Broker(max_payload="1MB") as broker:
        bus = await Bus.connect(broker.url, FLEET, name="bench-reread")
        try:
            bucket = subjects.desired_bucket(FLEET)
            size = len((await fleet_of(bus, n))[0][1])
            server = psutil.Process(broker.pid)
            me = psutil.Process()
            gate = asyncio.Semaphore(CONCURRENCY)

            async def reread(i: int) -> int:
                async with gate:
                    return len(await bus.kv_entries(bucket, subjects.node_keys(f"node-{i}")))

            stride = 7919  # a prime: the reads visit nodes all over the key space
            server0, client0 = sum(server.cpu_times()[:2]), sum(me.cpu_times()[:2])
            started = time.perf_counter()
            found = await asyncio.gather(*(reread(i * stride % n) for i in range(reads)))
            wall = time.perf_counter() - started
            server_cpu = sum(server.cpu_times()[:2]) - server0
            client_cpu = sum(me.cpu_times()[:2]) - client0
            if found.count(1) != reads:
                raise RuntimeError(f"{reads - found.count(1)} of {reads} re-reads did not find "
                                   "their node's one desired state")
        finally:
            await bus.close()
    each = server_cpu / reads
    every = reread_every(n)
    return {
        "nodes": n, "reads": reads, "state_bytes": size,
        "server_ms_per_read": round(each * 1e3, 3),
        "client_ms_per_read": round(client_cpu / reads * 1e3, 3),
        "reads_per_s": round(reads / wall),
        "fixed_interval_s": REREAD,
        "fixed_server_cores": round(n / REREAD * each, 3),
        "paced_interval_s": every,
        "paced_server_cores": round(n / every * each, 3),
    }


async def idle_watches(count: int, heartbeat: float, seconds: float = 10.0) -> float:
    """nats-server's CPU (% of a core) while ``count`` watches of one key each, asking for
    idle heartbeats every ``heartbeat`` s, sit idle for ``seconds``."""
    async with Broker(max_payload="1MB") as broker:
        bus = await Bus.connect(broker.url, FLEET, name="bench-watches")
        tasks: list[asyncio.Task[None]] = []
        try:
            await bus.ensure_fleet(1, raise_existing=True)
            bucket = subjects.desired_bucket(FLEET)
            written = states(count, generate_seed())
            for start in range(0, count, BATCH):
                await bus.kv_put_all(bucket, written[start:start + BATCH])
            started = asyncio.Semaphore(0)

            async def watch(i: int) -> None:
                async for e in bus.watch(bucket, subjects.node_keys(f"node-{i}"),
                                         heartbeat=lambda: heartbeat):
                    if e is None:
                        started.release()

            for i in range(count):
                tasks.append(asyncio.create_task(watch(i)))
                if i % 200 == 199:
                    await asyncio.sleep(0.05)  # a fleet's watches start over a moment
            for _ in range(count):
                await bounded(started.acquire(), 60)
            await asyncio.sleep(2 * heartbeat)  # every consumer on its heartbeat
            server = psutil.Process(broker.pid)
            cpu0, t0 = sum(server.cpu_times()[:2]), time.perf_counter()
            await asyncio.sleep(seconds)
            return (sum(server.cpu_times()[:2]) - cpu0) / (time.perf_counter() - t0) * 100
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await bus.close()


async def measure_watches(count: int, sizes: list[int]) -> dict[str, Any]:
    at_1, at_5 = await idle_watches(count, 1.0), await idle_watches(count, 5.0)
    each_us = max(0.0, (at_1 - at_5) / 100 / (count - count / 5.0)) * 1e6
    fleet = {n: {"before_hb_s": 1.0, "before_server_cores": round(n * each_us / 1e6, 3),
                 "now_hb_s": watch_heartbeat(n),
                 "now_server_cores": round(n / watch_heartbeat(n) * each_us / 1e6, 3)}
             for n in sizes}
    return {"watches": count, "server_pct_at_1s": round(at_1, 1),
            "server_pct_at_5s": round(at_5, 1), "us_per_heartbeat": round(each_us, 2),
            "fleets": fleet}


def watch_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(f"{r['watches']} idle watches", f"server {r['server_pct_at_1s']:.1f} % of a core at "
                                            f"1 s heartbeats, {r['server_pct_at_5s']:.1f} % at "
                                            f"5 s: {r['us_per_heartbeat']:.2f} us a heartbeat")]
    for n, f in r["fleets"].items():
        out.append((f"{n} agents' watches", f"at 1 s {f['before_server_cores']:.3f} of a core; "
                                            f"at {f['now_hb_s']:g} s (now) "
                                            f"{f['now_server_cores']:.3f}"))
    return out


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("a re-read", f"server {r['server_ms_per_read']:.3f} ms CPU, client "
                      f"{r['client_ms_per_read']:.3f} ms; {r['reads_per_s']}/s "
                      f"({r['reads']} reads, {r['state_bytes']} B states)"),
        (f"every {r['fixed_interval_s']:g} s (fixed)",
         f"{r['nodes'] / r['fixed_interval_s']:.0f} re-reads/s: "
         f"{r['fixed_server_cores']:.3f} of a server core, for ever"),
        (f"every {r['paced_interval_s']:g} s (paced)",
         f"{r['nodes'] / r['paced_interval_s']:.0f} re-reads/s: "
         f"{r['paced_server_cores']:.3f} of a server core"),
    ]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1000,10000,50000",
                    help="comma-separated fleet sizes (default 1000,10000,50000)")
    ap.add_argument("--reads", type=int, default=2000, help="re-reads timed at each size")
    ap.add_argument("--watches", type=int, default=5000,
                    help="idle watches held to measure a heartbeat's cost (0: skip)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    results = []
    for n in sizes:
        r = await measure(n, args.reads)
        results.append(r)
        if not args.json:
            emit(False, f"agents' re-reads of their desired states, {n} nodes, one server", r,
                 rows(r))
    watches = await measure_watches(args.watches, sizes) if args.watches else None
    if watches is not None and not args.json:
        emit(False, "agents' watches of their desired states, idle, one server", watches,
             watch_rows(watches))
    if args.json:
        emit(True, "", {"rereads": results, "watches": watches}, [])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main()))
