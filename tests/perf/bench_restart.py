"""A broker restart under a fleet: how long until every agent's watch is back, and the server's
cost meanwhile.

Usage: python tests/perf/bench_restart.py [--nodes 1000,10000] [--rate 500,0]
       [--connections 100] [--give-up 300] [--cold [--waited | --leader]] [--json]

Every agent watches its keys of the fleet's desired bucket (``agent.manager.desired``); when
its client reconnects after the broker's restart, the watch's consumer must be made again on
the server. For each N and each rate: a fresh server (R1, file storage, ``sync_interval:
always``, the server's default 1 MB ``max_payload``), the fleet's buckets as the coordinator
makes them, N signed desired states (one key a node, ``node-<i>.hello``), then N watches of one
node's keys each through ``Bus.watch`` (the agent's own call, with the idle heartbeat and the
spread the fleet's agents take from its size), over ``--connections`` clients (each reconnects
on its own, with the agents' jittered backoff). Once every watch has delivered its first full
read, the server is killed (SIGKILL) and started again on the same store and port. Timed from
the kill: each watch's next full read (the agent's watch is back: a new desired state reaches
it again). ``--rate`` is the fleet's watch restarts a second (``restart_spread``: a watch waits
a random moment within N / rate seconds after its reconnect); 0 is every watch at once, as
before session 27.

``--cold``: no restart; every watch starts at once on the fresh server (a fleet's cold start:
agents started together after a power cut, each remembering the fleet's size from its state
file, so a failed start is retried within the spread), timed to each first full read;
``--waited``: each agent waited for the server at its start (the broker down too at a power
cut), so its first watch starts within the spread (``Bus.waited``). ``--leader``: a real
coordinator leads the fleet (it knows the N nodes from the nodes bucket, as one that ran
before), and each agent, as ``agent.manager.desired`` does in a fleet that large, registers,
waits for the leader's pace (at most ``FIRST_PACE_WAIT``) and starts its first watch within the
spread if the pace says a burst of registrations is under way (``Pace.burst``: the leader's
``core.reconnects``), at once if not: a fleet-wide restart with the broker and the leader up.

Figures: the last watch back (and p50 / p99), or how many were back when ``--give-up`` seconds
had passed (and the p50 of those); all from the kill (the server's start, ~0.1 s, included:
clients may reconnect before it reports ready); nats-server's CPU and peak RSS from its restart
to the last watch back (or the give-up), and its CPU a watch; the consumers the server held at
the most (its ``/jsz``, every 0.5 s: a watch's start that timed out and was tried again leaves
a consumer behind); this process's CPU (it plays the N agents' clients on the same two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reread import FLEET, fleet_of
from perf_support import emit, poll, run_dir, run_main

from agent.manager.desired import watch_heartbeat
from agent.manager.service import FIRST_PACE_WAIT
from coordinator.dev.broker import Broker
from coordinator.dev.devfleet import Child, python_module
from coordinator.runtime.keyfile import coordinator_seed
from protocol import subjects
from protocol.bus import WATCH_RESTART_RATE, Bus
from protocol.codec import decode, encode
from protocol.messages import ApiReply, NodeInfo, NodesRequest, Pace

FIRST_READ = 600.0  # seconds for every watch's first full read, before the restart
TEARDOWN = 10.0  # seconds for the watch tasks to end once cancelled, or once their client closed


def consumers(broker: Broker) -> int:
    """The consumers the server holds now (its monitoring endpoint)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.monitor_port}/jsz",
                                timeout=2) as answer:
        return int(json.load(answer).get("consumers", 0))


