"""End to end, blue-green (issue 6): a dev fleet of 3 real agents on 127.0.10.1-3 running the
example ``hello`` service behind their routers, driven with the real CLI under steady traffic.

What holds: the switch and a rollback inside the warm window lose no request, and that rollback
starts no process (psutil sees no new pid, only the retired new ones gone); after the window a
rollback re-stages the old release; a post-switch gate (2.2.0, 50% errors) switches back by itself
with no process started; a node that fails to stage (2.4.0 on node-2) switches nothing anywhere.

Figures (run with ``pytest -s tests/integration/test_e2e_blue_green.py``): the switch spread
across nodes (first to last router switched, from ``record.report["switch"]``) and the rollback
time, from ``fleetwave rollback hello`` being started to the last node answering with the old
version.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from coordinator.dev.devfleet import DevFleet
from tests.integration.e2e_support import (
    DEPLOY_TIMEOUT,
    events_of,
    loaded,
    push,
    service_pids,
    serving,
    settle,
    status,
)
from tests.integration.procs import fleetwave, wait_until

SUBNET = "127.0.10"
NODES = ("node-1", "node-2", "node-3")
BLUE_GREEN = ("--strategy", "blue-green")

Pids = dict[int, tuple[str, str, str]]


def fleet_at(tmp_path: Path) -> DevFleet:
    return DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5, subnet=SUBNET)


async def install(fleet: DevFleet, version: str) -> None:
    """Deploy ``version`` (rolling) and wait until every router answers with it."""
    code, out, err = await fleetwave("deploy", "hello", version, "--batch", "100%",
                                     nats_url=fleet.nats_url, timeout=DEPLOY_TIMEOUT)
    assert code == 0, f"install of {version} failed ({code}): {out}{err}"
    await all_serve(fleet, version)


async def all_serve(fleet: DevFleet, version: str, *, interval: float = 0.1) -> None:
    await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {version},
                     timeout=30, what=f"every node serving {version}", interval=interval)


class PidWatch:
    """Every service pid seen by polling psutil while the block runs (a process started and
    stopped between two polls of ~50 ms could hide; a slot's start takes far longer)."""

    def __init__(self, fleet: DevFleet) -> None:
        self.fleet = fleet
        self.seen: Pids = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PidWatch:
        self.seen.update(await service_pids(self.fleet))
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 10)
        self.seen.update(await service_pids(self.fleet))

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.update(await service_pids(self.fleet))
            await asyncio.sleep(0.02)


async def wait_pids(fleet: DevFleet, ok: Any, what: str) -> Pids:
    result: Pids = await wait_until(lambda: service_pids(fleet), ok, timeout=30, what=what)
    return result


def versions_of(pids: Pids) -> set[str]:
    return {v for _, _, v in pids.values()}


async def finished(url: str, rid: str) -> dict[str, Any]:
    return await wait_until(lambda: status(url, rid), lambda s: s["state"] != "running",
                            timeout=90, what=f"rollout {rid} to end")


