"""The leader paces the fleet's heartbeats (``coordinator.core.pace``), on real processes.

A real broker, the real coordinator with ``--max-heartbeats-per-second 2`` and three real agents
started with ``--heartbeat-interval 0.5`` (6 beats a second in all): the leader tells them 1.5 s
(3 nodes / 2 a second), every agent announces it in its next heartbeat and then beats on that
grid, and no node is judged offline by its old interval (it would be after 1.5 s of silence).
A malformed pace (anyone may publish on a bus without credentials) is one line in the agent's
log, once, and changes nothing; an agent restarted beats at its own interval until it registers,
and hears the pace again at once. A node paced every 10 s under traffic reports counters alone
once a pace, and every read while a gate judges its wave.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import msgspec

from agent.manager.service import STATS_FAST_AFTER_SWITCH
from coordinator.dev.devfleet import DevFleet
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.messages import Heartbeat, ObservedState, Pace
from tests.integration.e2e_support import (
    deploy_detached,
    events_of,
    install,
    loaded,
    push,
    status,
)
from tests.integration.procs import fleetwave, nodes_json, online, read_text, wait_until

SUBNET = "127.0.74"
NODES = ["node-1", "node-2", "node-3"]
PACED = 1.5  # 3 nodes at 2 heartbeats a second


async def test_the_leader_paces_the_fleets_heartbeats(tmp_path: Path) -> None:
    fleet = DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5, subnet=SUBNET)
    fleet.coordinator.argv += ["--max-heartbeats-per-second", "2"]
    async with fleet:
        bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="test-pace")
        beats: dict[str, list[tuple[float, float]]] = {n: [] for n in NODES}

        async def on_beat(subject: str, data: bytes) -> None:
            hb = decode(Heartbeat, data)
            beats[hb.node].append((time.monotonic(), hb.interval))

        async def paced_beats() -> dict[str, list[float]]:
            return {n: [t for t, i in b if i == PACED] for n, b in beats.items()}

        try:
            await bus.subscribe(subjects.heartbeats(fleet.fleet), on_beat)
            # Every agent announces the pace, then beats on its grid: no two paced beats
            # closer than the pace allows (the first one, announcing it, goes out at once).
            got = await wait_until(paced_beats, lambda b: all(len(t) >= 4 for t in b.values()),
                                   timeout=30, what="four paced heartbeats from every node")
            for node, times in got.items():
                gaps = [b - a for a, b in itertools.pairwise(times[1:])]
                assert min(gaps) > PACED * 0.8, (node, gaps)
                assert all(i == PACED for _, i in beats[node][-2:]), beats[node][-2:]
            rows = await nodes_json(fleet.nats_url)
            assert online(rows, NODES), rows
            said = await read_text(fleet.coordinator.log_path)
            assert "heartbeat pace: 3 nodes at most 2 heartbeats/s" in said, said[-2000:]
            assert "is offline" not in said, said[-2000:]
            for i in (1, 2, 3):
                text = await read_text(fleet.agent(i).log_path)
                assert "heartbeat every 1.5s: the coordinator paces 3 nodes" in text, text

            # Malformed paces: one line in each agent's log, the pace in force unchanged.
            for junk in (b"{not json", b'{"interval": -1}', b'{"interval": 9999}'):
                await bus.publish(subjects.pace(fleet.fleet), junk)
            for i in (1, 2, 3):
                text = await wait_until(
                    lambda i=i: read_text(fleet.agent(i).log_path),  # type: ignore[misc]
                    lambda t: "ignored a malformed pace" in t, timeout=20,
                    what=f"node-{i} to log the malformed pace")
                assert text.count("ignored a malformed pace") == 1, text
            mark = time.monotonic()
            await wait_until(paced_beats,
                             lambda b: all(sum(t > mark for t in ts) >= 2 for ts in b.values()),
                             timeout=20, what="paced heartbeats after the malformed ones")
            assert all(i == PACED for b in beats.values() for t, i in b if t > mark)

            # A restarted agent: its own 0.5 s until it registers, then the pace again at once.
            mark = time.monotonic()
            await fleet.agent(1).restart()
            await wait_until(paced_beats, lambda b: any(t > mark for t in b["node-1"]),
                             timeout=30, what="node-1 restarted to beat at the pace")
            rows = await nodes_json(fleet.nats_url)
            assert online(rows, NODES), rows
        finally:
            await bus.close()


async def test_a_bad_rate_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """``--max-heartbeats-per-second`` out of range or not a number: one line naming the flag,
    before anything connects or any key file is made."""
    for value in ("0", "-5", "lots", "2e6"):
        code, out, err = await fleetwave("coordinator", "--key-file", str(tmp_path / "k.seed"),
                                         "--max-heartbeats-per-second", value,
                                         nats_url="nats://127.0.74.1:1")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (value, err)
        assert "--max-heartbeats-per-second" in lines[0] and "Traceback" not in err, err
        assert out == ""
    assert not (tmp_path / "k.seed").exists()


async def test_a_restarted_coordinator_waits_for_the_first_paced_beats(tmp_path: Path) -> None:
    """Three nodes paced every 20 s (a rate of 0.15), the coordinator restarted while a wave
    bakes, right after the nodes beat (so the next beats are a whole pace away): it cannot know
    their last beats, so the resumed rollout gives each node three paced intervals to be heard
    (``pace.startup_grace``) and counts none lost. With the runner's fixed 10 s grace every node
    was "lost (offline) during wave 0 while baking" and the rollout rolled back."""
    fleet = DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5, subnet=SUBNET)
    fleet.coordinator.argv += ["--max-heartbeats-per-second", "0.15"]
    async with fleet:
        url = fleet.nats_url
        bus = await Bus.connect(url, fleet.fleet, name="test-pace-restart")
        beats: asyncio.Queue[float] = asyncio.Queue()

        async def on_beat(subject: str, data: bytes) -> None:
            beats.put_nowait(time.monotonic())

        try:
            await bus.subscribe(subjects.heartbeats(fleet.fleet), on_beat)
            await push(url, "1.0.0", "2.0.0")
            await install(fleet, "1.0.0")
            rid = await deploy_detached(url, "2.0.0", "--batch", "100%", "--max-unavailable",
                                        "100%", "--bake", "45s")
            await wait_until(lambda: status(url, rid),
                             lambda s: s["waves"][0]["state"] == "baking", timeout=60,
                             what="the wave to bake")
            while not beats.empty():
                beats.get_nowait()
            await asyncio.wait_for(beats.get(), timeout=30)  # a fresh beat: the next is 20 s off
            await fleet.coordinator.stop()
            await fleet.coordinator.start()
            await wait_until(lambda: nodes_json(url), lambda rows: online(rows, NODES),
                             timeout=60, what="the restarted coordinator to hear every node")
            final = await wait_until(lambda: status(url, rid), lambda s: s["state"] != "running",
                                     timeout=90, what="the resumed rollout to end")
        finally:
            await bus.close()
        assert final["state"] == "succeeded", final.get("reason")
        lost = [e["message"] for e in await events_of(url, rid) if "offline" in e["message"]]
        assert not lost, lost
        said = await read_text(fleet.coordinator.log_path)
        assert "is offline" not in said, said[-3000:]


async def test_a_paced_node_reports_counters_alone_once_a_pace(tmp_path: Path) -> None:
    """One node paced every 10 s (a rate of 0.1) serving steady traffic: its router is read
    every 2 s and every read brings new counters, yet its observed reports go out about once a
    pace (the coordinator takes as many reports as heartbeats); while a rollout that bakes runs
    (the pace names its service) it reports every read. Before, every read was a report:
    50,000 such agents sent 25,000 a second at rest."""
    fleet = DevFleet(tmp_path / "fleet", agents=1, heartbeat_interval=0.5, subnet=SUBNET)
    fleet.coordinator.argv += ["--max-heartbeats-per-second", "0.1"]
    async with fleet:
        url = fleet.nats_url
        bus = await Bus.connect(url, fleet.fleet, name="test-pace-reports")
        reports: list[tuple[float, bytes]] = []

        async def on_report(subject: str, data: bytes) -> None:
            reports.append((time.monotonic(), data))

        def since(mark: float) -> list[str]:
            """What changed in each report after ``mark``, but the counters (the failures'
            story)."""
            out, before = [], None
            for t, data in reports:
                obs = decode(ObservedState, data)
                if obs.router is not None:
                    obs.router.slots, obs.router.time = {}, 0.0
                obs.time = 0.0
                now = msgspec.to_builtins(obs)
                if t > mark:
                    changed = {k: v for k, v in now.items() if (before or {}).get(k) != v}
                    out.append(f"{t - mark:.1f}s {sorted(changed) or 'counters'}")
                before = now
            return out

        paces: list[tuple[float, list[str]]] = []

        async def on_pace(subject: str, data: bytes) -> None:
            paces.append((time.monotonic(), decode(Pace, data).reading))

        try:
            await bus.subscribe(f"$KV.{subjects.observed_bucket(fleet.fleet)}.node-1.hello",
                                on_report)
            await bus.subscribe(subjects.pace(fleet.fleet), on_pace)
            await push(url, "1.0.0", "2.0.0")
            await install(fleet, "1.0.0")
            switched = time.monotonic()
            await wait_until(lambda: read_text(fleet.agent(1).log_path),
                             lambda t: "heartbeat every 10s" in t, timeout=30,
                             what="node-1 to hear the pace")
            async with loaded(fleet, rate=20.0) as traffic:
                await wait_until(lambda: asyncio.sleep(0, traffic.report.versions["1.0.0"]),
                                 lambda n: n >= 20, timeout=20, what="traffic on 1.0.0")
                # A router whose weights changed reports every read for a while (its first
                # seconds are what a gate judges first): measured once that is over, when a
                # read (every 2 s, with traffic) has gone unreported.
                await wait_until(lambda: asyncio.sleep(0, reports[-1][0] if reports else 0.0),
                                 lambda last: time.monotonic() - last > 3.0,
                                 timeout=STATS_FAST_AFTER_SWITCH + 20,
                                 what="node-1's reports to follow the pace")
                assert time.monotonic() > switched + STATS_FAST_AFTER_SWITCH
                mark = time.monotonic()
                # An upper bound on the reports over a window can only be seen over the whole
                # window: 12 reads of the router.
                await asyncio.sleep(25.0)
                paced = since(mark)
                deployed = time.monotonic()
                rid = await deploy_detached(url, "2.0.0", "--batch", "100%",
                                            "--max-unavailable", "100%", "--bake", "30s")
                await wait_until(lambda: status(url, rid),
                                 lambda s: s["waves"][0]["state"] == "baking", timeout=60,
                                 what="the wave to bake")
                mark = time.monotonic()
                judged = await wait_until(lambda: asyncio.sleep(0, since(mark)),
                                          lambda got: len(got) >= 4, timeout=10.0,
                                          what="4 reports in 10 s (5 reads) while it bakes")
                final = await wait_until(lambda: status(url, rid),
                                         lambda s: s["state"] != "running", timeout=90,
                                         what="the rollout to end")
                ended = time.monotonic()

                def cleared(ps: list[tuple[float, list[str]]]) -> bool:
                    named = [t for t, r in ps if r == ["hello"]]
                    return bool(named) and any(t > named[0] and r == [] for t, r in ps)

                # The leader said at once that the rollout reads hello's counters, and that it
                # no longer does once it ended (a pace's repeat is 30 s away).
                await wait_until(lambda: asyncio.sleep(0, paces), cleared, timeout=5,
                                 what="the pace to stop naming hello")
        finally:
            await bus.close()
        named = [t for t, r in paces if r == ["hello"]]
        assert named[0] - deployed < 3.0, (deployed, paces)
        assert min(t for t, r in paces if t > named[0] and r == []) < ended + 3.0, paces
        assert 1 <= len(paced) <= 4, paced
        assert len(judged) >= 4, judged  # (wait_until's bound: within 10 s)
        assert final["state"] == "succeeded", final.get("reason")
