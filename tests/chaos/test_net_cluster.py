"""Chaos on a real network: one of three brokers SIGKILLed mid-rollout.

The fleet runs on a ``tests.netbed`` bed with ``brokers=3``: hosts ``bus-1..3`` each run one
member of a JetStream cluster (``fleetwave broker --name --cluster-listen --routes``), two
coordinators and four agents each in a host of their own, every one of them given all three
brokers' URLs; the coordinators find 3 servers and create every bucket and stream with 3
replicas. A rolling rollout 1.0.0 -> 2.0.0 (batch 1, max-unavailable 1, bake 2 s: four waves)
runs under steady traffic from host ``load``; while wave 1's node updates, one broker host is
crashed (SIGKILL to the ``fleetwave broker`` wrapper and its nats-server) and left dead:

- the broker the leading coordinator is connected to (found by its address in ``/connz``);
- JetStream's meta leader (``/jsz``, the monitoring endpoint reached inside the bus host);
- the leader of the rollouts bucket's stream (its stream info).

Checked from outside, in each: the rollout succeeds and every node serves 2.0.0; no request of
the steady load fails; no sample sees more than max-unavailable (1) nodes without a version;
the rollout's audit log has every event exactly once; if the lease changed hands (or terms)
meanwhile, nothing of the older term landed in the rollouts and desired buckets after the new
term's fence (every write watched as it lands, ``kv_landed``). Prints (run with -s): who was
killed and which clients were on it, the time from the kill to the coordinator's next decision
(its first event after the kill) and to wave 2 started, wave 1's length next to wave 0's
(no fault) (the events' own times: the
coordinators' clock, this machine's), the rollout's duration, requests and failures.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from protocol import subjects
from protocol.bus import Bus
from protocol.messages import RolloutRecord
from tests.chaos.cluster_support import TARGETS, bounded_record, victim
from tests.integration.e2e_support import (
    assert_fenced_off,
    assert_told_once,
    audit,
    deploy_detached,
    install,
    kv_landed,
    leader_of,
    push,
    told,
    watched,
)
from tests.integration.procs import wait_until
from tests.netbed import NetBed, NetFleet

pytestmark = pytest.mark.timeout(150)

AGENTS = 4
COORDINATORS = 2
BROKERS = 3
HEARTBEAT = 0.5
# --prestage 0: what is killed or cut here is a node in the middle of a real update (a start,
# a health check); staged rollouts: test_net_impaired (impaired), test_e2e_prestage (killed).
FLAGS = ("--batch", "1", "--max-unavailable", "1", "--bake", "2s", "--progress-deadline", "30s",
         "--prestage", "0")
WAVES = AGENTS  # batch 1


def wave_1_updating(r: RolloutRecord) -> bool:
    return r.current_wave == 1 and r.waves[1].state == "updating"


def coordinator_host(fleet: NetFleet, lease: dict[str, Any]) -> str:
    """The host of the coordinator a lease names (by its pid)."""
    hosts = {c.pid: f"coord-{i}" for i, c in enumerate(fleet.coordinators, start=1)}
    assert lease["pid"] in hosts, (lease, hosts)
    return hosts[lease["pid"]]


async def clients_of(fleet: NetFleet, bus_host: str) -> list[str]:
    """The bed hosts with a client connection to the broker of ``bus_host`` now (the test's
    own come through its portal, made inside ``bus_host``)."""
    by_addr = {fleet.bed.addr(h): h for h in fleet.bed.hosts}
    by_addr[fleet.bed.addr(bus_host)] = "the test"
    connz = await fleet.monitor(bus_host, "/connz?limit=4096")
    return sorted({by_addr.get(str(c.get("ip")), "?")
                   for c in connz.get("connections") or []})


@pytest.mark.parametrize("target", TARGETS)
async def test_a_broker_killed_mid_rollout_loses_nothing(
    netbed: Callable[[Sequence[str]], NetBed], tmp_path: Path, target: str
) -> None:
    """One of three brokers SIGKILLed while wave 1's node updates (and left dead): the rollout
    succeeds, 0 failed requests, never more than 1 node unavailable, every event once, nothing
    of an older lease term after a new fence."""
    bed = netbed(NetFleet.hosts(AGENTS, COORDINATORS, brokers=BROKERS))
    async with NetFleet(bed, tmp_path / "fleet", agents=AGENTS, coordinators=COORDINATORS,
                        brokers=BROKERS, heartbeat_interval=HEARTBEAT) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0", fleet.serving)
        bus = await Bus.connect(url, fleet.fleet, name="chaos-test", reconnect_forever=True)
        try:
            info = await bus.js.stream_info(
                subjects.kv_stream(subjects.rollouts_bucket(fleet.fleet)))
            assert info.config.num_replicas == BROKERS, info.config.num_replicas
            async with contextlib.AsyncExitStack() as watching:
                landed = await watching.enter_async_context(kv_landed(bus))
                traffic = await watching.enter_async_context(fleet.loaded())
                seen = await watching.enter_async_context(watched(fleet.serving))
                deployed = time.monotonic()
                rid = await deploy_detached(url, "2.0.0", *FLAGS)
                await wait_until(lambda: bounded_record(bus, rid), wave_1_updating, timeout=40,
                                 interval=0.05, what="wave 1 updating")
                lease = await leader_of(bus)
                leader = coordinator_host(fleet, lease)

                async def coordinators_broker() -> str:
                    host = await fleet.connected_from(leader)
                    return fleet.server_name(host) if host else ""

                doomed = fleet.bus_host(await victim(
                    target, bus, coordinators_broker=coordinators_broker,
                    meta_leader=fleet.meta_leader))
                on_it = await clients_of(fleet, doomed)
                await fleet.crash_broker(doomed)
                killed = time.time()  # events carry the coordinators' clock: this machine's
                final = await wait_until(lambda: bounded_record(bus, rid),
                                         lambda r: r.state != "running", timeout=60,
                                         interval=0.1, what="the rollout to end, a broker down")
                took = time.monotonic() - deployed
                assert final.state == "succeeded", (final.state, final.reason)
                await told(url, rid, "rollout.succeeded")  # after the last writes
                await wait_until(fleet.serving, lambda v: set(v.values()) == {"2.0.0"},
                                 timeout=30, what="every node serving 2.0.0")
                after = await leader_of(bus)
            report = traffic.report
            assert report.failed == 0, report.failures
            assert report.requests > 0 and "2.0.0" in report.versions
            assert seen.worst <= 1, f"{seen.worst} unavailable at once: {seen.worst_at}"
            events = await assert_told_once(url, rid, fleet.nodes, waves=WAVES)
            audit(events)
            if (after["holder"], after["term"]) != (lease["holder"], lease["term"]):
                writes = assert_fenced_off(landed, after["term"], fleet.fleet)
                fenced = (f"lease moved {leader} term {lease['term']} → "
                          f"{coordinator_host(fleet, after)} term {after['term']}: "
                          f"{sum(writes.values())} writes after its fence, none older")
            else:
                fenced = f"{leader} kept the lease (term {lease['term']}): no takeover"
        finally:
            await bus.close()
    decided = min(e["time"] for e in events if e["time"] > killed) - killed
    started = {e["data"].get("wave"): e["time"] for e in events if e["kind"] == "wave.started"}
    next_wave = started[2] - killed
    wave_0, wave_1 = started[1] - started[0], started[2] - started[1]
    print(f"\n{target} ({doomed}, {fleet.server_name(doomed)}; clients on it: "
          f"{', '.join(on_it) or 'none'}) SIGKILLed while wave 1 updates: next decision after "
          f"{decided:.2f}s, wave 2 started after {next_wave:.2f}s (bake 2s; wave 1 took "
          f"{wave_1:.2f}s, wave 0 without a fault {wave_0:.2f}s); rollout succeeded in "
          f"{took:.1f}s; {report.requests} requests, {report.failed} failed; {seen.samples} "
          f"samples, at most {seen.worst} node(s) unavailable; {len(events)} events, each "
          f"once; {fenced}")
