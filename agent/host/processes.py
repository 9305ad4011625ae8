"""Slot processes seen from outside the runner: is a pid still ours, orphans, and what is left
of a process group once its leader is gone.

A slot process runs in its own session (it outlives the agent), so it is known by pid and
psutil's create_time (a recycled pid never matches), signalled by process group, and, when an
agent was killed before it recorded one, found again by where it was started and its
``FLEETWAVE_NODE`` (``find_orphans``) to be stopped.

What a slot process looks like: it leads its session, was started in its release directory, and
its environment says ``FLEETWAVE_NODE`` and ``FLEETWAVE_SLOT``. Where it was started is its
environment's ``FLEETWAVE_RELEASE_DIR``, which the agent sets: many servers ``chdir`` elsewhere
once started (a daemon to ``/``, ``gunicorn --chdir``), so the working directory proves it only
for a process an older agent started, without that variable. A state file is trusted for the pid
only as far as the process it names looks so (``not_the_slot``): the agent signals the process
group of every slot it adopts, and a pid with its create_time names any process. Paths are
compared as the kernel resolves them (a data dir reached through a symlink is still ours).

A hook or exec probe runs in a session of its own too, and what it starts in the background
(``sh -c "cmd & exit 0"``) stays in its group when it exits: ``end_leftovers`` ends that group
after every hook and probe, or a probe run every interval would leave a process each time,
outliving the slot and the agent. (A child that makes a session of its own leaves the group:
nothing short of a cgroup follows it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Collection
from pathlib import Path

import psutil

KILL_WAIT = 5.0  # after a SIGKILL, how long a process or group is waited for at most
GROUP_POLL = 0.05  # how often a group whose leader is gone is looked at until it is empty
LEFTOVER_GRACE = 1.0  # what a hook or exec probe left running has from SIGTERM to SIGKILL
RELEASE_VAR = "FLEETWAVE_RELEASE_DIR"  # where the agent started a slot's process (its env)


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


def not_the_slot(pid: int, release_dir: Path, node: str, slot: str, uid: int) -> str | None:
    """Why the live process ``pid`` is not the process of ``slot`` on ``node`` started in
    ``release_dir`` as ``uid`` (the services' user), or None when it is.

    It must lead its own session, have been started in ``release_dir`` (its environment's
    ``FLEETWAVE_RELEASE_DIR``; without one, an older agent's process, its working directory must
    be ``release_dir`` or below it), and have this node's ``FLEETWAVE_NODE`` and this slot's
    ``FLEETWAVE_SLOT`` in its environment. Reading another
    process's working directory and environment takes what the agent has when it starts
    processes as another user (root, or ``CAP_SYS_PTRACE`` under the systemd drop-in) and is
    always allowed for its own user's; should either be refused all the same (``AccessDenied``),
    what could be read must match and the process must run as ``uid``: a process of the services'
    user is one the agent's services could signal anyway.
    """
    try:
        proc = psutil.Process(pid)
        if os.getsid(pid) != pid:
            return "it does not lead its own session"
        unread: list[str] = []
        try:
            env: dict[str, str] | None = proc.environ()
        except psutil.AccessDenied:
            env = None
            unread.append("environment")
        started = env.get(RELEASE_VAR) if env is not None else None
        if started is not None:
            if not _same_dir(started, release_dir):
                return f"its {RELEASE_VAR} is {started!r}, not {str(release_dir)!r}"
        else:
            try:
                cwd: str | None = proc.cwd()
            except psutil.AccessDenied:
                cwd = None
                unread.append("working directory")
            if cwd is not None and not _within(cwd, release_dir):
                return f"it works in {cwd}, not in {release_dir}"
        if env is not None:
            for name, want in (("FLEETWAVE_NODE", node), ("FLEETWAVE_SLOT", slot)):
                if env.get(name) != want:
                    return f"its {name} is {env.get(name)!r}, not {want!r}"
        if unread and (owner := proc.uids().real) != uid:
            return (f"its {' and '.join(unread)} cannot be read and it runs as uid {owner}, "
                    f"not the services' {uid}")
    except (psutil.NoSuchProcess, ProcessLookupError):
        return "it is gone"
    except psutil.AccessDenied:
        return "it cannot be looked at"
    return None


def runs_as(pid: int) -> int | None:
    """The real uid ``pid`` runs as (None: gone, or not to be read)."""
    try:
        return int(psutil.Process(pid).uids().real)
    except (psutil.Error, ValueError):
        return None


def _within(path: str, directory: Path | str) -> bool:
    """Whether ``path`` (as the kernel resolves a working directory) is ``directory`` or lies
    below it."""
    root = os.path.realpath(directory)
    return path == root or path.startswith(root + os.sep)


def _same_dir(path: str, directory: Path) -> bool:
    """Whether ``path`` (a process's own word for it) names ``directory``, both resolved."""
    return os.path.realpath(path) == os.path.realpath(directory)


def find_orphans(releases_dir: Path, node: str, keep: set[int],
                 kept_slots: Collection[tuple[Path | str, str]] = ()) -> list[psutil.Process]:
    """Slot processes of this node that no state record accounts for.

    An agent killed between starting a slot and saving its state file leaves a process nobody
    watches; its restarted self would start the slot again beside it and leak it for good. A slot
    process is recognised as a session leader (slots get their own session) whose
    ``FLEETWAVE_NODE`` is ``node`` and that was started under this agent's ``releases_dir``: its
    ``FLEETWAVE_RELEASE_DIR`` lies there, or (an older agent's process, without one) its working
    directory does. ``keep`` holds the pids adopted from the state file, ``kept_slots`` their
    (release dir, slot): a session leader of one of those is a helper its adopted process
    started (a daemon of the service's own, which inherited its environment), not an orphan (a
    slot has one process; a start after the last save would not have been adopted).
    """
    kept = {(os.path.realpath(d), slot) for d, slot in kept_slots}
    root = os.path.realpath(releases_dir)
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "cwd"]):
        try:
            if proc.pid in keep or os.getsid(proc.pid) != proc.pid:
                continue
            env = proc.environ()
            if env.get("FLEETWAVE_NODE") != node:
                continue
            started = env.get(RELEASE_VAR)
            where = os.path.realpath(started) if started is not None else proc.info.get("cwd")
            if started is not None and (where, env.get("FLEETWAVE_SLOT")) in kept:
                continue  # a helper of an adopted slot
            if where and _within(where, root) and where != root:
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



