"""Slot processes seen from outside the runner: is a pid still ours, and orphans.

A slot process runs in its own session (it outlives the agent), so it is known by pid and
psutil's create_time (a recycled pid never matches), signalled by process group, and, when an
agent was killed before it recorded one, found again by its working directory and
``FLEETWAVE_NODE`` (``find_orphans``) to be stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil


def process_matches(pid: int, create_time: float) -> bool:
    """True if ``pid`` is alive and is the very process started at ``create_time``.

    A pid of 0 or less is never a process of ours (a hand-edited or damaged state file): psutil
    refuses a negative one (ValueError), and 0 or -1 given to ``killpg`` would signal the
    agent's own group or every process it may signal."""
    if pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError, OverflowError):
        return False


def find_orphans(releases_dir: Path, node: str, keep: set[int]) -> list[psutil.Process]:
    """Slot processes of this node that no state record accounts for.

    An agent killed between starting a slot and saving its state file leaves a process nobody
    watches; its restarted self would start the slot again beside it and leak it for good. A slot
    process is recognised as a session leader (slots get their own session) whose working
    directory lies under this agent's ``releases_dir`` and whose ``FLEETWAVE_NODE`` is ``node``;
    ``keep`` holds the pids adopted from the state file.
    """
    root = str(releases_dir.absolute()) + os.sep
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "cwd"]):
        try:
            cwd = proc.info.get("cwd") or ""
            if proc.pid in keep or not cwd.startswith(root) or os.getsid(proc.pid) != proc.pid:
                continue
            if proc.environ().get("FLEETWAVE_NODE") == node:
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def stop_orphans(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM each orphan's process group, SIGKILL what is left after ``timeout``."""
    for proc in procs:
        killpg(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=timeout)


def group_alive(pgid: int) -> bool:
    """True while group ``pgid`` has a member that is not a zombie (the number of a group with
    members, zombies included, is never given to another process or group)."""
    if pgid <= 0:
        return False  # 0 is the caller's own group
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Members remain; zombies among them (unreaped where init does not reap) count as gone.
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (psutil.Error, ProcessLookupError):
            continue
    return False


def killpg(pid: int, sig: int) -> None:
    """Signal the process group ``pid`` leads (a slot's session); gone or not ours: nothing.
    (0 or less names no such group: the caller's own, or every process; never signalled.)"""
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)