async def leading(broker: Broker, admin: Bus, n: int, work: Path) -> Child:
    """A coordinator leading the fleet, which knows its N nodes (their registrations in the
    nodes bucket, as a fleet that ran before leaves them), once it answers."""
    bucket = subjects.nodes_bucket(FLEET)
    for start in range(0, n, 500):
        await asyncio.gather(*(admin.kv_put(bucket, f"node-{i}", encode(NodeInfo(id=f"node-{i}")))
                               for i in range(start, min(n, start + 500))))
    key = work / "coordinator.seed"
    await asyncio.to_thread(coordinator_seed, key)
    child = Child("coordinator", python_module(
        "coordinator.daemon", "--nats", broker.url, "--fleet", FLEET, "coordinator",
        "--key-file", str(key)), work / "coordinator.log")
    await child.start()

    async def answers() -> bool:
        with contextlib.suppress(Exception):
            raw = await admin.request(subjects.api(FLEET, "bench", "nodes"),
                                      encode(NodesRequest(max_nodes=1)), timeout=2)
            return decode(ApiReply, raw).ok
        return False

    # And once it has resumed its rollouts: its pace then says which services it reads
    # (``reading``, None before), at once. Heard by the clients that subscribe just before the
    # agents start, that pace would be their first, said before any agent registered: "no
    # burst" to every one of them (session 34: all 20,000 watched at once, though the leader
    # said the burst 0.07 s after their first registration).
    resumed = asyncio.Event()

    async def on_pace(_s: str, data: bytes) -> None:
        if decode(Pace, data).reading is not None:
            resumed.set()

    sub = await admin.subscribe(subjects.pace(FLEET), on_pace)
    try:
        await poll(answers, bool, timeout=60, what=f"the coordinator to answer (see {work})",
                   interval=0.2)
        async with asyncio.timeout(60):
            await resumed.wait()
    except BaseException:
        await child.stop()
        raise
    finally:
        await admin.unsubscribe(sub)
    return child


async def measure(n: int, rate: float, connections: int, give_up: float, *,
                  cold: bool = False, waited: bool = False, leader: bool = False,
                  work: Path | None = None) -> dict[str, Any]:
    """The restart (or, ``cold``, the fleet's first start: every watch at once, each agent
    remembering the fleet's size; ``waited``: each agent waited for the server at its start,
    so its first watch starts within the spread; ``leader``: a coordinator leads, and each
    agent waits for its pace and spreads its first watch in a burst) and its figures."""
    spread = n / rate if rate > 0 else 0.0
    heartbeat = watch_heartbeat(n)  # as the fleet's agents ask, once they have heard its size
    async with Broker(max_payload="1MB") as broker:
        admin = await Bus.connect(broker.url, FLEET, name="bench-restart")
        clients: list[Bus] = []
        tasks: list[asyncio.Task[None]] = []
        coordinator: Child | None = None
        heard: list[dict[str, Any]] = []  # per client: its first pace after the start
        try:
            await fleet_of(admin, n)
            if leader:
                assert work is not None
                coordinator = await leading(broker, admin, n, work)
            bucket = subjects.desired_bucket(FLEET)
            for c in range(connections):  # as agents connect: reconnecting with their backoff
                clients.append(await Bus.connect(broker.url, FLEET, name=f"bench-restart-{c}",
                                                 reconnect_forever=True))
                clients[-1].blind = True  # as agents bind their buckets (``agent.daemon``)
                clients[-1].waited = waited  # as if its first connect had waited
            reads = [0] * n  # full reads each watch has delivered
            back = [0.0] * n  # when each watch's second full read came (time.monotonic)
            first = [0.0] * n  # and its first
            changed = asyncio.Event()

            async def watch(i: int) -> None:
                bus = clients[i % connections]
                async for entry in bus.watch(bucket, subjects.node_keys(f"node-{i}"),
                                             heartbeat=lambda: heartbeat,
                                             spread=lambda: spread):
                    if entry is None:
                        reads[i] += 1
                        if reads[i] == 1:
                            first[i] = time.monotonic()
                        if reads[i] == 2:
                            back[i] = time.monotonic()
                        changed.set()

            async def until(done: Any, timeout: float) -> bool:
                deadline = time.monotonic() + timeout
                while not done():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(left, 1.0)):
                            await changed.wait()
                return True

            me = psutil.Process()
            peak = {"consumers": 0, "rss": 0}
            if cold and leader:
                # Each client hears the leader's pace; its agents register at once, then each
                # waits for the first pace its client hears (at most FIRST_PACE_WAIT) and starts
                # its first watch within the spread if it said a burst (``Bus.crowded``).
                for bus in clients:
                    state: dict[str, Any] = {"event": asyncio.Event(), "pace": None, "at": 0.0}
                    heard.append(state)

                    async def on_pace(_s: str, data: bytes, state: dict[str, Any] = state) -> None:
                        if state["pace"] is None:
                            state["pace"], state["at"] = decode(Pace, data), time.monotonic()
                            state["event"].set()

                    await bus.subscribe(subjects.pace(FLEET), on_pace)

                async def agent(i: int) -> None:
                    bus, state = clients[i % connections], heard[i % connections]
                    await bus.publish(subjects.register(FLEET, f"node-{i}"),
                                      encode(NodeInfo(id=f"node-{i}")))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(FIRST_PACE_WAIT):
                            await state["event"].wait()
                    if state["pace"] is not None and state["pace"].burst:
                        bus.crowded = True
                    await watch(i)

                started = time.monotonic()
                tasks.extend(asyncio.create_task(agent(i)) for i in range(n))
                reads_wanted, times = 1, first
            elif cold:  # timed from the fleet's first watches, all at once, to each first read
                started = time.monotonic()
                tasks.extend(asyncio.create_task(watch(i)) for i in range(n))
                reads_wanted, times = 1, first
            else:  # the fleet's first watches paced, then timed from the kill to each next read
                for i in range(n):
                    tasks.append(asyncio.create_task(watch(i)))
                    if i % 500 == 499:  # the fleet's first watches, not a storm of their own
                        await asyncio.sleep(0.2)
                if not await until(lambda: min(reads) >= 1, FIRST_READ):
                    raise RuntimeError(f"{reads.count(0)} of {n} watches had no first full "
                                       f"read within {FIRST_READ:g}s")
                await broker.kill()
                started = time.monotonic()  # clients may be back before the server is ready
                await broker.start()
                reads_wanted, times = 2, back
            server = psutil.Process(broker.pid)
            cpu0, mine0 = sum(server.cpu_times()[:2]), sum(me.cpu_times()[:2])
            sampler = asyncio.create_task(sample(broker, server, peak))
            try:
                converged = await until(lambda: min(reads) >= reads_wanted, give_up)
            finally:
                await stopped(sampler)
            out = figures(n, rate, spread, connections, converged, started,
                          [t for t in times if t], time.monotonic() - started,
                          sum(server.cpu_times()[:2]) - cpu0, sum(me.cpu_times()[:2]) - mine0,
                          peak, cold=cold, waited=waited)
            if leader:
                paces = [h for h in heard if h["pace"] is not None]
                out |= {
                    "leader": True,
                    "clients_paced": len(paces),
                    "clients_told_burst": sum(1 for h in paces if h["pace"].burst),
                    "first_pace_s": round(min(h["at"] for h in paces) - started, 2)
                    if paces else None,
                    "last_first_pace_s": round(max(h["at"] for h in paces) - started, 2)
                    if paces else None,
                }
            return out
        finally:
            # Bounded: a watch's start waits on nats-py's requests, whose asyncio.wait_for can
            # drop a cancel that arrives with the answer on Python 3.11 (gh-86296), and such a
            # task runs on; session 34's --cold --leader run at 20,000 waited here for ever.
            # Closing its client ends it; what still runs after that is cancelled again.
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=TEARDOWN)
            await asyncio.gather(*(bus.close(drain=False) for bus in clients),
                                 return_exceptions=True)
            if left := [t for t in tasks if not t.done()]:
                for t in left:
                    t.cancel()
                await asyncio.wait(left, timeout=TEARDOWN)
                if stuck := sum(not t.done() for t in left):
                    print(f"{stuck} watch tasks did not stop; left behind", file=sys.stderr)
            await admin.close()
            if coordinator is not None:
                await coordinator.stop()


