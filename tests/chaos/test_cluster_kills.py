"""Chaos: a rolling rollout on 4 real agents under steady traffic, on a JetStream cluster of 3
brokers (R3 buckets, streams and object store), while one broker is SIGKILLed mid-rollout —
separately: the broker the coordinator is connected to, the JetStream meta leader, and the
leader of the rollouts bucket's stream (``KV_fw-default-rollouts``).

What holds each time, with the killed broker left dead until the rollout has ended (R3 survives
one server): the rollout succeeds, every node serves the new version, no request of the steady
load fails, never more than max-unavailable (1) nodes without a serving router (sampled from
outside), and the audit log has every event of the rollout exactly once (each node moved and
done once, each wave started and judged once, no event id twice). The broker is then restarted
and the cluster made whole before the next scenario.

Prints (run with -s), per scenario: time from the kill to the coordinator's next decision and to
the next wave started (the events' own times: the coordinator's clock, on the same host); and the
rollout's duration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from coordinator.dev.broker import Broker
from coordinator.dev.cluster import monitor_get
from coordinator.dev.devfleet import DevFleet
from coordinator.runtime.daemon import SERVICE_NAME
from protocol.bus import Bus
from protocol.messages import RolloutRecord
from tests.chaos import cluster_support
from tests.chaos.cluster_support import TARGETS, bounded_record
from tests.chaos.test_max_unavailable import watched  # the outside availability sampler
from tests.integration.e2e_support import (
    deploy_detached,
    events_of,
    install,
    loaded,
    push,
    serving,
)
from tests.integration.procs import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

SUBNET = "127.0.19"
NODES = [f"node-{i}" for i in range(1, 5)]
OTHER = {"1.0.0": "2.0.0", "2.0.0": "1.0.0"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevFleet]:
    """Three brokers, the coordinator, 4 agents; every node on 1.0.0."""
    async with DevFleet(tmp_path_factory.mktemp("cluster-chaos"), agents=4, brokers=3,
                        heartbeat_interval=0.5, subnet=SUBNET) as f:
        await push(f.nats_url, "1.0.0", "2.0.0")
        await install(f, "1.0.0")
        yield f


async def _victim(fleet: DevFleet, bus: Bus, target: str) -> Broker:
    cluster = fleet.cluster
    assert cluster is not None

    async def coordinators_broker() -> str:
        found = await cluster.serving(SERVICE_NAME)
        return found.server_name if found is not None else ""

    return cluster.by_name(await cluster_support.victim(
        target, bus, coordinators_broker=coordinators_broker, meta_leader=cluster.meta_leader))


@pytest.mark.parametrize("target", TARGETS)
async def test_a_broker_killed_mid_rollout_loses_nothing(fleet: DevFleet, target: str) -> None:
    """One of three brokers SIGKILLed during wave 1 of 4 (and not restarted until the end):
    the rollout succeeds, 0 failed requests, every event of it exactly once."""
    assert fleet.cluster is not None
    url = fleet.nats_url
    now = await serving(fleet)
    assert len(set(now.values())) == 1, now
    version = OTHER[next(iter(now.values()))]
    bus = await Bus.connect(url, fleet.fleet, name="chaos-test", reconnect_forever=True)
    victim: Broker | None = None
    try:
        async with loaded(fleet) as traffic, watched(lambda: serving(fleet)) as seen:
            started = time.monotonic()
            # --prestage 0: the kills land while a node really updates (staged: test_e2e_prestage).
            rid = await deploy_detached(url, version, "--batch", "1", "--max-unavailable", "1",
                                        "--bake", "2s", "--prestage", "0")

            def mid(r: RolloutRecord) -> bool:
                return r.current_wave == 1 and r.nodes[NODES[1]].state == "updating"

            await wait_until(lambda: bounded_record(bus, rid), mid, timeout=60,
                             what="wave 1 (node-2) to be updating")
            victim = await _victim(fleet, bus, target)
            on_it = await _clients_of(victim)
            await victim.kill()
            killed = time.time()  # events carry the coordinator's clock: the same host's
            final = await wait_until(lambda: bounded_record(bus, rid),
                                     lambda r: r.state != "running", timeout=120,
                                     what="the rollout to end with a broker down")
            took = time.monotonic() - started
            assert final.state == "succeeded", (final.state, final.reason)
            await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {version},
                             timeout=30, what=f"every node serving {version}")
        report = traffic.report
        assert report.failed == 0, report.failures
        assert report.requests > 0 and version in report.versions
        assert seen.worst <= 1, f"{seen.worst} nodes unavailable at once: {seen.worst_at}"

        events = await events_of(url, rid)
        ids = [e["id"] for e in events]
        assert len(ids) == len(set(ids)), "an event recorded twice"
        kinds = [e["kind"] for e in events]
        decided = min(e["time"] for e in events if e["time"] > killed) - killed
        next_wave = next(e["time"] for e in events if e["kind"] == "wave.started"
                         and e["data"].get("wave") == 2) - killed
        assert sorted(e["node"] for e in events if e["kind"] == "node.updating") == NODES, kinds
        assert sorted(e["node"] for e in events if e["kind"] == "node.done") == NODES, kinds
        waves = [e["data"].get("wave") for e in events if e["kind"] == "wave.started"]
        assert waves == [0, 1, 2, 3], f"waves started out of order, twice or skipped: {waves}"
        passed = sorted(e["data"].get("wave") for e in events if e["kind"] == "gate.passed")
        assert passed == [0, 1, 2, 3], f"every wave's gates judged once: {passed}"
        assert kinds.count("rollout.succeeded") == 1, kinds
        assert not {"gate.failed", "node.failed", "rollout.rolling_back"} & set(kinds), kinds
    finally:
        await bus.close()
        if victim is not None:
            await victim.start()
            await fleet.cluster.wait_formed(60)
    agents = sorted(n.removeprefix("fleetwave-agent-") for n in on_it if "agent" in n)
    print(f"\n{target} ({victim.server_name if victim else '?'}; clients on it: coordinator "
          f"{'yes' if SERVICE_NAME in on_it else 'no'}, agents {agents or 'none'}) killed "
          f"mid-rollout: next decision after {decided:.1f}s, next wave started after "
          f"{next_wave:.1f}s (bake 2s); rollout of 4 nodes took {took:.1f}s; "
          f"{report.requests} requests, 0 failed; at most {seen.worst} node(s) unavailable")


async def _clients_of(broker: Broker) -> list[str]:
    """The names of the clients connected to ``broker`` now."""
    connz = await asyncio.to_thread(monitor_get, broker.monitor_port, "/connz?limit=4096")
    return [str(c.get("name", "")) for c in connz.get("connections") or []]
