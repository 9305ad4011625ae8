"""Chaos: the broker (nats-server, JetStream) SIGKILLed in the middle of a rolling rollout on 4
real agents under steady traffic, and started again on the same store dir a few seconds later.

What holds: users notice nothing (routers and services do not need the broker: zero failed
requests, also during the outage); the rollout resumes and succeeds, every node serving the new
version; each node's desired state was written once per generation with generations that only
grow (the bucket's history, read back after the restart); the event log names every step.

Prints (run with -s) the outage, the requests answered during it and the rollout's duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from coordinator.dev.devfleet import DevFleet
from coordinator.dev.traffic import Traffic
from protocol.bus import Bus
from protocol.codec import decode
from protocol.messages import DesiredState
from tests.integration.e2e_support import (
    deploy_detached,
    desired_history,
    desired_log,
    events_of,
    install,
    loaded,
    push,
    record_of,
    serving,
    told,
)
from tests.integration.procs import wait_until

SUBNET = "127.0.13"
NODES = [f"node-{i}" for i in range(1, 5)]


async def test_broker_killed_mid_rollout_loses_nothing(tmp_path: Path) -> None:
    """A broker SIGKILLed during wave 1 of 4 and restarted: the rollout succeeds, 0 failed
    requests, one desired write per node and generation, every step in the event log."""
    async with DevFleet(tmp_path / "fleet", agents=4, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        bus = await Bus.connect(url, fleet.fleet, name="chaos-test")
        try:
            async with loaded(fleet) as traffic:
                started = time.monotonic()
                # --prestage 0: the kill lands while node-2 really updates; a staged switch is
                # over too fast to catch (staged rollouts: test_net_impaired, test_e2e_prestage).
                rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "2s",
                                            "--prestage", "0")
                await wait_until(lambda: record_of(bus, rid),
                                 lambda r: r.current_wave == 1
                                 and r.nodes[NODES[1]].state == "updating",
                                 timeout=60, what="wave 1 (node-2) to be updating")

                before = traffic.snapshot().requests
                down = time.monotonic()
                await fleet.broker.kill()
                # The outage lasts until the routers have answered a few hundred requests
                # without the broker (about 2-3 s at this rate).
                await wait_until(lambda: _count(traffic), lambda n: n >= before + 300,
                                 timeout=30, what="requests served during the outage")
                during = traffic.snapshot()
                await fleet.broker.start()
                outage = time.monotonic() - down

                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running", timeout=90,
                                         what="the rollout to end after the broker restart")
                took = time.monotonic() - started
                assert final.state == "succeeded", (final.state, final.reason)
                await wait_until(lambda: serving(fleet),
                                 lambda v: set(v.values()) == {"2.0.0"}, timeout=30,
                                 what="every node serving 2.0.0")
            report = traffic.report
            assert report.failed == 0, report.failures
            assert during.failed == 0 and during.requests - before >= 300
            assert {"1.0.0", "2.0.0"} <= set(report.versions)
        finally:
            await bus.close()

        await told(url, rid, "rollout.succeeded")  # published after the last writes
        log = await desired_log(url)
        history = desired_history(log)
        staged = {e["node"] for e in await told(url, rid, "rollout.succeeded")
                  if e["kind"] == "node.staging"}
        for node in NODES:
            gens = history[f"{node}.hello"]
            # install, (staged ahead of its wave: --prestage), move to 2.0.0 (old slot kept
            # until the rollout succeeds), retire the old slot: one write each, whatever the
            # outage did in between.
            want = [1, 2, 3, 4] if node in staged else [1, 2, 3]
            assert gens == want, f"{node}: generations {gens}; all: {history}; staged {staged}"
            last = decode(DesiredState, [e for e in log if e.node == node][-1].payload)
            assert [r.version for r in last.slots.values()] == ["2.0.0"], last
            assert last.generation == final.nodes[node].generation

        events = await events_of(url, rid)
        kinds = [e["kind"] for e in events]
        updating = sorted(e["node"] for e in events if e["kind"] == "node.updating")
        assert updating == NODES, f"each node moved exactly once: {updating}"
        assert sorted(e["node"] for e in events if e["kind"] == "node.done") == NODES
        waves = [e["data"].get("wave") for e in events if e["kind"] == "wave.started"]
        assert waves == [0, 1, 2, 3], f"waves started out of order or twice: {waves}"
        assert kinds.count("gate.passed") >= 4 and "rollout.succeeded" in kinds, kinds
        assert not {"gate.failed", "node.failed", "rollout.rolling_back"} & set(kinds), kinds

    print(f"\nbroker outage {outage:.1f}s mid-rollout: {during.requests - before} requests "
          f"served during it, 0 failed; rollout of 4 nodes took {took:.1f}s "
          f"({report.requests} requests in all)")


async def _count(traffic: Traffic) -> int:
    return traffic.snapshot().requests


@contextlib.asynccontextmanager
async def _outlasting(tmp_path: Path) -> AsyncIterator[tuple[DevFleet, Bus]]:
    """2 agents on 1.0.0 (2.0.0 pushed) whose leader keeps its lease through an outage of the
    broker (--lease-ttl 30), and a bus to watch them with."""
    fleet = DevFleet(tmp_path / "fleet", agents=2, heartbeat_interval=0.5, subnet="127.0.14")
    fleet.coordinator.argv += ["--lease-ttl", "30"]
    async with fleet:
        await push(fleet.nats_url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="chaos-test")
        try:
            yield fleet, bus
        finally:
            await bus.close()


# The broker's outage in the test below: past the rollout's --progress-deadline, so that the
# wave's own deadline passes while the bus is away (the scenario itself, not a wait for anything).
OUTAGE = 8.0


async def test_a_broker_down_past_the_progress_deadline_fails_no_node(tmp_path: Path) -> None:
    """The broker SIGKILLed as wave 1 starts and kept down longer than the rollout's
    --progress-deadline, the leader keeping its lease (--lease-ttl 30): its ticks go on
    meanwhile, yet no node fails for the bus's silence (``Rollout.excuse``); once the broker is
    back, the agents reconnect and report, and the rollout succeeds without a failed node or a
    rollback. Before, the wave's deadline passed during the outage: node-1 failed "did not
    converge within 6s" and the rollout rolled back."""
    async with _outlasting(tmp_path) as (fleet, bus):
        url = fleet.nats_url
        rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "0",
                                    "--prestage", "0", "--progress-deadline", "6s")
        await wait_until(lambda: record_of(bus, rid),
                         lambda r: r.nodes[NODES[0]].state == "updating",
                         timeout=60, what="wave 1 (node-1) to be updating")
        await fleet.broker.kill()
        await asyncio.sleep(OUTAGE)
        await fleet.broker.start()
        final = await wait_until(lambda: record_of(bus, rid),
                                 lambda r: r.state != "running", timeout=90,
                                 what="the rollout to end after the broker restart")
        assert final.state == "succeeded", (final.state, final.reason)
        kinds = [e["kind"] for e in await told(url, rid, "rollout.succeeded")]
        assert not {"node.failed", "rollout.rolling_back"} & set(kinds), kinds
        log = (fleet.dir / "logs" / "coordinator.log").read_text()
        assert "the bus is back: no rollout's progress deadline passes before" in log, log[-3000:]


