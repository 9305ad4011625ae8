"""Chaos: the coordinator SIGKILLed twice during one rolling rollout on 3 real agents under steady
traffic (once while wave 0 bakes, once while wave 2's node is updating), restarted each time.

What holds: the rollout finishes (succeeded), no request fails, each node's desired generations
strictly increase with one write per step (the desired bucket's history), no wave and no node is
skipped or moved twice (the event log).
"""

from __future__ import annotations

from pathlib import Path

from coordinator.dev.devfleet import DevFleet
from protocol.bus import Bus
from protocol.messages import RolloutRecord
from tests.integration.e2e_support import (
    assert_told_once,
    deploy_detached,
    desired_history,
    desired_log,
    install,
    loaded,
    push,
    record_of,
    serving,
    told,
)
from tests.integration.procs import wait_until

SUBNET = "127.0.13"
NODES = ["node-1", "node-2", "node-3"]


async def test_coordinator_killed_twice_resumes_without_skipping(tmp_path: Path) -> None:
    """Two coordinator crashes at different points of one rollout: it succeeds, 0 failed
    requests, generations only grow, every wave and node handled exactly once."""
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        bus = await Bus.connect(url, fleet.fleet, name="chaos-test")
        try:
            async with loaded(fleet) as traffic:
                # --prestage 0: each kill lands while a node really updates.
                rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "2s",
                                            "--prestage", "0")

                def baking_0(r: RolloutRecord) -> bool:
                    return r.current_wave == 0 and r.waves[0].state == "baking"

                await wait_until(lambda: record_of(bus, rid), baking_0, timeout=60,
                                 what="wave 0 to bake")
                await fleet.coordinator.kill()
                await fleet.coordinator.start()

                def updating_2(r: RolloutRecord) -> bool:
                    return r.current_wave == 2 and r.nodes["node-3"].state == "updating"

                await wait_until(lambda: record_of(bus, rid), updating_2, timeout=60,
                                 what="wave 2 (node-3) to be updating after the first restart")
                await fleet.coordinator.kill()
                await fleet.coordinator.start()

                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running", timeout=90,
                                         what="the rollout to end after the second restart")
                assert final.state == "succeeded", (final.state, final.reason)
                await wait_until(lambda: serving(fleet),
                                 lambda v: set(v.values()) == {"2.0.0"}, timeout=30,
                                 what="every node serving 2.0.0")
            assert traffic.report.failed == 0, traffic.report.failures
        finally:
            await bus.close()

        events = await told(url, rid, "rollout.succeeded")  # published after the last writes
        staged = {e["node"] for e in events if e["kind"] == "node.staging"}
        history = desired_history(await desired_log(url))
        for node in NODES:
            # install, (staged ahead of its wave: --prestage), move to 2.0.0, retire the old
            # slot: strictly growing, one write each.
            want = [1, 2, 3, 4] if node in staged else [1, 2, 3]
            assert history[f"{node}.hello"] == want, (history, staged)
            assert final.nodes[node].generation == want[-1], final.nodes[node]

        await assert_told_once(url, rid, NODES, waves=3)
