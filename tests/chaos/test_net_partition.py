"""Chaos on a real network: an agent cut off from the bus in the middle of its wave.

The fleet runs on a ``tests.netbed`` bed (broker, coordinator, 4 agents, load: one network
namespace each). A rolling rollout 1.0.0 -> 2.0.0 (batch 1, max-unavailable 1) runs under steady
traffic; when node-3's wave starts (node-3 ``updating``), node-3 is partitioned from the bus
only: its agent can neither reach the broker nor be reached, while its router keeps answering
the users' traffic from host ``load``. Node-3 may already hold its new desired state when cut
off; then its agent converges locally, make-before-break, and the node serves 2.0.0.

- ``--on-node-lost fail`` (the default): the coordinator sees node-3 go offline (3 missed
  heartbeats), fails it at once naming it, and rolls back; the rollback cannot reach node-3 while
  the cut lasts, so it gives up by the rollback deadline (``--progress-deadline``) as ``failed``,
  naming node-3 as the node that did not come back: no rollout hangs. After the heal node-3 gets
  the rollback's desired state and converges: every node serves 1.0.0.
- ``--on-node-lost wait``: the wave waits for node-3; healed before the wave's deadline, node-3
  reports again, the wave goes on and the rollout succeeds: every node serves 2.0.0.

Checked from outside, in both: the rollout ends in a terminal state, no request of the steady
load fails, never more than max-unavailable nodes without a version (node-3 answers throughout),
every event exactly once. Prints (run with -s) the timings and figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.dev.traffic import Traffic
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.messages import ObservedState, RolloutRecord
from tests.integration.e2e_support import (
    Availability,
    audit,
    deploy_detached,
    events_of,
    install,
    push,
    record_of,
    watched,
)
from tests.integration.procs import wait_until
from tests.netbed import NetBed, NetFleet
from tests.netbed.fleet import BUS

AGENTS = 4
CUT = "node-3"
HEARTBEAT = 0.5
# --prestage 0: what is killed or cut here is a node in the middle of a real update (a start,
# a health check); staged rollouts: test_net_impaired (impaired), test_e2e_prestage (killed).
FLAGS = ("--batch", "1", "--max-unavailable", "1", "--bake", "1s", "--prestage", "0")
HOLD = 3.0  # seconds the wait variant keeps node-3 cut after it is seen offline


@dataclass
class Cut:
    """One run of the scenario: the fleet, and what was seen while it ran."""

    bed: NetBed
    fleet: NetFleet
    bus: Bus
    traffic: Traffic
    seen: Availability
    cut_at: float = 0.0  # wall clock, to compare with the events' times
    served: list[str] = field(default_factory=list)  # node-3's answer at the cut, at the end

    async def deploy(self, *flags: str) -> str:
        return await deploy_detached(self.fleet.nats_url, "2.0.0", *FLAGS, *flags)

    async def cut_when_updating(self, rid: str) -> None:
        def updating(r: RolloutRecord) -> bool:
            return r.nodes[CUT].state == "updating"

        await wait_until(lambda: record_of(self.bus, rid), updating, timeout=60,
                         what=f"{CUT} updating", interval=0.05)
        self.bed.partition(CUT, BUS)
        self.cut_at = time.time()
        self.served.append((await self.fleet.serving())[CUT])

    async def end(self, rid: str, timeout: float) -> RolloutRecord:
        return await wait_until(lambda: record_of(self.bus, rid), lambda r: r.state != "running",
                                timeout=timeout, what="the rollout to end", interval=0.2)

    async def converged(self, version: str, generation: int) -> float:
        """Wait until every node serves ``version`` and node-3 reports ``generation`` converged;
        seconds it took."""
        started = time.monotonic()
        await wait_until(self.fleet.serving, lambda v: set(v.values()) == {version},
                         timeout=30, what=f"every node serving {version}")
        await wait_until(lambda: observed(self.bus, CUT),
                         lambda o: o.observed_generation >= generation
                         and o.phase == "converged", timeout=30,
                         what=f"{CUT} converged on generation {generation}")
        return time.monotonic() - started

    async def timeline(self, rid: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Seconds from the cut to the first event of each kind of the rollout, and to the
        fleet's first ``node.offline``; and the rollout's events (checked: each once)."""
        url = self.fleet.nats_url
        events = await events_of(url, rid)
        audit(events)
        at = {e["kind"]: e["time"] - self.cut_at for e in reversed(events)}
        offline = [e for e in await events_of(url, "") if e["kind"] == "node.offline"]
        assert [e["node"] for e in offline] == [CUT], offline
        at["node.offline"] = offline[0]["time"] - self.cut_at
        return at, events

    def check_users_saw_nothing(self) -> None:
        report = self.traffic.report
        assert report.failed == 0, report.failures
        assert self.seen.worst <= 1, f"{self.seen.worst} unavailable at once: {self.seen.worst_at}"
        assert all(not v.startswith("<") for v in self.seen.per_node[CUT]), self.seen.per_node

    def figures(self) -> str:
        r = self.traffic.report
        return (f"{r.requests} requests, {r.failed} failed; {self.seen.samples} samples, at most "
                f"{self.seen.worst} node(s) unavailable, {CUT} answered "
                f"{dict(self.seen.per_node[CUT])}")


