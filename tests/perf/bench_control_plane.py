"""Control-plane benchmark: rolling rollouts across N simulated nodes, against the bus floor.

Usage: python tests/perf/bench_control_plane.py [--nodes 1000,10000,50000] [--json] [--keep]
       [--profile DIR]   (py-spy record of the coordinator during the measured rollout)
       [--secure | --compare] [--brokers 1|3] [--max-payload 1MB]

For each N: a fresh broker, the real coordinator, and ``fleetwave-agent --simulate N``; every node
is first installed with hello 1.0.0, then rolled to 2.0.0 in waves of 10% (bake 0,
max-unavailable 10%): that second rollout is measured. Figures:

- total: from the deploy request to the ``rollout.succeeded`` event reaching us (it is emitted after
  the last desired write, including the retirement of the old slots);
- per wave: mean and max of ``wave.started`` → next ``wave.started`` (the last wave ends at the
  terminal event), from the coordinator's own event times;
- node-updates/s: N / total;
- coordinator CPU seconds during the rollout and its peak RSS (VmHWM, psutil/proc);
- the bus floor: the same desired writes and N observed replies in as many waves by bare nats-py
  on the same broker, with payloads of the size of our signed desired states, the desired writes
  as atomic batches (``perf_support.bus_floor``); ratio = ours ÷ floor;
- the signed floor: the same, with the desired states real ones, signed a batch at a time (one
  signature and a Merkle proof a state) as the coordinator signs them, and each verified by the
  responder before it answers, as each agent verifies its own: the work no implementation of
  signed desired states skips;
- reading it back, after the rollout: the API's ``nodes`` (every node), ``status`` (every node of
  the rollout) and ``status`` as ``fleetwave deploy`` follows it (200 node rows), each timed from
  request to the whole answer, with its size (answers past ``max_payload`` come in parts:
  ``protocol.chunks``).

``--brokers 3`` runs it all on a 3-server cluster (the fleet's streams R3) instead of one server
(R1); ``--max-payload`` is the servers' (default 1MB, nats-server's own default: rollout records
are split to fit it).

``--secure`` runs the same over TLS with nkey users (``fleetwave auth``: the broker with
``--auth``, the coordinator and this script with the coordinator's credentials; the simulated
agent, one connection standing for every node, with them too, so the nodes' per-node permission
sets are not what is measured, TLS and authenticated connections are). There is no floor then: its
bare client has no identity in a secure fleet. ``--compare`` runs each size plain, then secure,
and prints both with secure ÷ plain: the cost of TLS + auth, measured in one run (every other
size secure first: repeat a size, ``--nodes 1000,1000``, to see the order's share).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import (
    Profile,
    SimFleet,
    add_secure_flags,
    bus_floor,
    cpu_seconds,
    emit,
    need_py_spy,
    peak_rss_mb,
    print_top,
    ratio_rows,
    rolling,
    servers_cpu_seconds,
)

from coordinator.cli.rollout_cmds import FOLLOW_NODES
from coordinator.core import pace
from protocol import subjects
from protocol.codec import encode
from protocol.messages import NodesRequest, RolloutRequest


async def measure(n: int, keep: bool, profile: Path | None = None,
                  secure: bool = False, brokers: int = 1,
                  max_payload: str = "1MB") -> dict[str, Any]:
    async with SimFleet(n, keep=keep, secure=secure, brokers=brokers, max_payload=max_payload,
                        lease_ttl=lease_ttl_for(n)) as fleet:
        assert fleet.coordinator.pid is not None and fleet.bus is not None
        rid, _ = await fleet.deploy(rolling("1.0.0"))
        ev, _ = await fleet.finish(rid, timeout=120 + n / 10)
        if ev.kind != "rollout.succeeded":
            raise RuntimeError(f"install of 1.0.0 ended {ev.kind}: {ev.message}")

        pid = fleet.coordinator.pid
        desired_seq0 = await stream_seq(fleet, subjects.desired_bucket(fleet.fleet))
        out = profile / f"coordinator-{n}.txt" if profile else None
        sim_out = profile / f"sim-agent-{n}.txt" if profile else None
        sim_pid = fleet.agent.pid if fleet.agent is not None else None
        assert sim_pid is not None
        async with Profile(pid, out), Profile(sim_pid, sim_out):
            cpu0, sim_cpu0 = cpu_seconds(pid), cpu_seconds(sim_pid)
            server_cpu0 = servers_cpu_seconds(fleet)
            rid, sent = await fleet.deploy(rolling("2.0.0"))
            ev, received = await fleet.finish(rid, timeout=120 + n / 10)
            cpu, sim_cpu = cpu_seconds(pid) - cpu0, cpu_seconds(sim_pid) - sim_cpu0
            server_cpu = servers_cpu_seconds(fleet) - server_cpu0
        for raw in (out, sim_out):
            if raw is not None:
                print_top(raw)
        if ev.kind != "rollout.succeeded":
            raise RuntimeError(f"rollout to 2.0.0 ended {ev.kind}: {ev.message}")
        total = received - sent
        starts = sorted(e.time for e in fleet.tap.of(rid, "wave.started"))
        ends = [*starts[1:], ev.time]
        waves = [b - a for a, b in zip(starts, ends, strict=True)]
        updates = len(fleet.tap.of(rid, "node.updating"))
        if updates != n:
            raise RuntimeError(f"the rollout to 2.0.0 updated {updates} nodes, not {n}")

        reads = await read_back(fleet, rid)
        entry = await fleet.bus.kv_get(subjects.desired_bucket(fleet.fleet), "sim-1.hello")
        payload = len(entry.value) if entry is not None and entry.value else 600
        # The floor does as many desired writes as we did (forward waves plus the retirement of
        # the old slots at the end), in as many rounds, each answered by one observed write.
        written = await stream_seq(fleet, subjects.desired_bucket(fleet.fleet)) - desired_seq0
        floor = (None if secure else
                 await bus_floor(fleet.broker.url, written, len(starts) + 1, payload))
        # And the same writes as real states, signed a batch at a time as the coordinator
        # signs them and verified by the responder as each agent verifies its own: the work
        # that no implementation of signed desired states skips.
        signed_floor = (None if secure else
                        await bus_floor(fleet.broker.url, written, len(starts) + 1, payload,
                                        signed=True))
        return {
            "secure": secure, "brokers": brokers, "max_payload": max_payload,
            "nodes": n, "heartbeat_s": heartbeat_for(n), "lease_ttl_s": lease_ttl_for(n),
            "waves": len(starts),
            "node_updates": updates,
            "desired_writes": written,
            "total_s": round(total, 3),
            "wave_mean_s": round(sum(waves) / len(waves), 3) if waves else None,
            "wave_max_s": round(max(waves), 3) if waves else None,
            # Where the time outside the waves goes: from the request to wave 0's start (the
            # deploy: planning, the record's first write, the first wave's writes), and from
            # the success decision to its event read here (the old slots' retirement writes
            # and the events still queued before it). Decided times are the coordinator's
            # clock, the bench's the same machine's.
            "start_s": round(starts[0] - sent, 3) if starts else None,
            "tail_s": round(received - ev.time, 3),
            "node_updates_per_s": round(n / total, 1),
            "coordinator_cpu_s": round(cpu, 3), "sim_agent_cpu_s": round(sim_cpu, 3),
            "server_cpu_s": round(server_cpu, 3),
            # The CPU the three kinds of process used, spread over every core of this machine:
            # no schedule of that work finishes sooner (the bus floor does none of the signing,
            # verifying, deciding and event keeping).
            "cpu_floor_s": round((cpu + sim_cpu + server_cpu) / (os.cpu_count() or 1), 3),
            "coordinator_peak_rss_mb": round(peak_rss_mb(pid), 1),
            "desired_payload_bytes": payload,
            "floor_s": round(floor, 3) if floor is not None else None,
            "ratio_to_floor": round(total / floor, 2) if floor is not None else None,
            "signed_floor_s": round(signed_floor, 3) if signed_floor is not None else None,
            "ratio_to_signed_floor": (round(total / signed_floor, 2)
                                      if signed_floor is not None else None),
            **reads,
        }


async def read_back(fleet: SimFleet, rid: str) -> dict[str, Any]:
    """The time and size of each answer an operator reads of this fleet and rollout."""
    out: dict[str, Any] = {}
    for name, verb, request in (
            ("nodes", "nodes", NodesRequest()),
            ("status", "status", RolloutRequest(id=rid)),
            ("status_followed", "status", RolloutRequest(id=rid, max_nodes=FOLLOW_NODES))):
        start = time.perf_counter()
        data = await fleet.api(verb, request, timeout=120)
        out[f"{name}_s"] = round(time.perf_counter() - start, 3)
        out[f"{name}_bytes"] = len(encode(data))
    return out


def heartbeat_for(n: int) -> float:
    """How often each simulated node beats: the agent's default, 2 s, until the leader paces
    the fleet (``coordinator.core.pace``: 2,000 heartbeats a second at its default, so 5 s at
    10,000 nodes and 25 s at 50,000). Before the pace, this bench set these by hand: 50,000 nodes
    beating every 2 s are 25,000 messages a second into one Python process, and on this shared
    2-core machine it lost its lease by itself."""
    return max(2.0, pace.interval(n, pace.DEFAULT_RATE))


def lease_ttl_for(n: int) -> float:
    """The coordinator's ``--lease-ttl``: its default, 2 s, at every size, as an operator runs
    it. Until session 25 it was 10 s past 20,000 nodes: in session 9 one engine step at 50,000
    nodes (a working copy of every node's progress) plus a wave's signatures and page writes
    paused the loop 1-2 s, and the leader lost its lease to itself a dozen times a rollout; the
    engine's steps are O(changed nodes) since, and a run at 50,000 with 2 s kept its lease (the
    longest pause 1.0 s). A lost lease would show in the coordinator's log and the time."""
    return 2.0


