"""End to end: ``deploy --on-node-lost wait`` on a dev fleet of 3 real agents, one of them frozen
(SIGSTOP, as a stalled host or a partition would look to the coordinator) while its wave bakes.

- thawed (SIGCONT) before the deadline: the wave waited for it (still baking while it was lost,
  no node of the next wave started) and the rollout succeeds;
- left frozen with a short ``--progress-deadline``: the rollout fails the node at the bake's end
  plus the deadline, naming it in the record and in the followed ``deploy``'s last line (exit 4
  with ``--on-failure pause``), and its router keeps serving what it served; nothing is written
  for it while it is lost.

The bake (5 s) is what makes the freeze land mid-wave: the coordinator sees a node offline after
3 missed heartbeats (1.5 s here), well inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

from coordinator.dev.devfleet import DevFleet
from protocol.bus import Bus
from protocol.messages import RolloutRecord
from tests.integration.e2e_support import (
    DEPLOY_TIMEOUT,
    deploy_detached,
    desired_log,
    install,
    push,
    record_of,
    serving,
    status,
)
from tests.integration.procs import fleetwave, wait_until

SUBNET = "127.0.21"
FLAGS = ("--batch", "2", "--max-unavailable", "2", "--bake", "5s", "--on-node-lost", "wait")


def wave_0_baking(r: RolloutRecord | dict[str, Any]) -> bool:
    waves = r["waves"] if isinstance(r, dict) else [{"state": w.state} for w in r.waves]
    return bool(waves) and waves[0]["state"] == "baking"


async def node_2_writes(url: str) -> list[int]:
    """The generations written for node-2's hello, oldest first, from the bucket's history."""
    return [e.generation for e in await desired_log(url) if e.node == "node-2"]


async def test_a_frozen_agent_is_waited_for_and_never_past_the_deadline(tmp_path: Path) -> None:
    """Frozen mid-bake under --on-node-lost wait: thawed in time the rollout succeeds; left
    frozen it fails at the deadline naming node-2, which kept serving and got no write."""
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        agent = fleet.agent(2)
        bus = await Bus.connect(url, fleet.fleet, name="node-lost-test")
        try:
            # 1. Frozen during wave 0's bake, thawed before the deadline.
            rid = await deploy_detached(url, "2.0.0", *FLAGS, "--progress-deadline", "60s")
            await wait_until(lambda: record_of(bus, rid), wave_0_baking, timeout=60,
                             what="wave 0 baking")
            agent.signal(signal.SIGSTOP)
            try:
                held = await wait_until(lambda: record_of(bus, rid),
                                        lambda r: not r.nodes["node-2"].online, timeout=30,
                                        what="node-2 seen offline")
                # Waited for: its wave neither failed nor passed, the next one did not start.
                assert held.state == "running" and held.waves[0].state == "baking", held.reason
                # (node-3 may be staged at weight 0 ahead of it, --prestage: still waiting)
                assert held.waves[1].state == "waiting" and held.nodes["node-3"].wave == -1
            finally:
                agent.signal(signal.SIGCONT)
            final = await wait_until(lambda: record_of(bus, rid), lambda r: r.state != "running",
                                     timeout=60, what="the 2.0.0 rollout to end")
            assert final.state == "succeeded", (final.state, final.reason)

            # 2. Frozen during the bake and left frozen: failed at the bake's end + 8 s.
            follow = asyncio.create_task(fleetwave(
                "deploy", "hello", "1.0.0", *FLAGS, "--progress-deadline", "8s",
                "--on-failure", "pause", nats_url=url, timeout=DEPLOY_TIMEOUT))
            try:
                st = await wait_until(lambda: status(url),
                                      lambda s: s["id"] != rid and wave_0_baking(s),
                                      timeout=60, what="the 1.0.0 rollout's wave 0 baking")
                rid = st["id"]
                agent.signal(signal.SIGSTOP)
                await wait_until(lambda: record_of(bus, rid),
                                 lambda r: not r.nodes["node-2"].online, timeout=30,
                                 what="node-2 seen offline")
                written = await node_2_writes(url)
                code, out, err = await follow
                assert (await serving(fleet))["node-2"] == "1.0.0"  # frozen agent, live router
                assert await node_2_writes(url) == written  # nothing written while lost
            finally:
                agent.signal(signal.SIGCONT)
                if not follow.done():
                    follow.cancel()  # its subprocess is killed and reaped as it unwinds
                    with contextlib.suppress(asyncio.CancelledError):
                        await follow
            final = await record_of(bus, rid)
            assert final.state == "paused", (final.state, final.reason)
            said = ("wave 1 failed: node-2: lost (offline) during wave 1 while baking and not "
                    "back (online and reporting) within 8s of the bake's end")
            assert said in final.reason, final.reason
            assert code == 4 and said in err.strip().splitlines()[-1], (code, out, err)
            code, _, err = await fleetwave("abort", rid, nats_url=url)
            assert code == 0, err
        finally:
            await bus.close()
        writes = await node_2_writes(url)
        assert writes == sorted(set(writes)), writes  # never one generation twice
