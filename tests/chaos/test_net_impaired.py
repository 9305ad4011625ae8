"""Chaos on a real network: 100 ms delay (each way) and 2 % loss (each way) between every agent
and the bus, during a rolling rollout on 4 agents under steady traffic.

The fleet runs on a ``tests.netbed`` bed: broker, coordinator and each agent in a network
namespace of its own, the traffic and the availability sampler from a fifth (``load``), all over
one bridge. Only agent<->bus packets are impaired; the users' path (load -> routers) is not.

What holds, checked from outside: the rollout succeeds; no request of the steady load fails; no
sample sees more than ``--max-unavailable`` nodes without a version; the event log has every
event exactly once (``audit``). The impairment is measured, not assumed: a TCP handshake from a
node to the broker takes at least the 200 ms round trip.

Prints (run with -s) the measured round trip, the rollout's duration, requests and samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from protocol.bus import Bus
from tests.integration.e2e_support import (
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
from tests.netbed.fleet import BUS, NATS_PORT

AGENTS = 4
DELAY = 0.1
LOSS = 0.02


async def handshake_rtt(bed: NetBed, host: str) -> float:
    """One TCP connect from ``host`` to the broker: one round trip."""
    started = time.monotonic()
    _, writer = await bed.open_connection(host, bed.addr(BUS), NATS_PORT, timeout=10)
    took = time.monotonic() - started
    writer.close()
    return took


async def test_rolling_rollout_completes_over_delay_and_loss(
    netbed: Callable[[Sequence[str]], NetBed], tmp_path: Path
) -> None:
    """100 ms each way and 2 % loss each way on every agent<->bus link: the rolling rollout
    succeeds, 0 failed requests, never more than 1 node unavailable, every event once."""
    bed = netbed(NetFleet.hosts(AGENTS))
    # The agents' default heartbeat (2 s; offline after 3 missed): a TCP retransmission over
    # this link takes a second or more, so a much tighter interval would see nodes flap offline.
    async with NetFleet(bed, tmp_path / "fleet", agents=AGENTS, heartbeat_interval=2.0) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0", fleet.serving)
        for node in fleet.nodes:
            bed.impair(node, delay=DELAY, loss=LOSS, peer=BUS)
        rtt = min([await handshake_rtt(bed, n) for n in fleet.nodes])
        assert rtt >= 2 * DELAY * 0.97, f"the impairment is not in force: handshake {rtt:.3f}s"

        bus = await Bus.connect(url, fleet.fleet, name="chaos-test")
        try:
            async with fleet.loaded() as traffic, watched(fleet.serving) as seen:
                started = time.monotonic()
                rid = await deploy_detached(url, "2.0.0", "--batch", "1", "--max-unavailable",
                                            "1", "--bake", "1s", "--progress-deadline", "30s")
                final = await wait_until(lambda: record_of(bus, rid),
                                         lambda r: r.state != "running", timeout=120,
                                         what="the rollout to end", interval=0.5)
                took = time.monotonic() - started
                assert final.state == "succeeded", (final.state, final.reason)
                await wait_until(fleet.serving, lambda v: set(v.values()) == {"2.0.0"},
                                 timeout=30, what="every node serving 2.0.0")
        finally:
            await bus.close()

        report = traffic.report
        assert report.failed == 0, report.failures
        assert seen.worst <= 1, f"{seen.worst} nodes unavailable at once: {seen.worst_at}"
        assert seen.samples > 50, seen.samples
        kinds = audit(await events_of(url, rid))
        assert kinds["rollout.succeeded"] == 1, kinds
        for kind in ("wave.started", "node.updating", "node.done", "gate.passed"):
            assert kinds[kind] == AGENTS, (kind, kinds)
        assert "rollout.rolling_back" not in kinds, kinds
        offline = [e for e in await events_of(url, "") if e["kind"] == "node.offline"]
        assert not offline, f"nodes seen offline over the impaired links: {offline}"

    print(f"\ndelay {DELAY * 1000:g} ms each way + loss {LOSS:.0%} each way on {AGENTS} "
          f"agent<->bus links (handshake RTT >= {rtt * 1000:.0f} ms): rolling rollout "
          f"succeeded in {took:.1f}s; {report.requests} requests, 0 failed (p99 "
          f"{report.p(0.99):.1f} ms); {seen.samples} samples, at most {seen.worst} node(s) "
          f"unavailable; {sum(kinds.values())} events, each once")
