"""Fan-out benchmark: from ``deploy`` to every node having received its desired state.

Usage: python tests/perf/bench_fanout.py [--nodes 1000] [--json]

A fresh broker, the real coordinator and ``fleetwave-agent --simulate N``; every node is installed
with hello 1.0.0, then 2.0.0 is deployed in ONE wave of 100% (max-unavailable 100%), so that the
coordinator writes every node's desired state at once. A watcher of its own in this process (one
KV watch on the desired bucket, the same path an agent's watch takes) notes when each node's new
desired state arrives; the latency of a node is that time minus the moment the deploy request was
sent. Printed: p50, p99 and max over the nodes, and the time the deploy request took to answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import SimFleet, emit, rolling

from protocol import subjects
from protocol.codec import decode
from protocol.messages import DesiredState, SignedEnvelope


def pct(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0-1) of already sorted values, nearest rank."""
    i = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


async def measure(n: int) -> dict[str, Any]:
    async with SimFleet(n) as fleet:
        assert fleet.bus is not None
        rid, _ = await fleet.deploy(rolling("1.0.0"))
        ev, _ = await fleet.finish(rid, timeout=120 + n / 10)
        if ev.kind != "rollout.succeeded":
            raise RuntimeError(f"install of 1.0.0 ended {ev.kind}: {ev.message}")

        arrived: dict[tuple[str, str], float] = {}  # (rollout, node) -> first seen
        count: dict[str, int] = {}
        synced = asyncio.Event()
        progress = asyncio.Event()

        async def watch() -> None:
            assert fleet.bus is not None
            async for entry in fleet.bus.watch(subjects.desired_bucket(fleet.fleet), ">"):
                if entry is None:
                    synced.set()
                    continue
                if entry.value is None or not synced.is_set():
                    continue
                desired = decode(DesiredState, decode(SignedEnvelope, entry.value).payload)
                key = (desired.rollout, desired.node)
                if key not in arrived:
                    arrived[key] = time.time()
                    count[desired.rollout] = count.get(desired.rollout, 0) + 1
                    progress.set()

        watcher = asyncio.create_task(watch())
        try:
            async with asyncio.timeout(30):
                await synced.wait()
            sent = time.time()
            rid, _ = await fleet.deploy(rolling("2.0.0", batch="100%"))
            answered = time.time() - sent
            deadline = time.monotonic() + 120
            while count.get(rid, 0) < n:
                progress.clear()
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    await progress.wait()
        finally:
            watcher.cancel()
        lat = sorted(t - sent for (r, _), t in arrived.items() if r == rid)
        lat = sorted(t - sent for t in arrived.values())
        await fleet.finish(rid, timeout=120 + n / 10)
        return {"nodes": n, "p50_s": round(pct(lat, 0.5), 3), "p99_s": round(pct(lat, 0.99), 3),
                "max_s": round(lat[-1], 3), "deploy_answered_s": round(answered, 3)}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = await measure(args.nodes)
    emit(args.json, f"fan-out of one wave to {args.nodes} simulated nodes (deploy -> desired "
         "state seen on the node's watch)", r, [
             ("p50", f"{r['p50_s']:.3f} s"), ("p99", f"{r['p99_s']:.3f} s"),
             ("max", f"{r['max_s']:.3f} s"),
             ("deploy request answered", f"{r['deploy_answered_s']:.3f} s")])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
