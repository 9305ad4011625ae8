"""Rollback benchmark: from the failing verdict to the last node converged back, N = 1,000
simulated nodes whose old slots are still warm.

Usage: python tests/perf/bench_rollback.py [--nodes 10000] [--json] [--brokers 1|3]
       [--max-payload 8MB] [--profile DIR]

A fresh broker, the real coordinator and ``fleetwave-agent --simulate N``. Every node is installed
with hello 1.0.0; then 2.0.0 goes out blue-green: staged on every node at weight 0, switched on
every node at once, the old slots kept warm. The switch wave has an error-rate gate, and simulated
nodes carry no traffic, so the gate cannot pass ("no data is never a pass"): the rollout pauses
inconclusive, with every node serving 2.0.0 and 1.0.0 warm beside it. We then ask for the
rollback (the API verb ``rollback``: what an operator, or ``--on-failure rollback`` after a failed
gate, triggers) and time it: to the ``bluegreen.switched_back`` event (every router back on the
old slot: what users feel) and to ``rollout.rolled_back`` (the new slots retired too), both from
the request and, from the coordinator's own event times, from ``rollout.rolling_back``.

Against two floors on the same broker (``perf_support.bus_floor``, one wave of N): N desired
writes in atomic batches answered by N observed puts from one bare nats-py responder (as the
one simulator process answers for every node), and the same with each state signed by the
writer (a signature a batch, a proof a state: ``protocol.signing.sign_batch``) and checked by the
responder: what no rollback can skip, on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import (
    Profile,
    SimFleet,
    bus_floor,
    cpu_seconds,
    emit,
    need_py_spy,
    print_top,
    rolling,
    servers_cpu_seconds,
)

from protocol import subjects
from protocol.messages import Gates, RollbackRequest, RolloutSpec


async def measure(n: int, brokers: int = 1, max_payload: str = "1MB",
                  profile: Path | None = None) -> dict[str, Any]:
    async with SimFleet(n, brokers=brokers, max_payload=max_payload) as fleet:
        rid, _ = await fleet.deploy(rolling("1.0.0"))
        ev, _ = await fleet.finish(rid, timeout=120 + n / 10)
        if ev.kind != "rollout.succeeded":
            raise RuntimeError(f"install of 1.0.0 ended {ev.kind}: {ev.message}")

        spec = RolloutSpec(service="hello", version="2.0.0", strategy="blue-green",
                           max_unavailable="100%", gates=Gates(max_error_rate=0.01),
                           scale_down_delay=600.0, progress_deadline=120.0)
        rid, _ = await fleet.deploy(spec)
        paused, _ = await fleet.finish(rid, timeout=120 + n / 10)
        if paused.kind != "rollout.paused":
            raise RuntimeError(f"blue-green 2.0.0 should pause inconclusive, ended {paused.kind}:"
                               f" {paused.message}")
        # (from the events, which the bench hears anyway)
        serving = len({e.node for e in fleet.tap.of(rid, "node.done")})

        assert fleet.coordinator.pid is not None and fleet.agent is not None
        sim_pid = fleet.agent.pid
        assert sim_pid is not None
        out = profile / f"rollback-coordinator-{n}.txt" if profile else None
        sim_out = profile / f"rollback-sim-agent-{n}.txt" if profile else None
        coordinator = fleet.coordinator.pid
        readings: dict[str, Callable[[], float]] = {
            "coordinator": lambda: cpu_seconds(coordinator),
            "sim": lambda: cpu_seconds(sim_pid), "server": lambda: servers_cpu_seconds(fleet)}
        async with Profile(coordinator, out), Profile(sim_pid, sim_out):
            cpu0 = {k: read() for k, read in readings.items()}
            sent = time.time()
            await fleet.api("rollback", RollbackRequest(service="hello"))
            switched = await fleet.tap.wait_for(rid, ("bluegreen.switched_back",), 120)
            cpu = {k: round(read() - cpu0[k], 3) for k, read in readings.items()}
        for raw in (out, sim_out):
            if raw is not None:
                print_top(raw)
        end = await fleet.tap.wait_for(
            rid, ("rollout.rolled_back", "rollout.failed", "rollout.aborted"), 120)
        ended, received = end.event, end.received
        if ended.kind != "rollout.rolled_back":
            raise RuntimeError(f"rollback ended {ended.kind}: {ended.message}")
        started = fleet.tap.of(rid, "rollout.rolling_back")[0].time
        restored = fleet.tap.of(rid, "node.rolled_back")
        assert fleet.bus is not None
        entry = await fleet.bus.kv_get(subjects.desired_bucket(fleet.fleet), "sim-1.hello")
        payload = len(entry.value) if entry is not None and entry.value else 600
        floor = await bus_floor(fleet.broker.url, n, 1, payload)
        signed_floor = await bus_floor(fleet.broker.url, n, 1, payload, signed=True)
        return {
            "nodes": n, "brokers": brokers, "max_payload": max_payload,
            "serving_new_before": serving, "nodes_rolled_back": len(restored),
            "decided_s": round(started - sent, 3),
            "switched_back_s": round(switched.received - sent, 3),
            "rolled_back_s": round(received - sent, 3),
            "engine_switched_back_s": round(switched.event.time - started, 3),
            # CPU seconds each kind of process used from the request to the switch back: the
            # simulator stands for every node's agent, in one process
            "cpu_s": cpu,
            # the nodes' own report times (the switch back's summary): the first and the last
            # router back, against when the engine saw the last one
            "first_back_s": _since(switched.event.data, started, first=True),
            "last_back_s": _since(switched.event.data, started),
            "engine_rolled_back_s": round(max(e.time for e in restored) - started, 3),
            # the same N writes answered by N observed puts, by bare nats-py (one responder
            # process standing for the agents, as the simulator does); then with each state
            # signed by the writer and verified by the responder
            "floor_s": round(floor, 3), "signed_floor_s": round(signed_floor, 3),
        }


def crypto_floor(n: int) -> dict[str, float]:
    """Seconds to sign ``n`` desired states as the coordinator does (``sign_batch``: one
    signature a batch of ``FENCED_BATCH``, encoded) and to decode and verify them as agents do
    (leaf and proof each, a batch's signature once), in this process: the work a rollback of
    ``n`` nodes cannot skip, which in this benchmark one coordinator and one simulator
    process do on this machine's cores (on a real fleet each node verifies its own)."""
    from protocol.bus import FENCED_BATCH
    from protocol.codec import decode, encode
    from protocol.messages import DesiredState, ReleaseRef, SignedEnvelope
    from protocol.signing import generate_seed, public_key, sign_batch, verify

    seed = generate_seed()
    trusted = {public_key(seed)}
    ref = ReleaseRef(service="hello", version="1.0.0", digest="d" * 64)
    states = [DesiredState(fleet="default", node=f"sim-{i}", service="hello", generation=5,
                           slots={"a": ref, "b": ref}, weights={"a": 100, "b": 0})
              for i in range(1, n + 1)]
    started = time.perf_counter()
    bodies = [encode(env) for i in range(0, n, FENCED_BATCH)
              for env in sign_batch(seed, states[i:i + FENCED_BATCH], term=3)]
    signed = time.perf_counter() - started
    started = time.perf_counter()
    for d, body in zip(states, bodies, strict=True):
        verify(decode(SignedEnvelope, body), trusted, fleet="default", node=d.node,
               service="hello", min_generation=4, min_term=3)
    verified = time.perf_counter() - started
    return {"sign_s": round(signed, 3), "verify_s": round(verified, 3)}


def _ratio(ours: float | None, floor: float) -> str:
    return f"{ours / floor:.2f}x" if ours is not None and floor > 0 else "-"


def _since(data: dict[str, Any], started: float, *, first: bool = False) -> float | None:
    """Seconds from the decision to the first (or last) node's router back, from the switch
    back's summary (``lag``: last - decided; ``spread``: last - first)."""
    lag, spread = data.get("lag"), data.get("spread")
    if lag is None:
        return None
    at = data.get("at", started)
    last = at + lag
    return round((last - spread if first and spread is not None else last) - started, 3)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--brokers", type=int, default=1, choices=(1, 3),
                    help="one server (R1) or a 3-server cluster (R3)")
    ap.add_argument("--max-payload", default="8MB",
                    help="the servers' max_payload (default 8MB: a blue-green's record head "
                         "names every node's switch, and at 10,000 nodes it is above "
                         "nats-server's own default, 1MB, which refuses the deploy in one line)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="py-spy record the coordinator and the simulated agents from the "
                         "rollback's request to every router switched back, into DIR")
    args = ap.parse_args()
    need_py_spy(args.profile, "bench_rollback.py")
    r = await measure(args.nodes, args.brokers, args.max_payload, args.profile)
    r["crypto_floor"] = crypto_floor(args.nodes)
    emit(args.json, f"rollback of {r['nodes_rolled_back']} simulated nodes with warm old slots "
         f"({r['serving_new_before']} were serving 2.0.0)", r, [
             ("request -> rollback decided", f"{r['decided_s']:.3f} s"),
             ("request -> every router switched back", f"{r['switched_back_s']:.3f} s"),
             ("request -> rolled back (new slots retired)", f"{r['rolled_back_s']:.3f} s"),
             ("decided -> every router switched back", f"{r['engine_switched_back_s']:.3f} s"),
             ("decided -> first / last node reports it is back",
              f"{r['first_back_s']} / {r['last_back_s']} s"),
             ("CPU, request -> switched back", f"coordinator {r['cpu_s']['coordinator']:.2f} s, "
              f"simulated agents (one process) {r['cpu_s']['sim']:.2f} s, nats-server "
              f"{r['cpu_s']['server']:.2f} s"),
             ("decided -> last node.rolled_back", f"{r['engine_rolled_back_s']:.3f} s"),
             (f"signing / verifying {r['nodes']} states, in process",
              f"{r['crypto_floor']['sign_s']:.3f} / {r['crypto_floor']['verify_s']:.3f} s"),
             ("bus floor: N writes, N observed answers",
              f"{r['floor_s']:.3f} s (decided -> last node back / it: "
              f"{_ratio(r['last_back_s'], r['floor_s'])})"),
             ("signed floor: the same, signed and verified",
              f"{r['signed_floor_s']:.3f} s (decided -> last node back / it: "
              f"{_ratio(r['last_back_s'], r['signed_floor_s'])})")])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