async def stream_seq(fleet: SimFleet, bucket: str) -> int:
    """The last sequence of a KV bucket's stream: how many writes it has taken so far."""
    assert fleet.bus is not None
    info = await fleet.bus.js.stream_info(f"KV_{bucket}")
    return int(info.state.last_seq)


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("waves", f"{r['waves']} ({r['node_updates']} node updates, "
                  f"{r['desired_writes']} desired writes)"),
        ("total", f"{r['total_s']:.3f} s"),
        ("per wave", f"mean {r['wave_mean_s']:.3f} s, max {r['wave_max_s']:.3f} s"),
        ("before / after waves", f"request -> wave 0 started {r['start_s']:.3f} s, success "
                                 f"decided -> its event read {r['tail_s']:.3f} s"),
        ("node-updates/s", f"{r['node_updates_per_s']:.0f}"),
        ("coordinator CPU", f"{r['coordinator_cpu_s']:.2f} s (simulated agents: "
                            f"{r['sim_agent_cpu_s']:.2f} s, nats-server: "
                            f"{r['server_cpu_s']:.2f} s)"),
        ("CPU floor", f"{r['cpu_floor_s']:.3f} s (that CPU over {os.cpu_count()} cores; "
                      f"ours / it {r['total_s'] / max(r['cpu_floor_s'], 1e-9):.2f}x)"),
        ("coordinator peak RSS", f"{r['coordinator_peak_rss_mb']:.1f} MiB"),
        ("reading back", ", ".join(
            f"{name} {r[f'{key}_s']:.3f} s ({r[f'{key}_bytes'] / 2**20:.2f} MiB)"
            for name, key in (("nodes", "nodes"), ("status", "status"),
                              ("status followed", "status_followed")))),
        ("settings", f"heartbeats every {r['heartbeat_s']:g} s (the leader's pace), "
                     f"lease ttl {r['lease_ttl_s']:g} s"),
    ] + ([] if r["floor_s"] is None else [
        ("bus floor", f"{r['floor_s']:.3f} s ({r['desired_payload_bytes']} B desired states)"),
        ("ours / floor", f"{r['ratio_to_floor']:.2f}x"),
        ("signed floor", f"{r['signed_floor_s']:.3f} s (the same writes signed and verified, "
                         f"as ours are)"),
        ("ours / signed floor", f"{r['ratio_to_signed_floor']:.2f}x"),
    ])


