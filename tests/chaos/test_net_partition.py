"""Chaos on a real network: an agent cut off from the bus in the middle of its wave.

The fleet runs on a ``tests.netbed`` bed (broker, coordinator, 4 agents, load: one network
namespace each). A rolling rollout 1.0.0 -> 2.0.0 (batch 1, max-unavailable 1) runs under steady
traffic; when node-3's wave starts (node-3 ``updating``), node-3 is partitioned from the bus
only: its agent can reach neither the broker nor be reached by it, while its router keeps
answering the users' traffic from host ``load``.

Default policy (fail, the only one today): the coordinator sees node-3 go offline (3 missed
heartbeats), fails it naming it, and rolls back; the rollback cannot reach node-3 while the cut
lasts, so it ends by the rollback deadline (``--progress-deadline``) as ``failed``, naming node-3
as the node that did not come back: no rollout hangs. Throughout, node-3 answers every request
(whatever version it had when cut off, or converged to locally from what it already held).
After the heal, node-3's agent gets the rollback's desired state and converges: every node
serves 1.0.0 and node-3 reports the generation it was last given.

Checked from outside, as in every scenario: the rollout ends in a terminal state, no request of
the steady load fails, never more than max-unavailable nodes without a version, every event once.
Prints (run with -s) the timings and figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.messages import ObservedState, RolloutRecord
from tests.integration.e2e_support import (
    audit,
    deploy_detached,
    events_of,
    install,
    push,
    record_of,
    watched,
)
from tests.integration.procs import fleetwave, wait_until
from tests.netbed import NetBed, NetFleet
from tests.netbed.fleet import BUS

AGENTS = 4
CUT = "node-3"
DEADLINE = 10.0
HEARTBEAT = 0.5


async def observed(bus: Bus, node: str) -> ObservedState:
    entry = await bus.kv_get(subjects.observed_bucket(bus.fleet),
                             subjects.node_service_key(node, "hello"))
    assert entry is not None and entry.value, f"no observed state of {node}"
    return decode(ObservedState, entry.value)


async def test_agent_cut_from_the_bus_mid_wave_fails_the_node_and_converges_after_heal(
    netbed: Callable[[Sequence[str]], NetBed], tmp_path: Path
) -> None:
    """node-3 cut from the bus while updating: the rollout fails it by name within the
    deadlines (no hang), node-3 serves throughout, 0 failed requests; healed, it converges."""
    bed = netbed(NetFleet.hosts(AGENTS))
    async with NetFleet(bed, tmp_path / "fleet", agents=AGENTS,
                        heartbeat_interval=HEARTBEAT) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0", fleet.serving)
        bus = await Bus.connect(url, fleet.fleet, name="chaos-test")

        def cut_updating(r: RolloutRecord) -> bool:
            return r.nodes[CUT].state == "updating"

        try:
            async with fleet.loaded() as traffic, watched(fleet.serving) as seen:
                rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--max-unavailable",
                                            "1", "--bake", "1s", "--progress-deadline",
                                            f"{DEADLINE:g}s")
                await wait_until(lambda: record_of(bus, rid), cut_updating, timeout=60,
                                 what=f"{CUT} updating", interval=0.05)
                bed.partition(CUT, BUS)
                cut_at = time.time()  # wall clock: compared with the events' times
                before = await fleet.serving()
                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running",
                                         timeout=2 * DEADLINE + 20, what="the rollout to end",
                                         interval=0.2)
                during = await fleet.serving()
                bed.heal(CUT, BUS)
                healed_at = time.monotonic()
                await wait_until(fleet.serving, lambda v: set(v.values()) == {"1.0.0"},
                                 timeout=30, what="every node serving 1.0.0 after the heal")
                want = final.nodes[CUT].generation
                back = await wait_until(lambda: observed(bus, CUT),
                                        lambda o: o.observed_generation >= want
                                        and o.phase == "converged", timeout=30,
                                        what=f"{CUT} converged on generation {want}")
                converged_after = time.monotonic() - healed_at
        finally:
            await bus.close()

        report = traffic.report
        events = await events_of(url, rid)
        kinds = audit(events)
        at = {e["kind"]: e["time"] - cut_at for e in reversed(events)}  # first of each kind
        code, out, err = await fleetwave("events", "-o", "json", nats_url=url)
        assert code == 0, err
        offline = [e for e in map(json.loads, out.splitlines()) if e["kind"] == "node.offline"]
        at["node.offline"] = min((e["time"] for e in offline), default=float("nan")) - cut_at
        print(f"\n{CUT} cut from the bus while updating (it served {before[CUT]} then, "
              f"{during[CUT]} when the rollout ended): offline after {at['node.offline']:.1f}s, "
              f"rolling back after {at['rollout.rolling_back']:.1f}s, {final.state} after "
              f"{at['rollout.' + final.state]:.1f}s ({final.reason!r}); healed: {CUT} converged "
              f"on generation {back.observed_generation} in {converged_after:.1f}s; "
              f"{report.requests} requests, {report.failed} failed; {seen.samples} samples, at "
              f"most {seen.worst} node(s) unavailable, {CUT} answered "
              f"{dict(seen.per_node[CUT])}; {len(events)} events, each once")

        assert [e["node"] for e in offline] == [CUT], offline
        # The node is failed by name as soon as it is seen offline (3 heartbeats), not at the
        # progress deadline; the rollback then waits for it at most one more deadline.
        assert at["rollout.rolling_back"] < 3 * HEARTBEAT + 5 < DEADLINE, at
        assert f"{CUT}: node went offline" in final.reason, final.reason
        assert final.state == "failed", (final.state, final.reason)
        assert f"rollback incomplete on {CUT}" in final.reason, final.reason
        assert at["rollout.failed"] - at["rollout.rolling_back"] < DEADLINE + 3, at
        assert report.failed == 0, report.failures
        assert seen.worst <= 1, f"{seen.worst} nodes unavailable at once: {seen.worst_at}"
        assert all(not v.startswith("<") for v in seen.per_node[CUT]), seen.per_node[CUT]
        assert kinds["rollout.rolling_back"] == 1, kinds