async def observed(bus: Bus, node: str) -> ObservedState:
    entry = await bus.kv_get(subjects.observed_bucket(bus.fleet),
                             subjects.node_service_key(node, "hello"))
    assert entry is not None and entry.value, f"no observed state of {node}"
    return decode(ObservedState, entry.value)


@contextlib.asynccontextmanager
async def scenario(netbed: Callable[[Sequence[str]], NetBed], tmp_path: Path
                   ) -> AsyncIterator[Cut]:
    """A fleet on 1.0.0, under steady traffic and watched from host ``load``."""
    bed = netbed(NetFleet.hosts(AGENTS))
    async with NetFleet(bed, tmp_path / "fleet", agents=AGENTS,
                        heartbeat_interval=HEARTBEAT) as fleet:
        await push(fleet.nats_url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0", fleet.serving)
        bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="chaos-test")
        try:
            async with fleet.loaded() as traffic, watched(fleet.serving) as seen:
                yield Cut(bed, fleet, bus, traffic, seen)
        finally:
            await bus.close()


async def test_agent_cut_mid_wave_fails_by_name_without_hanging_and_converges_after_heal(
    netbed: Callable[[Sequence[str]], NetBed], tmp_path: Path
) -> None:
    """on-node-lost fail: node-3, cut from the bus while updating, fails by name within a few
    heartbeats; the rollback gives up on it by its deadline (failed, naming it); node-3 serves
    throughout, 0 failed requests; healed, it converges on the rollback's 1.0.0."""
    deadline = 10.0
    async with scenario(netbed, tmp_path) as cut:
        rid = await cut.deploy("--progress-deadline", f"{deadline:g}s")
        await cut.cut_when_updating(rid)
        final = await cut.end(rid, timeout=2 * deadline + 20)
        cut.served.append((await cut.fleet.serving())[CUT])
        cut.bed.heal(CUT, BUS)
        took = await cut.converged("1.0.0", final.nodes[CUT].generation)
        at, events = await cut.timeline(rid)
    print(f"\non-node-lost fail: {CUT} cut from the bus while updating (serving {cut.served[0]}"
          f" then, {cut.served[1]} at the end): offline after {at['node.offline']:.1f}s, rolling"
          f" back after {at['rollout.rolling_back']:.1f}s, {final.state} after "
          f"{at['rollout.' + final.state]:.1f}s ({final.reason!r}); healed, converged in "
          f"{took:.1f}s; {cut.figures()}; {len(events)} events, each once")

    # Failed by name as soon as it is seen offline (3 heartbeats), not at the progress deadline;
    # the rollback then waits for it at most one more deadline.
    assert at["rollout.rolling_back"] < 3 * HEARTBEAT + 5 < deadline, at
    assert f"{CUT}: lost (offline) during wave 3 while updating" in final.reason, final.reason
    assert final.state == "failed", (final.state, final.reason)
    assert f"rollback incomplete on {CUT}" in final.reason, final.reason
    assert at["rollout.failed"] - at["rollout.rolling_back"] < deadline + 3, at
    cut.check_users_saw_nothing()


async def test_agent_cut_mid_wave_is_waited_for_and_the_rollout_succeeds_after_heal(
    netbed: Callable[[Sequence[str]], NetBed], tmp_path: Path
) -> None:
    """on-node-lost wait: node-3, cut from the bus while updating and seen offline, is waited
    for (HOLD s more, not failed); healed well before the wave's deadline, it reports again and
    the rollout succeeds; node-3 serves throughout, 0 failed requests, all end on 2.0.0."""
    deadline = 30.0
    async with scenario(netbed, tmp_path) as cut:
        rid = await cut.deploy("--progress-deadline", f"{deadline:g}s", "--on-node-lost", "wait")
        await cut.cut_when_updating(rid)
        await cut.fleet.wait_online([CUT], state=False, timeout=15)
        # Seen lost, it is waited for: watched for HOLD more seconds, the rollout runs on and
        # node-3 is not failed (nor the wave).
        until = time.monotonic() + HOLD
        while time.monotonic() < until:
            lost = await record_of(cut.bus, rid)
            assert lost.state == "running" and lost.nodes[CUT].state != "failed", (
                lost.state, lost.reason, lost.nodes[CUT])
            await asyncio.sleep(0.2)
        healed_at = time.time()
        cut.bed.heal(CUT, BUS)
        final = await cut.end(rid, timeout=deadline + 20)
        cut.served.append((await cut.fleet.serving())[CUT])
        assert final.state == "succeeded", (final.state, final.reason)
        took = await cut.converged("2.0.0", final.nodes[CUT].generation)
        at, events = await cut.timeline(rid)
    print(f"\non-node-lost wait: {CUT} cut from the bus while updating (serving "
          f"{cut.served[0]} then): offline after {at['node.offline']:.1f}s, healed after "
          f"{healed_at - cut.cut_at:.1f}s, succeeded after {at['rollout.succeeded']:.1f}s "
          f"(all on 2.0.0 {took:.1f}s later); {cut.figures()}; {len(events)} events, each "
          "once")

    assert "rollout.rolling_back" not in {e["kind"] for e in events}
    assert at["rollout.succeeded"] < deadline, at
    cut.check_users_saw_nothing()