async def sample(broker: Broker, server: psutil.Process, peak: dict[str, int]) -> None:
    """The server's consumers and RSS at their most, every 0.5 s, until cancelled."""
    while True:
        with contextlib.suppress(OSError, ValueError):
            peak["consumers"] = max(peak["consumers"], await asyncio.to_thread(consumers, broker))
        with contextlib.suppress(psutil.Error):
            peak["rss"] = max(peak["rss"], server.memory_info().rss)
        await asyncio.sleep(0.5)


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def figures(n: int, rate: float, spread: float, connections: int, converged: bool,
            started: float, times: list[float], wall: float, server_cpu: float, mine: float,
            peak: dict[str, int], *, cold: bool = False,
            waited: bool = False) -> dict[str, Any]:
    delays = sorted(t - started for t in times)
    came = len(delays)
    return {
        "nodes": n, "rate": rate, "spread_s": round(spread, 2), "connections": connections,
        "cold": cold, "waited": waited, "converged": converged, "back": came,
        "last_s": round(delays[-1], 2) if converged and delays else None,
        "p50_s": round(statistics.median(delays), 2) if delays else None,
        "p99_s": round(delays[max(0, math.ceil(0.99 * came) - 1)], 2) if delays else None,
        "waited_s": round(wall, 1),
        "server_cpu_s": round(server_cpu, 2),
        "server_ms_per_watch": round(server_cpu / max(1, came) * 1e3, 3),
        "server_peak_rss_mib": round(peak["rss"] / 2**20, 1),
        "peak_consumers": peak["consumers"],
        "clients_cpu_s": round(mine, 2),
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    how = (f"within {r['spread_s']:g} s ({r['rate']:g} a second)" if r["rate"]
           else "all at once")
    if r.get("leader"):
        how = (f"each after the leader's first pace (at most {FIRST_PACE_WAIT:g} s): {how} "
               "if it said a burst, at once if not")
    elif r["cold"] and r["waited"]:
        how = f"{how}: the agents waited for the server (a power cut), as after a restart"
    elif r["cold"]:
        how = f"all at once (a cold start); a failed start retried {how}"
    since = "they began" if r["cold"] else "the restart"
    if r["converged"]:
        back = (f"the last {r['last_s']:.2f} s after {since} (p50 {r['p50_s']:.2f} s, "
                f"p99 {r['p99_s']:.2f} s)")
    else:
        back = (f"NOT ALL: {r['back']} of {r['nodes']} after {r['waited_s']:g} s"
                + (f" (p50 of those back {r['p50_s']:.2f} s)" if r["p50_s"] is not None
                   else ""))
    told = []
    if r.get("leader"):
        told = [("the leader's pace", f"heard by {r['clients_paced']} of {r['connections']} "
                 f"clients, first {r['first_pace_s']} s after the start, the last client's "
                 f"first {r['last_first_pace_s']} s; a burst said in "
                 f"{r['clients_told_burst']} of them")]
    return [
        ("watches started" if r["cold"] else "watches restarted", how), *told,
        ("every first full read" if r["cold"] else "every watch back", back),
        ("nats-server", f"{r['server_cpu_s']:.2f} CPU-s ({r['server_ms_per_watch']:.3f} ms a "
                        f"watch back), peak RSS {r['server_peak_rss_mib']:.1f} MiB, at most "
                        f"{r['peak_consumers']} consumers"),
        ("the clients (this process)",
         f"{r['clients_cpu_s']:.2f} CPU-s over {r['connections']} connections"),
    ]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1000,10000",
                    help="comma-separated fleet sizes (default 1000,10000)")
    ap.add_argument("--rate", default=f"{WATCH_RESTART_RATE:g},0",
                    help="comma-separated watch restarts a second to measure at each size; 0 "
                         f"is all at once (default {WATCH_RESTART_RATE:g},0: the agents' rate, "
                         "then none)")
    ap.add_argument("--connections", type=int, default=100,
                    help="clients the watches are spread over (default 100)")
    ap.add_argument("--give-up", type=float, default=300.0,
                    help="seconds after the restart to stop waiting (default 300)")
    ap.add_argument("--cold", action="store_true",
                    help="no restart: every watch's first start at once (a fleet's cold start, "
                         "each agent remembering the fleet's size), timed to its first full "
                         "read")
    ap.add_argument("--waited", action="store_true",
                    help="with --cold: the agents waited for the server at their start (a "
                         "power cut), so each first watch starts within the spread")
    ap.add_argument("--leader", action="store_true",
                    help="with --cold: a coordinator leads the fleet, and each agent waits for "
                         "its pace before its first watch, spreading it if the pace says a "
                         "burst of registrations is under way (the broker and leader up)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    if args.waited and not args.cold:
        ap.error("--waited goes with --cold")
    if args.leader and (not args.cold or args.waited):
        ap.error("--leader goes with --cold, without --waited")
    logging.getLogger("fleetwave").setLevel(logging.ERROR)  # a client's reconnect, N times
    results = []
    for n in [int(x) for x in args.nodes.split(",") if x.strip()]:
        for rate in [float(x) for x in args.rate.split(",") if x.strip()]:
            with run_dir("bench-restart") as work:
                r = await measure(n, rate, min(args.connections, n), args.give_up,
                                  cold=args.cold, waited=args.waited, leader=args.leader,
                                  work=work)
            results.append(r)
            if not args.json:
                emit(False, f"{n} agents' watches start at once, one server" if args.cold
                     else f"a broker restart under {n} agents' watches, one server", r, rows(r))
    if args.json:
        emit(True, "", {"restarts": results}, [])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main()))
