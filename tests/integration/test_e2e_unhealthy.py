"""End to end: nodes unhealthy on their own count against ``--max-unavailable``, on a dev
fleet of 3 real agents running the example ``hello`` service (routers on 127.0.93.i:8080).

A node's service is made unhealthy on its own by SIGSTOPping its process: its health checks
time out, its agent takes its slot out of the router and reports it unhealthy (the agent's own
restart comes only after ``health.restart_after``, 30 s). Then, with one node a wave and a
budget of one:

- a deploy puts the unhealthy node in the first wave and starts it (the release is its fix)
  without keeping its hung old slot warm; the healthy nodes move one at a time after it serves
  again, their old slots kept warm until the rollout succeeds;
- a node that sickens while an earlier wave bakes holds the next wave (none of its nodes is
  started) until it is well again, and the rollout then goes on and succeeds.
"""

from __future__ import annotations

import contextlib
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
ONE_A_WAVE = ("--batch", "1", "--max-unavailable", "1", "--prestage", "0")


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
            # 1. node-2's 1.0.0 hangs: reported unhealthy, it is the first wave of the deploy.
            with stopped(await serving_pid(fleet, "node-2", "1.0.0")):
                await wait_until(lambda: observed(bus, "node-2"), sick, timeout=20,
                                 what="node-2 reported unhealthy")
                code, out, err = await fleetwave("deploy", "hello", "2.0.0", *ONE_A_WAVE,
                                                 nats_url=url, timeout=DEPLOY_TIMEOUT)
                assert code == 0, f"the deploy failed ({code}): {out}{err}"
            await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"2.0.0"},
                             timeout=30, what="every node serving 2.0.0")
            code, out, err = await fleetwave("status", "-o", "json", nats_url=url)
            assert code == 0, err
            rid = str(json.loads(out)["id"])
            record = await record_of(bus, rid)
            assert [w.nodes for w in record.waves] == [["node-2"], ["node-1"], ["node-3"]]
            # Its hung old slot was not kept warm (it held the agent's convergence until its
            # health.restart_after); the healthy nodes' were, until the rollout succeeded.
            first = [e for e in await told(url, rid, "rollout.succeeded")
                     if e["kind"] == "node.updating"]
            assert [(e["node"], e["data"]["slot"]) for e in first] == [
                ("node-2", "b"), ("node-1", "b"), ("node-3", "b")]
            moves: dict[str, dict[str, Any]] = {}
            for env in await desired_log(url):
                d = decode(DesiredState, env.payload)
                if d.rollout == rid:
                    moves.setdefault(d.node, d.slots)  # each node's first write of it
            assert {n: set(slots) for n, slots in moves.items()} == {
                "node-2": {"b"}, "node-1": {"a", "b"}, "node-3": {"a", "b"}}
            events = await told(url, rid, "rollout.succeeded")
            audit(events)
            assert updating_order(events) == ["node-2", "node-1", "node-3"]

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
