"""Chaos: an agent SIGKILLed while its node is in the updating wave of a rolling rollout on 3 real
agents under steady traffic, and restarted.

The router and the slot processes outlive the agent, so users notice nothing either way. What the
rollout does depends on whether the coordinator saw the node go offline (3 missed heartbeats, 6 s
at the default 2 s interval):

- restarted at once (back before it is missed): the new agent adopts its slots and router and
  finishes the update; the rollout succeeds;
- restarted only after the coordinator saw it offline: the engine fails a target node lost while
  updating (``core.engine_lost``, the default ``--on-node-lost fail``), so the rollout rolls
  back with that reason, naming it, long before --progress-deadline (60 s); the
  restarted agent converges back, and the rollout ends rolled_back, not stuck and not failed.

In both: zero failed requests, and psutil never sees two live processes for one slot of a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from coordinator.dev.devfleet import DevFleet
from protocol.bus import Bus
from protocol.messages import RolloutRecord
from tests.integration.e2e_support import (
    deploy_detached,
    install,
    loaded,
    push,
    record_of,
    service_pids,
    serving,
)
from tests.integration.procs import wait_until

SUBNET = "127.0.13"
NODES = ["node-1", "node-2", "node-3"]
# --prestage 0: what is killed or cut here is a node in the middle of a real update (a start,
# a health check); staged rollouts: test_net_impaired (impaired), test_e2e_prestage (killed).
FLAGS = ("--batch", "1", "--bake", "1s", "--progress-deadline", "60s", "--prestage", "0")


def session_leader(pid: int) -> bool:
    """Whether ``pid`` leads its own session, as every slot process the agent starts does.

    A launcher such as a pyenv ``python3`` shim (a bash script that finally execs python) forks
    short-lived subshells with the same command line and environment while it starts; those are
    not slot processes and must not count as a second process for the slot.
    """
    try:
        return os.getsid(pid) == pid
    except OSError:  # gone meanwhile
        return False


@contextlib.asynccontextmanager
async def no_twin_slots(fleet: DevFleet) -> AsyncIterator[list[str]]:
    """Sample the fleet's service processes (psutil) while the block runs; the yielded list
    collects every moment at which one (node, slot) had more than one live slot process."""
    twins: list[str] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            pids = {pid: who for pid, who in (await service_pids(fleet)).items()
                    if session_leader(pid)}
            per_slot = Counter((node, slot) for node, slot, _ in pids.values())
            twins.extend(f"{k}: {pids}" for k, n in per_slot.items() if n > 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    task = asyncio.create_task(sample())
    try:
        yield twins
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def one_process_per_node(fleet: DevFleet, version: str) -> None:
    await wait_until(lambda: service_pids(fleet),
                     lambda p: sorted((n, v) for n, _, v in p.values())
                     == [(n, version) for n in NODES],
                     timeout=30, what=f"one {version} process per node, nothing else")


async def test_agent_killed_while_its_node_updates(tmp_path: Path) -> None:
    """Agent node-2 SIGKILLed mid-update: restarted at once the rollout succeeds; restarted
    after it was seen offline the rollout rolls back naming it; 0 failed requests, no twins."""
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=2.0,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        agent = fleet.agent(2)
        bus = await Bus.connect(url, fleet.fleet, name="chaos-test")

        def node_2_updating(r: RolloutRecord) -> bool:
            return r.current_wave == 1 and r.nodes["node-2"].state == "updating"

        try:
            async with loaded(fleet) as traffic, no_twin_slots(fleet) as twins:
                # 1. Killed and restarted at once: the coordinator never misses it.
                rid = await deploy_detached(url, "2.0.0", *FLAGS)
                await wait_until(lambda: record_of(bus, rid), node_2_updating, timeout=60,
                                 what="node-2 updating")
                await agent.kill()
                await agent.start()
                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running", timeout=90,
                                         what="the 2.0.0 rollout to end")
                assert final.state == "succeeded", (final.state, final.reason)
                await wait_until(lambda: serving(fleet),
                                 lambda v: set(v.values()) == {"2.0.0"}, timeout=30,
                                 what="every node serving 2.0.0")
                await one_process_per_node(fleet, "2.0.0")

                # 2. Killed and kept down until the coordinator sees it offline.
                rid = await deploy_detached(url, "1.0.0", *FLAGS)
                await wait_until(lambda: record_of(bus, rid), node_2_updating, timeout=60,
                                 what="node-2 updating")
                await agent.kill()
                await fleet.wait_online(["node-2"], online=False, timeout=30)
                await agent.start()
                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running", timeout=90,
                                         what="the 1.0.0 rollout to end")
                assert final.state == "rolled_back", (final.state, final.reason)
                assert "node-2" in final.reason and "offline" in final.reason, final.reason
                await wait_until(lambda: serving(fleet),
                                 lambda v: set(v.values()) == {"2.0.0"}, timeout=30,
                                 what="every node serving 2.0.0 again")
                await one_process_per_node(fleet, "2.0.0")
        finally:
            await bus.close()

        assert traffic.report.failed == 0, traffic.report.failures
        assert twins == [], twins[:3]
        assert {"1.0.0", "2.0.0"} <= set(traffic.report.versions)

    print(f"\nagent node-2 killed twice mid-update: {traffic.report.requests} requests, 0 failed")
