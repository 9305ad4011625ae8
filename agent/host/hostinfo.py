"""Facts and figures about the host an agent runs on, read with psutil.

Two kinds: *facts* that do not change while the agent runs (hostname, CPU count, total memory,
boot time), sent once in the NodeInfo at registration; and *figures* sampled for every heartbeat
(CPU, memory, disk of the data dir, load, and the agent's own RSS and CPU).

psutil's ``cpu_percent`` is a delta since the previous call, so a ``HostSampler`` is made once
and reused: its first sample primes the counters (and reads 0.0), later ones measure the time in
between heartbeats. Every call here is a cheap read of /proc; none blocks for long, so the
heartbeat loop calls them directly.

``trim_heap`` is about the agent's own figures: CPython frees small objects into glibc's heap,
and glibc gives the top of the heap back to the OS only when it is free to the very end, so after
start-up (imports, connecting) and after each rollout much free memory stays resident. glibc's
``malloc_trim(0)`` returns every free page; the heartbeat loop calls it now and then. On another
libc (musl) or platform it does nothing, and ctypes is not even loaded.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from collections.abc import Callable
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


_malloc_trim: Callable[[int], int] | None = None
_trim_checked = False


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``); False if unavailable."""
    global _malloc_trim, _trim_checked
    if not _trim_checked:
        _trim_checked = True
        _malloc_trim = _load_malloc_trim()
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another libc (the symbol may not exist there)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # glibc only: musl has no such name
            return None
    except (ValueError, OSError, AttributeError):  # unknown name / no confstr (not glibc, not unix)
        return None
    import ctypes  # here: 0.2 MiB that only a glibc host pays, and only once

    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim
