"""End to end: nodes unhealthy on their own count against ``--max-unavailable``, on a dev
fleet of 3 real agents running the example ``hello`` service (routers on 127.0.93.i:8080).

A node's service is made unhealthy on its own by SIGSTOPping its process: its health checks
time out, its agent takes its slot out of the router and reports it unhealthy (the agent's own
restart comes only after ``health.restart_after``, 30 s). Then, with one node a wave and a
budget of one:

- a deploy puts the two unhealthy nodes in the first waves and starts each (the release is its
  fix) without keeping its hung old slot warm; the second is staged ahead of its wave though
  its agent cannot converge (its staged slot is healthy); the healthy node moves after them,
  its old slot kept warm until the rollout succeeds;
- a node that sickens while an earlier wave bakes holds the next wave (none of its nodes is
  started) until it is well again, and the rollout then goes on and succeeds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coordinator.dev.devfleet import DevFleet
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.messages import DesiredState, ObservedState, RolloutRecord
from tests.integration.e2e_support import (
    DEPLOY_TIMEOUT,
    audit,
    deploy_detached,
    desired_log,
    install,
    push,
    record_of,
    service_pids,
    serving,
    told,
)
from tests.integration.procs import fleetwave, wait_until

SUBNET = "127.0.93"
# One node a wave, the next one staged ahead (rolling's default --prestage 1).
ONE_A_WAVE = ("--batch", "1", "--max-unavailable", "1")


async def observed(bus: Bus, node: str) -> ObservedState | None:
    entry = await bus.kv_get(subjects.observed_bucket(bus.fleet), f"{node}.hello")
    return decode(ObservedState, entry.value) if entry is not None and entry.value else None


def sick(seen: ObservedState | None) -> bool:
    """Its report: no slot with traffic, and a slot reported unhealthy."""
    return (seen is not None and not any(w > 0 for w in seen.weights.values())
            and any(s.status == "unhealthy" for s in seen.slots.values()))


async def serving_pid(fleet: DevFleet, node: str, version: str) -> int:
    (pid,) = [p for p, (n, _slot, v) in (await service_pids(fleet)).items()
              if (n, v) == (node, version)]
    return pid


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process ``pid`` SIGSTOPped for the block (continued after, if it is still there)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def moved_with(url: str, rid: str, version: str) -> dict[str, set[str]]:
    """The slots of each node's move in rollout ``rid`` (its first desired state giving
    ``version`` all of the traffic; not a staging, not the retirement after it)."""
    moves: dict[str, set[str]] = {}
    for env in await desired_log(url):
        d = decode(DesiredState, env.payload)
        if d.rollout == rid and any(d.weights.get(k) == 100 and r.version == version
                                    for k, r in d.slots.items()):
            moves.setdefault(d.node, set(d.slots))
    return moves


def updating_order(events: list[dict[str, Any]]) -> list[str]:
    return [e["node"] for e in events if e["kind"] == "node.updating"]


async def test_unhealthy_nodes_go_first_and_a_sick_node_holds_the_next_wave(
        tmp_path: Path) -> None:
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        bus = await Bus.connect(url, fleet.fleet, name="unhealthy-test")
        try:
            # 1. node-2's and node-3's 1.0.0 hang: reported unhealthy, they are the first
            # waves; node-3 is staged ahead of its wave while hung (its agent cannot converge).
            with (stopped(await serving_pid(fleet, "node-2", "1.0.0")),
                  stopped(await serving_pid(fleet, "node-3", "1.0.0"))):
                for node in ("node-2", "node-3"):
                    await wait_until(functools.partial(observed, bus, node), sick, timeout=20,
                                     what=f"{node} reported unhealthy")
                code, out, err = await fleetwave("deploy", "hello", "2.0.0", *ONE_A_WAVE,
                                                 nats_url=url, timeout=DEPLOY_TIMEOUT)
                assert code == 0, f"the deploy failed ({code}): {out}{err}"
            await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"2.0.0"},
                             timeout=30, what="every node serving 2.0.0")
            code, out, err = await fleetwave("status", "-o", "json", nats_url=url)
            assert code == 0, err
            rid = str(json.loads(out)["id"])
            record = await record_of(bus, rid)
            assert [w.nodes for w in record.waves] == [["node-2"], ["node-3"], ["node-1"]]
            assert [record.nodes[n].staged for n in ("node-2", "node-3", "node-1")] == [
                "", "staged", "staged"]
            events = await told(url, rid, "rollout.succeeded")
            audit(events)
            assert updating_order(events) == ["node-2", "node-3", "node-1"]
            # Their hung old slots were not kept warm (one held its agent's convergence until
            # health.restart_after); node-1's was, until the rollout succeeded.
            assert await moved_with(url, rid, "2.0.0") == {
                "node-2": {"b"}, "node-3": {"b"}, "node-1": {"a", "b"}}

            # 2. Back to 1.0.0, wave 0 baking 12 s; node-3 (the last wave) hangs meanwhile.
            rid = await deploy_detached(url, "1.0.0", *ONE_A_WAVE, "--bake", "12s")

            def baking(r: RolloutRecord) -> bool:
                return r.waves[0].state == "baking"

            await wait_until(lambda: record_of(bus, rid), baking, timeout=60,
                             what="wave 0 baking")
            with stopped(await serving_pid(fleet, "node-3", "2.0.0")):
                await wait_until(lambda: observed(bus, "node-3"), sick, timeout=20,
                                 what="node-3 reported unhealthy")
                assert baking(await record_of(bus, rid)), "the bake ended before node-3 sickened"
                held = await wait_until(lambda: record_of(bus, rid),
                                        lambda r: r.waves[0].state == "passed", timeout=40,
                                        what="wave 0's bake to pass")
                # The step that passed wave 0 would have started node-2: it did not.
                assert held.nodes["node-2"].state == "waiting", held.nodes["node-2"]
            final = await wait_until(lambda: record_of(bus, rid),
                                     lambda r: r.state != "running", timeout=60,
                                     what="the rollout to end once node-3 is well")
            assert final.state == "succeeded", (final.state, final.reason)
            events = await told(url, rid, "rollout.succeeded")
            audit(events)
            assert updating_order(events) == ["node-1", "node-2", "node-3"]
            await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"1.0.0"},
                             timeout=30, what="every node serving 1.0.0")
        finally:
            await bus.close()
