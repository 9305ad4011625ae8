"""Chaos: "at no moment more than max-unavailable target nodes without a healthy serving slot",
watched from outside during real rolling rollouts on 4 agents under steady traffic.

A sampler asks every node's router, every ~50 ms, what it answers (one fresh connection each):
a node counts as unavailable when its router does not answer 200 with a version. It also records
every version it saw, so that the failing rollout (2.1.0, never healthy) can be checked to have
answered no request, from the sampler nor from the user traffic.

Prints (run with -s) the number of samples and the most nodes ever seen unavailable at once.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.dev.devfleet import DevFleet
from protocol.bus import Bus
from tests.integration.e2e_support import (
    deploy_detached,
    install,
    loaded,
    push,
    record_of,
    serving,
    watched,
)
from tests.integration.procs import wait_until

SUBNET = "127.0.13"


async def test_max_unavailable_holds_from_outside(tmp_path: Path) -> None:
    """With --max-unavailable 1 on 4 nodes no sample ever sees 2 nodes without a version, 0 user
    requests fail; a failing 2.1.0 rollout answers no request with 2.1.0 and rolls back."""
    async with DevFleet(tmp_path / "fleet", agents=4, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0", "2.1.0")
        await install(fleet, "1.0.0")
        bus = await Bus.connect(url, fleet.fleet, name="chaos-test")
        try:
            async with loaded(fleet) as traffic, watched(lambda: serving(fleet)) as seen:
                # --batch 4 asks for all at once; --max-unavailable 1 must cap it.
                # --prestage 0: max-unavailable is about nodes really updating (a staged slot
                # serves nothing and counts as available, tested in test_engine_prestage).
                rid = await deploy_detached(url, "2.0.0", "--batch", "4",
                                            "--max-unavailable", "1", "--prestage", "0")
                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running", timeout=90,
                                         what="the 2.0.0 rollout to end", interval=0.5)
                assert final.state == "succeeded", (final.state, final.reason)
                await wait_until(lambda: serving(fleet),
                                 lambda v: set(v.values()) == {"2.0.0"}, timeout=30,
                                 what="every node serving 2.0.0")
                healthy = traffic.snapshot()

                rid = await deploy_detached(url, "2.1.0", "--batch", "4", "--max-unavailable",
                                            "1", "--progress-deadline", "15s", "--prestage", "0")
                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running", timeout=90,
                                         what="the 2.1.0 rollout to end", interval=0.5)
                assert final.state == "rolled_back", (final.state, final.reason)
                assert "node-1" in final.reason, final.reason
            report = traffic.report
        finally:
            await bus.close()

        assert healthy.failed == 0 and report.failed == 0, report.failures
        assert seen.worst <= 1, f"{seen.worst} nodes unavailable at once: {seen.worst_at}"
        assert seen.samples > 100, seen.samples
        assert "2.1.0" not in report.versions and "2.1.0" not in seen.versions, (
            report.versions, seen.versions)
        assert {"1.0.0", "2.0.0"} <= set(seen.versions) and {"1.0.0", "2.0.0"} <= set(
            report.versions)
        assert set((await serving(fleet)).values()) == {"2.0.0"}

    print(f"\nmax-unavailable 1 on 4 nodes: {seen.samples} samples, at most {seen.worst} node(s) "
          f"without a version at once; {report.requests} user requests, 0 failed, none by 2.1.0")