COMPARED = [("total", "total_s", " s"), ("per wave (mean)", "wave_mean_s", " s"),
            ("per wave (max)", "wave_max_s", " s"), ("request -> wave 0", "start_s", " s"),
            ("success -> its event", "tail_s", " s"), ("node-updates/s", "node_updates_per_s", ""),
            ("coordinator CPU", "coordinator_cpu_s", " s"),
            ("simulated agent CPU", "sim_agent_cpu_s", " s"),
            ("nats-server CPU", "server_cpu_s", " s"), ("CPU floor", "cpu_floor_s", " s"),
            ("coordinator peak RSS", "coordinator_peak_rss_mb", " MiB")]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1000,10000,50000", help="comma-separated fleet sizes")
    ap.add_argument("--brokers", type=int, default=1, choices=(1, 3),
                    help="one server (R1) or a 3-server cluster (R3)")
    ap.add_argument("--max-payload", default="1MB",
                    help="the servers' max_payload (nats-server's default: 1MB)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) of each run")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="py-spy record the coordinator during each measured rollout into DIR")
    add_secure_flags(ap, "TLS and nkey users (fleetwave auth) for every client",
                     "each size plain and with TLS and auth; print both and the ratios")
    args = ap.parse_args()
    need_py_spy(args.profile, "bench_control_plane.py")
    results = []
    for k, n in enumerate(int(x) for x in args.nodes.split(",")):
        # Every other size runs secure first, so that an order effect (a warmer machine for
        # the second run) shows as a spread between rounds rather than as a cost.
        modes = ([False, True] if k % 2 == 0 else [True, False]) if args.compare else [
            args.secure]
        of_n: list[dict[str, Any]] = []
        for secure in modes:
            started = time.monotonic()
            r = await measure(n, args.keep, args.profile, secure, args.brokers,
                              args.max_payload)
            of_n.append(r)
            if not args.json:
                how_ = "TLS + auth" if secure else "plain"
                emit(False, f"rolling 1.0.0 -> 2.0.0 on {n} simulated nodes, batch 10%, bake 0, "
                     f"{how_}, R{args.brokers}, max_payload {args.max_payload} "
                     f"(run took {time.monotonic() - started:.0f} s)", r, rows(r))
        results += of_n
        if args.compare and not args.json:
            plain, secure_ = sorted(of_n, key=lambda r: bool(r["secure"]))
            first = "secure" if of_n[0]["secure"] else "plain"
            emit(False, f"{n} simulated nodes: the cost of TLS + auth (secure / plain; {first} "
                 "ran first)", {}, ratio_rows(plain, secure_, COMPARED))
    if args.json:
        emit(True, "", {"control_plane": results}, [])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