async def test_switch_and_rollback_inside_the_window(tmp_path: Path) -> None:
    """1.0.0 → 2.0.0 blue-green switches every node at once with no failed request; `fleetwave
    rollback` inside the warm window switches back with no failed request and no new process.
    The followed deploy returns 0 at the switch (blue-green's ``--wait switched``), saying how
    to roll back while the old slots are warm."""
    async with fleet_at(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        blue = await wait_pids(fleet, lambda p: len(p) == 3, "one 1.0.0 process per node")
        assert versions_of(blue) == {"1.0.0"}

        async with loaded(fleet) as traffic:
            deploy: asyncio.Task[tuple[int, str, str]] = asyncio.create_task(fleetwave(
                "deploy", "hello", "2.0.0", *BLUE_GREEN, "--scale-down-delay", "5m",
                nats_url=url, timeout=DEPLOY_TIMEOUT))
            st = await wait_until(
                lambda: status(url),
                lambda s: s["version"] == "2.0.0" and
                s["report"].get("switch", {}).get("spread") is not None,
                timeout=60, what="the switch to be reported")
            rid = st["id"]
            assert st["state"] == "running" and st["current_wave"] == 1, st
            code, out, err = await asyncio.wait_for(deploy, 10)
            assert code == 0, f"the followed deploy should return at the switch: {out}{err}"
            assert f"rollout {rid} switched" in out and "'fleetwave rollback hello'" in out, out
            assert "switched 3 nodes at once" in out, out
            switch = st["report"]["switch"]
            assert sorted(switch["nodes"]) == list(NODES), switch
            await all_serve(fleet, "2.0.0")
            await settle(traffic, "2.0.0")
            both = await service_pids(fleet)
            assert versions_of(both) == {"1.0.0", "2.0.0"} and len(both) == 6, both
            assert set(blue) <= set(both), "the old slots must stay warm"
            at_switch = traffic.snapshot()
            assert at_switch.failed == 0, at_switch.failures
            assert {"1.0.0", "2.0.0"} <= set(at_switch.versions), at_switch.versions

            async with PidWatch(fleet) as watch:
                started, wall = time.monotonic(), time.time()
                code, out, err = await fleetwave("rollback", "hello", nats_url=url)
                answered = time.monotonic() - started
                assert code == 0, f"rollback failed ({code}): {out}{err}"
                assert rid in out and "rolling back" in out, out
                await all_serve(fleet, "1.0.0", interval=0.01)
                rollback_s = time.monotonic() - started
                await wait_pids(fleet, lambda p: set(p) == set(blue),
                                "the switched-back 2.0.0 slots to be retired")
            await settle(traffic, "1.0.0")
            report = await traffic.stop()

        new_pids = set(watch.seen) - set(both)
        assert not new_pids, f"the switch back started processes: {new_pids}"
        assert report.failed == 0, report.failures
        # The retired slots' processes are gone before their agents' reports reach the engine,
        # which ends the rollout on them: wait, bounded, for that end.
        final = await finished(url, rid)
        assert final["state"] == "rolled_back", final
        back = final["report"]["switch_back"]
        assert sorted(back["nodes"]) == list(NODES) and back["spread"] is not None, back
        evs = await events_of(url, rid)
        when = {e["kind"]: float(e["time"]) - wall for e in evs}
        kinds = [e["kind"] for e in evs]
        assert "bluegreen.switched" in kinds and "bluegreen.switched_back" in kinds, kinds

    print(f"\nblue-green 1.0.0 -> 2.0.0 on 3 nodes: switch spread {switch['spread'] * 1000:.1f} ms "
          f"(first to last node), lag {switch['lag'] * 1000:.1f} ms after the decision; "
          f"{at_switch.requests} requests, 0 failed")
    asked, back_at = when["rollout.rolling_back"], when["bluegreen.switched_back"]
    print(f"fleetwave rollback hello (inside the window) -> last node serving 1.0.0: "
          f"{rollback_s:.3f}s; the coordinator had the request at +{asked:.3f}s (the CLI "
          f"process starting), every router switched back at +{back_at:.3f}s (spread "
          f"{back['spread'] * 1000:.1f} ms), the CLI answered at +{answered:.3f}s; "
          f"{report.requests} requests in all, 0 failed, no process started")


async def test_after_the_window_a_rollback_restages(tmp_path: Path) -> None:
    """Once --scale-down-delay has passed the old slots are retired and the rollout succeeds
    (exit 0, spread in the deploy output); a rollback then re-stages 1.0.0 in a new process,
    losing no request."""
    async with fleet_at(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        blue = await wait_pids(fleet, lambda p: len(p) == 3, "one 1.0.0 process per node")

        async with loaded(fleet) as traffic:
            code, out, err = await fleetwave("deploy", "hello", "2.0.0", *BLUE_GREEN,
                                             "--scale-down-delay", "2s", "--wait", "done",
                                             nats_url=url,
                                             timeout=DEPLOY_TIMEOUT)
            assert code == 0, f"blue-green 2.0.0 failed ({code}): {out}{err}"
            assert "switched 3 nodes at once" in out, out
            st = await status(url)
            assert st["report"]["switch"]["spread"] is not None, st["report"]
            green = await wait_pids(fleet, lambda p: versions_of(p) == {"2.0.0"},
                                    "the 1.0.0 slots to be retired after the window")
            assert not set(green) & set(blue) and len(green) == 3, green

            started = time.monotonic()
            code, out, err = await fleetwave("rollback", "hello", "-o", "json", nats_url=url)
            assert code == 0, f"rollback failed ({code}): {out}{err}"
            assert "deploying hello 1.0.0" in out, out
            await all_serve(fleet, "1.0.0", interval=0.02)
            restage_s = time.monotonic() - started
            rid = (await status(url))["id"]
            final = await finished(url, rid)
            assert final["state"] == "succeeded" and final["strategy"] == "blue-green", final
            await settle(traffic, "1.0.0")
            report = await traffic.stop()

        again = await wait_pids(fleet, lambda p: versions_of(p) == {"1.0.0"},
                                "the 2.0.0 slots to be retired")
        assert len(again) == 3 and not set(again) & (set(blue) | set(green)), again
        assert report.failed == 0, report.failures
        assert {"1.0.0", "2.0.0"} <= set(report.versions), report.versions

    print(f"\nfleetwave rollback hello (after the window, a new blue-green rollout) -> last node "
          f"serving 1.0.0: {restage_s:.3f}s; {report.requests} requests, 0 failed")


async def test_post_switch_gate_switches_back_by_itself(tmp_path: Path) -> None:
    """2.2.0 (every other request a 500) stages healthy and is switched to; the error-rate gate
    fails during the bake and switches every node back (exit 3) with no process started, and
    the only failed requests are 2.2.0's own 500s."""
    async with fleet_at(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.2.0")
        await install(fleet, "1.0.0")
        blue = await wait_pids(fleet, lambda p: len(p) == 3, "one 1.0.0 process per node")

        async with loaded(fleet) as traffic:
            deploy = asyncio.create_task(fleetwave(
                "deploy", "hello", "2.2.0", *BLUE_GREEN, "--max-error-rate", "10%",
                "--wait", "done", "--bake", "5s", "--scale-down-delay", "5m", nats_url=url,
                timeout=DEPLOY_TIMEOUT))
            st = await wait_until(
                lambda: status(url),
                lambda s: s["version"] == "2.2.0" and "switch" in s["report"],
                timeout=60, what="the switch to be decided")
            rid = st["id"]
            staged = await service_pids(fleet)
            assert versions_of(staged) == {"1.0.0", "2.2.0"} and len(staged) == 6, staged
            async with PidWatch(fleet) as watch:
                code, out, err = await asyncio.wait_for(deploy, DEPLOY_TIMEOUT)
                assert code == 3, f"2.2.0 should be switched back, got {code}: {out}{err}"
                await all_serve(fleet, "1.0.0")
                await wait_pids(fleet, lambda p: set(p) == set(blue),
                                "the 2.2.0 slots to be retired")
            await settle(traffic, "1.0.0")
            report = await traffic.stop()

        assert not set(watch.seen) - set(staged), "the switch back started a process"
        assert report.versions["2.2.0"] > 0, report.versions  # the switch did happen
        assert report.failed > 0 and all("answered 500" in f for f in report.failures), \
            report.failures
        final = await status(url, rid)
        assert final["state"] == "rolled_back" and "error rate" in final["reason"], final
        back = final["report"]["switch_back"]
        assert sorted(back["nodes"]) == list(NODES), final["report"]
        when = {e["kind"]: float(e["time"]) for e in await events_of(url, rid)}

    print(f"\n2.2.0 error-rate gate failed -> every router switched back: "
          f"{when['bluegreen.switched_back'] - when['gate.failed']:.3f}s (spread "
          f"{back['spread'] * 1000:.1f} ms); {report.requests} requests, {report.failed} of them "
          "2.2.0's own 500s, no other failure, no process started")


async def test_failed_staging_switches_nothing(tmp_path: Path) -> None:
    """2.4.0 never gets healthy on node-2: the rollout ends rolled back naming node-2, no request
    is ever answered by 2.4.0, the staged slots are retired; node-1 and node-3 ran the release's
    validate hook before calling their slots ready."""
    async with fleet_at(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.4.0")
        await install(fleet, "1.0.0")
        blue = await wait_pids(fleet, lambda p: len(p) == 3, "one 1.0.0 process per node")

        async with loaded(fleet) as traffic:
            code, out, err = await fleetwave("deploy", "hello", "2.4.0", *BLUE_GREEN,
                                             "--progress-deadline", "15s", nats_url=url,
                                             timeout=DEPLOY_TIMEOUT)
            assert code == 3, f"2.4.0 should be rolled back, got {code}: {out}{err}"
            await wait_pids(fleet, lambda p: set(p) == set(blue), "the staged slots to retire")
            await settle(traffic, "1.0.0")
            report = await traffic.stop()

        assert report.failed == 0, report.failures
        assert set(report.versions) == {"1.0.0"}, report.versions
        st = await status(url)
        assert st["state"] == "rolled_back" and "node-2" in st["reason"], st
        assert "switch" not in st["report"], st["report"]
        assert st["waves"][1]["state"] == "waiting", st["waves"]
        for node in ("node-1", "node-3"):
            logs = list((fleet.dir / node).rglob("hello-*.validate.log"))
            assert logs and "smoke ok: 2.4.0" in logs[0].read_text(), (node, logs)
        assert not list((fleet.dir / "node-2").rglob("hello-*.validate.log"))

