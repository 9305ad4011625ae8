"""Takeover after a leader's death: the first part of bench_failover (kept in its own module so
that bench_failover stays one table of two parts).

Two coordinators (the same key) and ``--simulate N`` nodes on one broker; rolling rollouts back
and forth (1.0.0 ↔ 2.0.0, waves of 5 %, bake 0) run all along. ``kills`` times: wait a random
0.5-2 s into the wave work, SIGKILL whichever coordinator leads, start it again (it comes back as
a standby, ready before the next kill: a standby is always there to take over), and measure from
the kill:

- lease: until the ``leader`` verb names another holder (polled every 20 ms);
- write: until the new leader's first write lands in the rollouts bucket (its fence marker,
  then its records: a KV watch, the first entry of a higher term);
- wave: until the next ``wave.started`` event of any rollout reaches us (a deploy request
  lost with the leader is asked again after 5 s, so one kill in a run may count those).

Polls of the ``leader`` verb that get no answer within 1 s are counted and asked again.
"""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import time
from typing import Any

from perf_support import SimFleet, rolling

from coordinator.dev.devfleet import Child, python_module
from protocol import subjects
from protocol.codec import decode
from protocol.errors import ProtocolError
from protocol.messages import FenceMarker, RolloutRecord

POLL = 0.02


async def takeover(nodes: int, kills: int, seed: int = 1,
                   keep: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    async with SimFleet(nodes, keep=keep) as fleet:
        assert fleet.bus is not None
        standby = Child("coordinator-2", python_module(
            "coordinator.daemon", "--nats", fleet.broker.url, "--fleet", fleet.fleet,
            "coordinator", "--key-file", str(fleet.key_file)),
            fleet.dir / "logs" / "coordinator-2.log")
        await standby.start()
        coordinators = [fleet.coordinator, standby]
        terms: list[tuple[float, int]] = []  # (arrival, term) of every write to the rollouts bucket

        async def watch() -> None:
            assert fleet.bus is not None
            async for entry in fleet.bus.watch(subjects.rollouts_bucket(fleet.fleet), ">"):
                if entry is None or entry.value is None:
                    continue
                try:
                    term = (decode(FenceMarker, entry.value).term
                            if entry.key == subjects.FENCE_KEY
                            else decode(RolloutRecord, entry.value).term)
                except ProtocolError:
                    continue
                terms.append((time.monotonic(), term))

        async def roll() -> None:
            version = "1.0.0"
            while True:
                try:
                    # A request the leader took and then died with is never answered: asked
                    # again after 5 s, not after the 60 s default (one such wait was measured
                    # as a 57 s "takeover"). A deploy it had recorded is refused as locked
                    # until that rollout, resumed by the next leader, ends.
                    rid, _ = await fleet.deploy(rolling(version, batch="5%"), timeout=5)
                    await fleet.finish(rid, timeout=120 + nodes / 10)
                except RuntimeError:  # refused during a takeover: ask again
                    await asyncio.sleep(0.2)
                    continue
                version = "2.0.0" if version == "1.0.0" else "1.0.0"

        watcher = asyncio.ensure_future(watch())
        roller = asyncio.ensure_future(roll())
        lease_s: list[float] = []
        write_s: list[float] = []
        wave_s: list[float] = []
        unanswered = 0
        try:
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                lease = await fleet.api("leader", {})
                leader = next(c for c in coordinators if c.pid == lease.get("pid"))
                killed, since = time.monotonic(), time.time()
                leader.signal(signal.SIGKILL)
                while True:
                    try:
                        now = await fleet.api("leader", {}, timeout=1)
                    except RuntimeError:  # no answer within 1 s: counted, asked again
                        unanswered += 1
                        await asyncio.sleep(POLL)
                        continue
                    if now.get("holder") not in (None, lease["holder"]):
                        lease_s.append(time.monotonic() - killed)
                        break
                    await asyncio.sleep(POLL)
                await leader.wait(timeout=10)
                readies = ready_lines(leader)
                await leader.start()  # back as a standby; ready before the next kill
                await first(lambda r=readies, c=leader: [time.monotonic()]
                            if ready_lines(c) > r else [])
                old = int(lease["term"])
                write_s.append(await first(lambda k=killed, o=old: [
                    t for t, term in terms if t > k and term > o]) - killed)
                wave_s.append(await first(lambda w=since: [
                    s.received for s in fleet.tap.events
                    if s.event.kind == "wave.started" and s.received > w]) - since)
        finally:
            roller.cancel()
            watcher.cancel()
            await asyncio.gather(roller, watcher, return_exceptions=True)
            await standby.stop(timeout=10)

    def stats(xs: list[float]) -> dict[str, float]:
        return {"p50_s": round(statistics.median(xs), 3), "max_s": round(max(xs), 3),
                "min_s": round(min(xs), 3)}

    return {"nodes": nodes, "kills": kills, "lease": stats(lease_s),
            "first_write": stats(write_s), "next_wave": stats(wave_s),
            "unanswered_reads": unanswered}


def ready_lines(child: Child) -> int:
    """How many times the coordinator's log says it was ready (once a start)."""
    try:
        return child.log_path.read_text(errors="replace").count(" ready on ")
    except FileNotFoundError:
        return 0


async def first(seen: Any, timeout: float = 60.0) -> float:
    """The earliest of the times ``seen()`` lists, once it lists any (polled)."""
    deadline = time.monotonic() + timeout
    while not (times := seen()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing seen within {timeout:g}s after a kill")
        await asyncio.sleep(POLL)
    return float(min(times))


def takeover_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    def line(s: dict[str, float]) -> str:
        return f"p50 {s['p50_s']:.2f} s, max {s['max_s']:.2f} s (min {s['min_s']:.2f} s)"
    return [
        ("kills", f"{r['kills']} SIGKILLs of the leader, {r['nodes']} simulated nodes"),
        ("→ standby holds the lease", line(r["lease"])),
        ("→ its first write lands", line(r["first_write"])),
        ("→ next wave started", line(r["next_wave"])),
        ("reads unanswered in 1 s", f"{r['unanswered_reads']} (of the polls during takeovers)"),
    ]
