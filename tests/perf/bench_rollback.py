"""Rollback benchmark: from the failing verdict to the last node converged back, N = 1,000
simulated nodes whose old slots are still warm.

Usage: python tests/perf/bench_rollback.py [--nodes 10000] [--json] [--brokers 1|3]
       [--max-payload 1MB]

A fresh broker, the real coordinator and ``fleetwave-agent --simulate N``. Every node is installed
with hello 1.0.0; then 2.0.0 goes out blue-green: staged on every node at weight 0, switched on
every node at once, the old slots kept warm. The switch wave has an error-rate gate, and simulated
nodes carry no traffic, so the gate cannot pass ("no data is never a pass"): the rollout pauses
inconclusive, with every node serving 2.0.0 and 1.0.0 warm beside it. We then ask for the
rollback (the API verb ``rollback``: what an operator, or ``--on-failure rollback`` after a failed
gate, triggers) and time it: to the ``bluegreen.switched_back`` event (every router back on the
old slot: what users feel) and to ``rollout.rolled_back`` (the new slots retired too), both from
the request and, from the coordinator's own event times, from ``rollout.rolling_back``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_control_plane import heartbeat_for
from perf_support import SimFleet, emit, rolling

from protocol.messages import Gates, RollbackRequest, RolloutSpec


async def measure(n: int, brokers: int = 1, max_payload: str = "1MB") -> dict[str, Any]:
    async with SimFleet(n, brokers=brokers, max_payload=max_payload,
                        heartbeat=heartbeat_for(n)) as fleet:
        rid, _ = await fleet.deploy(rolling("1.0.0"))
        ev, _ = await fleet.finish(rid, timeout=120 + n / 10)
        if ev.kind != "rollout.succeeded":
            raise RuntimeError(f"install of 1.0.0 ended {ev.kind}: {ev.message}")

        spec = RolloutSpec(service="hello", version="2.0.0", strategy="blue-green", batch="100%",
                           max_unavailable="100%", gates=Gates(max_error_rate=0.01),
                           scale_down_delay=600.0, progress_deadline=120.0)
        rid, _ = await fleet.deploy(spec)
        paused, _ = await fleet.finish(rid, timeout=120 + n / 10)
        if paused.kind != "rollout.paused":
            raise RuntimeError(f"blue-green 2.0.0 should pause inconclusive, ended {paused.kind}:"
                               f" {paused.message}")
        # (from the events: the status answer, the whole record, is one message, past a 1 MB
        # max_payload beyond a few thousand nodes)
        serving = len({e.node for e in fleet.tap.of(rid, "node.done")})

        sent = time.time()
        await fleet.api("rollback", RollbackRequest(service="hello"))
        switched = await fleet.tap.wait_for(rid, ("bluegreen.switched_back",), 120)
        end = await fleet.tap.wait_for(
            rid, ("rollout.rolled_back", "rollout.failed", "rollout.aborted"), 120)
        ended, received = end.event, end.received
        if ended.kind != "rollout.rolled_back":
            raise RuntimeError(f"rollback ended {ended.kind}: {ended.message}")
        started = fleet.tap.of(rid, "rollout.rolling_back")[0].time
        restored = fleet.tap.of(rid, "node.rolled_back")
        return {
            "nodes": n, "brokers": brokers, "max_payload": max_payload,
            "serving_new_before": serving, "nodes_rolled_back": len(restored),
            "decided_s": round(started - sent, 3),
            "switched_back_s": round(switched.received - sent, 3),
            "rolled_back_s": round(received - sent, 3),
            "engine_switched_back_s": round(switched.event.time - started, 3),
            "engine_rolled_back_s": round(max(e.time for e in restored) - started, 3),
        }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--brokers", type=int, default=1, choices=(1, 3),
                    help="one server (R1) or a 3-server cluster (R3)")
    ap.add_argument("--max-payload", default="1MB",
                    help="the servers' max_payload (nats-server's default: 1MB)")
    args = ap.parse_args()
    r = await measure(args.nodes, args.brokers, args.max_payload)
    emit(args.json, f"rollback of {r['nodes_rolled_back']} simulated nodes with warm old slots "
         f"({r['serving_new_before']} were serving 2.0.0)", r, [
             ("request -> rollback decided", f"{r['decided_s']:.3f} s"),
             ("request -> every router switched back", f"{r['switched_back_s']:.3f} s"),
             ("request -> rolled back (new slots retired)", f"{r['rolled_back_s']:.3f} s"),
             ("decided -> every router switched back", f"{r['engine_switched_back_s']:.3f} s"),
             ("decided -> last node.rolled_back", f"{r['engine_rolled_back_s']:.3f} s")])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