# The outage in the test below: past the bake's end plus the engine's STATS_GRACE (10 s), so
# that the grace for counters covering the bake runs out while the bus is away.
BAKE_OUTAGE = 15.0


async def test_a_bake_that_ends_while_the_broker_is_down_is_judged_on_counters_after_it(
        tmp_path: Path) -> None:
    """The broker SIGKILLed as wave 1 starts its 2 s bake, under load, and kept down past the
    bake's end plus the grace for counters that cover it; the leader keeps its lease. Its ticks
    go on meanwhile, but no gate judges the wave on the counters it held from before the
    outage: the verdict waits until the agents' counters span the bake (the grace for them runs
    from ``Rollout.excuse``), and the rollout succeeds. Before, the gates passed the wave the
    moment the bus was back, on the counters read as the bake began: 0 requests judged."""
    async with _outlasting(tmp_path) as (fleet, bus):
        url = fleet.nats_url
        async with loaded(fleet):
            rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "2s",
                                        "--prestage", "0")
            await wait_until(lambda: record_of(bus, rid),
                             lambda r: r.waves[0].state == "baking",
                             timeout=60, what="wave 1 to bake")
            await fleet.broker.kill()
            await asyncio.sleep(BAKE_OUTAGE)
            back = time.time()
            await fleet.broker.start()
            final = await wait_until(lambda: record_of(bus, rid),
                                     lambda r: r.state != "running", timeout=90,
                                     what="the rollout to end after the broker restart")
        assert final.state == "succeeded", (final.state, final.reason)
        events = await told(url, rid, "rollout.succeeded")
        (verdict,) = [e for e in events if e["kind"].startswith("gate.")
                      and e["data"].get("wave") == 0]
        assert verdict["kind"] == "gate.passed", verdict
        assert verdict["time"] > back, f"judged with the broker down: {verdict}"
        # The new slot's requests in the window judged: the load (20 req/s, 2 workers) sends at
        # least 40 in a 2 s bake. Before, 0: the counters read as the bake began.
        assert verdict["data"]["requests"] >= 40, verdict["data"]
