"""What a fleet at rest costs the control plane through its agents' observed reports.

Usage: python tests/perf/bench_rest.py [--nodes 10000] [--seconds 15] [--rollout] [--json]

Every agent reads its router's counters every 2 s and reports them in its observed state; a read
is stamped with its time, so before session 25 every read was a new report: N agents with one
service each sent N / 2 reports a second at rest, into the observed bucket and the coordinator's
watch. Agents now send reports that carry only new counters (and the periodic report of an
unchanged state) at most once a paced heartbeat interval (``agent.manager.observed``): at rest
the coordinator takes as many reports a second as heartbeats (``--max-heartbeats-per-second``,
2,000 by default), whatever the fleet's size; a service a rollout judges still reports every
read.

For N simulated nodes (a fresh broker, the real coordinator, ``fleetwave-agent --simulate N``,
hello 1.0.0 installed everywhere), this script writes the reports N real agents would send, at
each policy's rate, for ``--seconds``, with router counters that change at every report, and
measures the coordinator's and nats-server's CPU (user + system over the wall time, in % of one
core), beside the coordinator idle. The rates are the policies' arithmetic (``report_gaps``), the
costs are measured. With ``--rollout``: a rolling rollout of the N nodes to 2.0.0 (10 % waves, no
bake), alone and under each policy's reports (written for a second service on the same nodes, so
that they are the coordinator's work to take in, not the rollout's states), its time from the
request to ``rollout.succeeded``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import SimFleet, cpu_seconds, emit, rolling, run_main, servers_cpu_seconds

from agent.manager.observed import report_gaps
from agent.manager.service import STATS_EVERY
from coordinator.core import pace
from protocol import subjects
from protocol.codec import decode, encode
from protocol.messages import ObservedState
from protocol.testing import router_stats

TICK = 0.1  # the writer's period: a tenth of a second's reports pipelined at a time
OTHER = "metrics"  # the second service the reports go to during a rollout


def rates(n: int) -> dict[str, float]:
    """Reports a second from N agents at rest, one service each: before (every read) and now
    (the leader's default pace)."""
    counters, _ = report_gaps(pace.interval(n, pace.DEFAULT_RATE))
    return {"every_read": n / STATS_EVERY, "paced": n / max(STATS_EVERY, counters)}


class Reporter:
    """Writes observed reports for the fleet's nodes at a given rate, counters moving."""

    def __init__(self, fleet: SimFleet, base: dict[str, ObservedState], service: str) -> None:
        self.fleet = fleet
        self.bucket = subjects.observed_bucket(fleet.fleet)
        self.nodes = sorted(base)
        self.base = base
        self.service = service
        self.sent = 0
        self.failed = 0
        self._i = 0

    async def run(self, rate: float, seconds: float) -> float:
        """Report at ``rate`` a second for ``seconds``; the rate achieved."""
        assert self.fleet.bus is not None
        per_tick = max(1, round(rate * TICK))
        started = due = time.monotonic()
        sent = 0
        while time.monotonic() - started < seconds:
            writes = []
            for _ in range(per_tick):
                node = self.nodes[self._i % len(self.nodes)]
                self._i += 1
                obs = self.base[node]
                obs.router = router_stats(1.0, time.time(), a=(self._i, 0, 3))
                obs.time = time.time()
                writes.append((f"{obs.node}.{self.service}", encode(obs)))
            got = await self.fleet.bus.kv_put_all(self.bucket, writes)
            self.failed += sum(not isinstance(g, int) for g in got)
            sent += len(writes)
            due += TICK
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        self.sent += sent
        return sent / (time.monotonic() - started)


async def cpu_over(fleet: SimFleet, work: Any) -> tuple[Any, float, float, float]:
    """Run ``work``; its result, the wall time, the coordinator's and the servers' CPU in % of
    a core over it."""
    pid = fleet.coordinator.pid
    assert pid is not None
    c0, s0, t0 = cpu_seconds(pid), servers_cpu_seconds(fleet), time.monotonic()
    result = await work
    wall = time.monotonic() - t0
    return (result, wall, (cpu_seconds(pid) - c0) / wall * 100,
            (servers_cpu_seconds(fleet) - s0) / wall * 100)


async def quiet(fleet: SimFleet, *, below: float = 20.0, timeout: float = 30.0) -> None:
    """Return once the coordinator spends under ``below`` % of a core over half a second
    (RuntimeError after ``timeout``): what is measured next is it at rest."""
    deadline = time.monotonic() + timeout
    while True:
        _, _, coordinator, _ = await cpu_over(fleet, asyncio.sleep(0.5))
        if coordinator < below:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator did not come to rest within {timeout:g} s "
                               f"({coordinator:.0f} % of a core)")


