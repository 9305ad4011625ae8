"""The fleet on the network test bed (``tests.netbed.NetFleet``) as the coordinator scenarios of
issue 13 will use it: two coordinators, each in a host of its own, that a test can freeze and
thaw (SIGSTOP/SIGCONT), cut from the bus and kill, while the other keeps the fleet answering.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from tests.integration.procs import wait_until
from tests.netbed import NetBed, NetFleet
from tests.netbed.fleet import BUS, NATS_PORT


async def reaches_bus(bed: NetBed, host: str) -> bool:
    try:
        _, writer = await bed.open_connection(host, bed.addr(BUS), NATS_PORT, timeout=1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def status_of(pid: int) -> str:
    return psutil.Process(pid).status()


async def test_two_coordinators_each_in_its_host_frozen_cut_and_killed(
    netbed: Callable[[Sequence[str]], NetBed], tmp_path: Path
) -> None:
    """Every fleet process runs in its own host; coord-1 is frozen and thawed, cut from the bus
    (coord-2 still reaches it) and healed, then SIGKILLed and reaped; coord-2 answers alone."""
    bed = netbed(NetFleet.hosts(2, coordinators=2))
    started = time.monotonic()
    async with NetFleet(bed, tmp_path / "fleet", agents=2, coordinators=2) as fleet:
        up = time.monotonic() - started
        for host in ("bus", "coord-1", "coord-2", "node-1", "node-2"):
            pid = fleet.process(host).pid
            assert pid is not None and pid in bed.pids(host), (host, pid, bed.pids(host))
        c1 = fleet.process("coord-1")
        assert c1.pid is not None

        c1.signal(signal.SIGSTOP)
        await wait_until(lambda: status_of(c1.pid or 0), lambda s: s == psutil.STATUS_STOPPED,
                         timeout=10, what="coord-1 stopped")
        c1.signal(signal.SIGCONT)
        await wait_until(lambda: status_of(c1.pid or 0), lambda s: s != psutil.STATUS_STOPPED,
                         timeout=10, what="coord-1 running again")

        bed.partition("coord-1", BUS)
        assert not await reaches_bus(bed, "coord-1")
        assert await reaches_bus(bed, "coord-2") and await reaches_bus(bed, "node-1")
        bed.heal("coord-1", BUS)
        assert await reaches_bus(bed, "coord-1")

        assert await c1.kill() == -signal.SIGKILL
        assert c1.pid not in bed.pids("coord-1")
        rows = await fleet.wait_online(fleet.nodes, timeout=20)
        assert sorted(rows) == fleet.nodes
    print(f"\nfleet of 2 coordinators and 2 agents in 6 hosts up in {up:.1f}s")
