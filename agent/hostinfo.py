"""Facts and figures about the host an agent runs on, read with psutil.

Two kinds: *facts* that do not change while the agent runs (hostname, CPU count, total memory,
boot time), sent once in the NodeInfo at registration; and *figures* sampled for every heartbeat
(CPU, memory, disk of the data dir, load, and the agent's own RSS and CPU).

psutil's ``cpu_percent`` is a delta since the previous call, so a ``HostSampler`` is made once
and reused: its first sample primes the counters (and reads 0.0), later ones measure the time in
between heartbeats. Every call here is a cheap read of /proc; none blocks for long, so the
heartbeat loop calls them directly.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    platform: str
    python: str
    cpu_count: int
    mem_total: int
    boot_time: float


@dataclass(frozen=True)
class HostFigures:
    cpu_percent: float
    mem_percent: float
    disk_percent: float
    load1: float
    agent_rss: int
    agent_cpu_percent: float


def host_facts() -> HostFacts:
    """What registration says about the host."""
    return HostFacts(
        hostname=socket.gethostname(),
        platform=platform.platform(terse=True),
        python=sys.version.split()[0],
        cpu_count=psutil.cpu_count() or 1,
        mem_total=int(psutil.virtual_memory().total),
        boot_time=float(psutil.boot_time()),
    )


class HostSampler:
    """Samples host and agent figures; keep one per agent (CPU figures are deltas)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._me = psutil.Process()
        self._me.cpu_percent(None)
        psutil.cpu_percent(None)

    def sample(self) -> HostFigures:
        mem = psutil.virtual_memory()
        try:
            disk = float(psutil.disk_usage(str(self.data_dir)).percent)
        except OSError:  # data dir removed under us: report 0 rather than stop heartbeats
            disk = 0.0
        try:
            load1 = os.getloadavg()[0]
        except OSError:  # not available on this platform
            load1 = 0.0
        with self._me.oneshot():
            rss = int(self._me.memory_info().rss)
            own_cpu = float(self._me.cpu_percent(None))
        return HostFigures(
            cpu_percent=float(psutil.cpu_percent(None)),
            mem_percent=float(mem.percent),
            disk_percent=disk,
            load1=float(load1),
            agent_rss=rss,
            agent_cpu_percent=own_cpu,
        )