async def measure(n: int, seconds: float, with_rollout: bool) -> dict[str, Any]:
    async with SimFleet(n, max_payload="1MB") as fleet:
        assert fleet.bus is not None
        rid, _ = await fleet.deploy(rolling("1.0.0"))
        ev, _ = await fleet.finish(rid, timeout=120 + n / 10)
        if ev.kind != "rollout.succeeded":
            raise RuntimeError(f"install of 1.0.0 ended {ev.kind}: {ev.message}")
        entries = await fleet.bus.kv_entries(subjects.observed_bucket(fleet.fleet))
        base = {e.key.split(".", 1)[0]: decode(ObservedState, e.value) for e in entries
                if e.value is not None}
        if len(base) != n:
            raise RuntimeError(f"{len(base)} observed states after the install, not {n}")
        await quiet(fleet)  # the install's tail (events, its last writes) done
        _, _, idle, idle_server = await cpu_over(fleet, asyncio.sleep(seconds))
        out: dict[str, Any] = {"nodes": n, "seconds": seconds,
                               "idle_coordinator_pct": round(idle, 1),
                               "idle_server_pct": round(idle_server, 1)}
        reporter = Reporter(fleet, base, "hello")
        for policy, rate in rates(n).items():
            achieved, _, coord, server = await cpu_over(fleet, reporter.run(rate, seconds))
            out[policy] = {"rate": round(rate), "achieved": round(achieved),
                           "coordinator_pct": round(coord, 1), "server_pct": round(server, 1)}
        if with_rollout:
            other = Reporter(fleet, base, OTHER)
            runs = (("alone", 0.0), *rates(n).items())
            for (policy, rate), target in zip(runs, ("2.0.0", "1.0.0", "2.0.0"), strict=True):
                rid, sent = await fleet.deploy(rolling(target))
                background = (asyncio.create_task(other.run(rate, 3600.0)) if rate else None)
                try:
                    (ev, received), _, coord, _ = await cpu_over(
                        fleet, fleet.finish(rid, timeout=120 + n / 10))
                finally:
                    if background is not None:
                        background.cancel()
                        await asyncio.gather(background, return_exceptions=True)
                if ev.kind != "rollout.succeeded":
                    raise RuntimeError(f"rollout to {target} ended {ev.kind}: {ev.message}")
                out[f"rollout_{policy}"] = {"rate": round(rate),
                                            "total_s": round(received - sent, 2),
                                            "coordinator_pct": round(coord, 1)}
        if reporter.failed:
            raise RuntimeError(f"{reporter.failed} report writes failed")
        return out


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("coordinator idle", f"{r['idle_coordinator_pct']:.1f} % of a core (server "
                                f"{r['idle_server_pct']:.1f} %)")]
    for policy, what in (("every_read", "every read (before)"), ("paced", "paced (now)")):
        p = r[policy]
        out.append((f"reports {what}", f"{p['rate']}/s ({p['achieved']}/s written): "
                                       f"coordinator {p['coordinator_pct']:.1f} %, server "
                                       f"{p['server_pct']:.1f} % of a core"))
    for policy, what in (("alone", "alone"), ("every_read", "under every-read reports"),
                         ("paced", "under paced reports")):
        p = r.get(f"rollout_{policy}")
        if p is not None:
            out.append((f"rollout {what}", f"{p['total_s']:.2f} s (reports {p['rate']}/s), "
                                           f"coordinator {p['coordinator_pct']:.1f} %"))
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=15.0, help="measured at each rate")
    ap.add_argument("--rollout", action="store_true",
                    help="also time a rolling rollout alone and under each policy's reports")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    r = await measure(args.nodes, args.seconds, args.rollout)
    emit(args.json, f"a fleet of {args.nodes} simulated nodes at rest: agents' observed reports",
         r, rows(r))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main()))