async def end_group(pgid: int, deadline: float) -> None:
    """The leader of group ``pgid`` is gone: what is left of the group (a worker that ignores
    SIGTERM, a crashed leader's child) has until ``deadline`` (loop time), then gets SIGKILL.

    Checked before each signal: the number names no other group while members remain, and a
    straggler would keep the slot's port (the restart fails with EADDRINUSE)."""
    loop = asyncio.get_running_loop()
    killed = False
    while group_alive(pgid):
        if loop.time() >= deadline:
            if killed:
                return  # KILL_WAIT after the SIGKILL: not waited for any longer
            killpg(pgid, signal.SIGKILL)
            killed, deadline = True, loop.time() + KILL_WAIT
        await asyncio.sleep(GROUP_POLL)


async def end_leftovers(pgid: int, grace: float = LEFTOVER_GRACE) -> None:
    """The leader of group ``pgid`` (a hook or an exec probe) exited: SIGTERM what it left in
    its group, SIGKILL what is left of that after ``grace`` (``end_group``).

    An empty group, the common case, costs one ``killpg`` that fails with ESRCH: an exec probe
    runs every interval. Right after the leader's exit the number still names its group
    while any member remains, and no process once none does (a new process would have to
    take that very pid and lead a group of its own in between). Cancelled meanwhile, the group
    gets SIGKILL at once."""
    if pgid <= 0:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        await end_group(pgid, asyncio.get_running_loop().time() + grace)
    except asyncio.CancelledError:
        killpg(pgid, signal.SIGKILL)
        raise
