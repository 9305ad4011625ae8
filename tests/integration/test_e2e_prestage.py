"""End to end: pre-staged rolling (``deploy --prestage``) on a dev fleet of 4 real agents running
the example ``hello`` service, under steady load through their routers (127.0.71.i:8080).

- 1.0.0 → 2.0.0, one node a wave, one wave ahead: every node of waves 1-3 reports its new slot
  healthy (``node.staged``, from the record's own decisions) before its wave starts, its wave is
  a router switch (``node.updating`` says staged) and no request fails;
- a coordinator SIGKILLed while wave 1 bakes and wave 2 is staged resumes exactly: the staged
  node is not staged again, each node moves once, the rollout succeeds; switched nodes still run
  their old slot then (its drain comes after the rollout, off every wave's path);
- 2.4.0, whose health check never passes on node-2: node-2's staging fails while wave 0 bakes,
  is reported before wave 1 starts, and the rollout rolls back (exit 3) with every node serving
  the old version and no 2.4.0 process left running anywhere.

Prints (run with -s) the time of the staged rollout against the same rollout with
``--prestage 0``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from coordinator.dev.devfleet import DevFleet
from protocol.bus import Bus
from protocol.messages import RolloutRecord
from tests.integration.e2e_support import (
    DEPLOY_TIMEOUT,
    audit,
    deploy_detached,
    install,
    loaded,
    push,
    record_of,
    service_pids,
    serving,
    settle,
    told,
)
from tests.integration.procs import fleetwave, wait_until

SUBNET = "127.0.71"
NODES = ["node-1", "node-2", "node-3", "node-4"]
# A bake longer than a hello slot takes to start and pass its health checks (under a second
# here): the next wave's node is then always staged healthy before its turn, which is what this
# test proves from the events. Without a bake a staged node's wave may come before its slot is
# healthy; it is then an ordinary update of a slot already starting.
ONE_A_WAVE = ("--batch", "1", "--max-unavailable", "1", "--bake", "3s")


def first(events: list[dict[str, Any]], kind: str, **data: Any) -> float:
    """The time of the first event of ``kind`` whose data holds ``data``."""
    for e in events:
        if e["kind"] == kind and all(e["data"].get(k) == v for k, v in data.items()):
            return float(e["time"])
    raise AssertionError(f"no {kind} {data} in {[e['kind'] for e in events]}")


def assert_switches_were_staged(events: list[dict[str, Any]], waves: list[list[str]]) -> None:
    """Every node of every wave after the first was staged healthy before its wave started,
    and its wave gave it traffic in the slot it was staged in."""
    for index, nodes in enumerate(waves):
        if index == 0:
            continue
        started = first(events, "wave.started", wave=index)
        for node in nodes:
            staged = [e for e in events if e["kind"] == "node.staged" and e["node"] == node]
            assert len(staged) == 1, f"{node} staged {len(staged)} times"
            assert float(staged[0]["time"]) <= started, f"{node} staged after wave {index}"
            (moved,) = [e for e in events if e["kind"] == "node.updating" and e["node"] == node]
            assert moved["data"].get("staged") is True, moved
            assert moved["data"]["slot"] == staged[0]["data"]["slot"], (moved, staged)


async def deployed(url: str, version: str, *flags: str) -> tuple[int, str, float]:
    """``fleetwave deploy hello VERSION FLAGS`` followed to its end: exit code, output, seconds."""
    started = time.monotonic()
    code, out, err = await fleetwave("deploy", "hello", version, *flags, nats_url=url,
                                     timeout=DEPLOY_TIMEOUT)
    return code, out + err, time.monotonic() - started


async def latest(url: str) -> str:
    code, out, err = await fleetwave("status", "-o", "json", nats_url=url)
    assert code == 0, err
    return str(json.loads(out)["id"])


async def test_prestaged_rolling_switches_staged_slots_resumes_and_fails_early(
        tmp_path: Path) -> None:
    """Staged waves are switches with 0 failed requests; a restart keeps them staged; a
    staging failure is reported before its wave and rolls back cleanly."""
    async with DevFleet(tmp_path / "fleet", agents=4, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0", "2.4.0")
        await install(fleet, "1.0.0")
        bus = await Bus.connect(url, fleet.fleet, name="prestage-test")
        try:
            # 1. Staged one wave ahead, under load: every later wave is a switch.
            async with loaded(fleet) as traffic:
                code, out, staged_s = await deployed(url, "2.0.0", *ONE_A_WAVE, "--prestage", "1")
                assert code == 0, f"staged rollout failed ({code}): {out}"
                await settle(traffic, "2.0.0")
            assert traffic.report.failed == 0, traffic.report.failures[:10]
            rid = await latest(url)
            record = await record_of(bus, rid)
            assert record.prestage == 1
            waves = [w.nodes for w in record.waves]
            assert waves == [[n] for n in NODES]
            assert [record.nodes[n].staged for n in NODES] == ["", "staged", "staged", "staged"]
            events = await told(url, rid, "rollout.succeeded")
            audit(events)
            assert_switches_were_staged(events, waves)

            # The same rollout back to 1.0.0 without staging, for the figure.
            code, out, plain_s = await deployed(url, "1.0.0", *ONE_A_WAVE, "--prestage", "0")
            assert code == 0, f"unstaged rollout failed ({code}): {out}"

            # 2. A coordinator killed while wave 1 bakes and wave 2's node is staged resumes
            # exactly: nothing staged twice, each node moved once.
            async with loaded(fleet) as traffic:
                rid = await deploy_detached(url, "2.0.0", *ONE_A_WAVE, "--prestage", "1")

                def wave_1_baking_2_staged(r: RolloutRecord) -> bool:
                    return (r.current_wave == 1 and r.waves[1].state == "baking"
                            and r.nodes["node-3"].staged == "staged")

                await wait_until(lambda: record_of(bus, rid), wave_1_baking_2_staged,
                                 timeout=60, what="wave 1 baking with node-3 staged")
                # Switched nodes keep their old slot running at weight 0 (drained and stopped
                # when the rollout succeeds, off every wave's path); node-3 runs both ahead.
                running = set((await service_pids(fleet)).values())
                for node in ("node-1", "node-2", "node-3"):
                    assert {v for n, _, v in running if n == node} == {"1.0.0", "2.0.0"}, running
                await fleet.coordinator.kill()
                await fleet.coordinator.start()
                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running", timeout=90,
                                         what="the rollout to end after the restart")
                assert final.state == "succeeded", (final.state, final.reason)
                await settle(traffic, "2.0.0")
            assert traffic.report.failed == 0, traffic.report.failures[:10]
            events = await told(url, rid, "rollout.succeeded")
            audit(events)
            staging = sorted(e["node"] for e in events if e["kind"] == "node.staging")
            assert staging == ["node-2", "node-3", "node-4"], staging
            assert_switches_were_staged(events, [w.nodes for w in final.waves])

            # 3. node-2 cannot pass its health check on 2.4.0: its staging fails while wave 0
            # bakes, before wave 1, and the rollout rolls back.
            async with loaded(fleet) as traffic:
                # Wave 0 bakes 30 s: node-2's start_timeout (10 s) fails its staging first.
                code, out, _ = await deployed(url, "2.4.0", *ONE_A_WAVE[:4], "--prestage", "1",
                                              "--bake", "30s")
                assert code == 3, f"2.4.0 should roll back, got {code}: {out}"
                rid = await latest(url)
                events = await told(url, rid, "rollout.rolled_back")
                audit(events)
                failed = [e for e in events if e["kind"] == "node.failed"]
                assert [(e["node"], e["data"].get("staging")) for e in failed] == [
                    ("node-2", True)], failed
                assert not [e for e in events
                            if e["kind"] == "wave.started" and e["data"]["wave"] > 0]
                record = await record_of(bus, rid)
                assert record.state == "rolled_back" and "staging failed: node-2" in record.reason
                await wait_until(lambda: serving(fleet),
                                 lambda v: set(v.values()) == {"2.0.0"}, timeout=30,
                                 what="every node serving 2.0.0 again")
                await wait_until(lambda: service_pids(fleet),
                                 lambda pids: not [p for p in pids.values() if p[2] == "2.4.0"],
                                 timeout=30, what="no 2.4.0 process left running")
            assert traffic.report.failed == 0, traffic.report.failures[:10]
        finally:
            await bus.close()
    print(f"\nrolling 1.0.0 -> 2.0.0 on 4 nodes, one a wave: staged {staged_s:.2f}s, "
          f"not staged {plain_s:.2f}s")
