"""A release fetched by a whole fleet at once: batched direct gets against the ordered consumer
they replaced (session 28).

Usage: python tests/perf/bench_fetch.py [--nodes 1000,10000,20000] [--size 12000]
       [--chunk 4096] [--way direct,consumer] [--connections 100] [--give-up 300] [--json]

A ``--prestage all`` rollout asks every node for its release at once; a wave of thousands does
too. For each N and each way: a fresh server (R1, file storage, ``sync_interval: always``, the
server's default 1 MB ``max_payload``), the fleet's object store as the coordinator makes it,
one object of ``--size`` bytes in chunks of ``--chunk`` (the store's own chunk is 128 KiB; the
default, three 4 KiB chunks, makes an object of several chunks without moving gigabytes on the
2 cores the clients share with the server: what differs between the ways is per fetch, not per
byte). Then N fetches at once over ``--connections`` clients, each as an agent fetches a
release: ``direct`` is ``Bus.obj_get_into`` (the agent's own call: the info, then batches of
direct gets); ``consumer`` is the code it replaced (the info, then an ordered consumer of the
chunks, unsubscribed at the last one). A fetch that fails is tried again after the agents'
``FETCH_RETRY``, as the agent does.

Figures: the last fetch done (and p50), or how many were done at ``--give-up``; the failed
attempts (each one an agent's retry 5 s later); nats-server's CPU over the run and the
consumers it held at the most (its ``/jsz``, every 0.5 s and once at the end: the server drops
an unsubscribed ordered consumer after a few seconds of inactivity); this process's CPU (it
plays the N agents on the same two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_restart import consumers, sample, stopped
from perf_support import emit, run_main

from agent.reconcile import FETCH_RETRY
from coordinator.dev.broker import Broker
from protocol import subjects
from protocol.bus import WATCH_HEARTBEAT, Bus

FLEET = "fetch"
NAME = "hello/2.0.0"
WAYS = ("direct", "consumer")


async def by_consumer(bus: Bus, store: str, write: Callable[[bytes], object]) -> None:
    """The fetch before session 28: the chunks through an ordered consumer."""
    from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, ObjectStore

    stream = subjects.object_stream(store)
    info = await ObjectStore(name=store, stream=stream, js=bus.js).get_info(NAME)
    sub = await bus.js.subscribe(OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=store, obj=info.nuid),
                                 ordered_consumer=True, idle_heartbeat=WATCH_HEARTBEAT,
                                 stream=stream)
    try:
        async for msg in sub.messages:
            write(msg.data)
            if msg.metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def measure(n: int, way: str, size: int, chunk: int, connections: int,
                  give_up: float) -> dict[str, Any]:
    from nats.js import api as js_api

    async with Broker(max_payload="1MB") as broker:
        admin = await Bus.connect(broker.url, FLEET, name="bench-fetch")
        clients: list[Bus] = []
        try:
            await admin.ensure_fleet(1, raise_existing=True)
            store = subjects.releases_store(FLEET)
            obs = await admin.js.object_store(store)
            await obs.put(NAME, os.urandom(size), meta=js_api.ObjectMeta(
                name=NAME, options=js_api.ObjectMetaOptions(max_chunk_size=chunk)))
            chunks = (await obs.get_info(NAME)).chunks
            for c in range(connections):
                clients.append(await Bus.connect(broker.url, FLEET, name=f"bench-fetch-{c}",
                                                 reconnect_forever=True))
            server = psutil.Process(broker.pid)
            me = psutil.Process()
            cpu0, mine0 = sum(server.cpu_times()[:2]), sum(me.cpu_times()[:2])
            peak = {"consumers": 0, "rss": 0}
            done: list[float] = []
            failed: list[str] = []
            started = time.perf_counter()

            async def fetch(i: int) -> None:
                bus = clients[i % connections]
                while True:
                    got = 0

                    def write(data: bytes) -> None:
                        nonlocal got
                        got += len(data)

                    try:
                        if way == "direct":
                            await bus.obj_get_into(store, NAME, write)
                        else:
                            await by_consumer(bus, store, write)
                    except Exception as exc:  # counted, then tried again
                        failed.append(type(exc).__name__)
                    else:
                        if got == size:
                            done.append(time.perf_counter() - started)
                            return
                        failed.append(f"{got} of {size} bytes")
                    await asyncio.sleep(FETCH_RETRY)

            sampler = asyncio.create_task(sample(broker, server, peak))
            tasks = [asyncio.create_task(fetch(i)) for i in range(n)]
            try:
                await asyncio.wait(tasks, timeout=give_up)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await stopped(sampler)
            waited = time.perf_counter() - started
            with contextlib.suppress(OSError, ValueError):  # what the last ones left standing
                peak["consumers"] = max(peak["consumers"],
                                        await asyncio.to_thread(consumers, broker))
            cpu = sum(server.cpu_times()[:2]) - cpu0
            mine = sum(me.cpu_times()[:2]) - mine0
        finally:
            for c in clients:
                await c.close()
            await admin.close()
    done.sort()
    return {
        "nodes": n, "way": way, "size": size, "chunks": chunks, "connections": connections,
        "done": len(done), "converged": len(done) == n, "waited_s": round(waited, 2),
        "last_s": round(done[-1], 2) if done else None,
        "p50_s": round(statistics.median(done), 2) if done else None,
        "failed_attempts": len(failed), "failures": sorted(set(failed))[:3],
        "server_cpu_s": round(cpu, 2), "peak_consumers": peak["consumers"],
        "clients_cpu_s": round(mine, 2),
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    if r["converged"]:
        done = f"the last {r['last_s']:.2f} s after they began (p50 {r['p50_s']:.2f} s)"
    else:
        done = (f"NOT ALL: {r['done']} of {r['nodes']} after {r['waited_s']:g} s"
                + (f" (p50 of those {r['p50_s']:.2f} s)" if r["p50_s"] is not None else ""))
    return [
        ("the fetch", f"{r['way']}: {r['size']} bytes in {r['chunks']} chunks, "
                      f"over {r['connections']} connections"),
        ("every fetch done", done),
        ("failed attempts", f"{r['failed_attempts']}"
                            + (f" ({', '.join(r['failures'])})" if r["failures"] else "")),
        ("nats-server", f"{r['server_cpu_s']:.2f} CPU-s, at most {r['peak_consumers']} "
                        "consumers"),
        ("the clients (this process)", f"{r['clients_cpu_s']:.2f} CPU-s"),
    ]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1000,10000,20000",
                    help="comma-separated fleet sizes (default 1000,10000,20000)")
    ap.add_argument("--size", type=int, default=12000, help="the object's bytes (default 12000)")
    ap.add_argument("--chunk", type=int, default=4096,
                    help="its chunk size in bytes (default 4096: three chunks)")
    ap.add_argument("--way", default=",".join(WAYS),
                    help=f"comma-separated, of {', '.join(WAYS)} (default both)")
    ap.add_argument("--connections", type=int, default=100,
                    help="clients the fetches are spread over (default 100)")
    ap.add_argument("--give-up", type=float, default=300.0,
                    help="seconds to stop waiting (default 300)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    ways = [w.strip() for w in args.way.split(",") if w.strip()]
    if not ways or any(w not in WAYS for w in ways):
        ap.error(f"--way takes {', '.join(WAYS)}, not {args.way!r}")
    if args.size <= args.chunk:
        ap.error("--size must be larger than --chunk: a one-chunk object is one message get "
                 "either way")
    logging.getLogger("fleetwave").setLevel(logging.ERROR)
    results = []
    for n in [int(x) for x in args.nodes.split(",") if x.strip()]:
        for way in ways:
            r = await measure(n, way, args.size, args.chunk, min(args.connections, n),
                              args.give_up)
            results.append(r)
            if not args.json:
                emit(False, f"{n} nodes fetch one release at once, one server", r, rows(r))
    if args.json:
        emit(True, "", {"fetches": results}, [])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main()))
