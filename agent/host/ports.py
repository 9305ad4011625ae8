"""Slots' ports: a free one of SLOT_PORTS, claimed host-wide so two agents never pick the same.

``free_port`` gives a random port of SLOT_PORTS (outside the kernel's ephemeral range, for the
reason it gives) that nothing holds now. Between that check and the slot's own bind lies the
service's start (0.1-1 s for a Python service on a busy host), and a check by another agent of
the same host in that window passes too: a dev fleet, the demo, the tests and the benchmarks run
ten agents on one machine, which all pick at once when a rollout stages every node. The slot
that binds second exits "address already in use" and is restarted on the same port, and while it
starts its health probes reach the *other* agent's process, which answers: the slot looks
healthy, its router sends users to a process of another node, and at its next crash the router
falls back to the old slot (seen in ``bench_vs_ansible``: a router serving the old version after
a deploy had succeeded, its new slot crash-looping on a port another agent's slot held).

So a pick is also a **claim**: a symlink named after the port, ``<port>``, pointing at the
claiming agent's process, ``<pid>-<start ms>``, in a directory every agent of the host's user
shares (``claims_dir``). Making a symlink is atomic and fails if the name exists, so a claim
needs no lock: ten agents staging at once each make theirs in one system call (a host-wide lock
held by one agent while the others polled for it blocked each agent's loop ~20 ms a pick on a
loaded host, on the way to every staged start: issue 17). A port whose claim's agent still runs
(the same pid *and* start time: a reused pid is not it) is not given again, by any agent, for as
long as that agent runs: through the slot's crashes and restarts on the same port too. The claim
goes when the slot stops or fails (``drop_claim``). One left by an agent that is gone (killed,
restarted) is removed when a pick meets it, under the directory's lock (``.lock``), which only
such removals and a restarted agent's claims of the slots it adopts (``claim``) take: so a claim
is only ever removed by its agent or, once its agent is gone, by one holder of the lock that saw
it gone. A pick never waits for that lock (held: the port is skipped for another); ``claim``, at
an agent's start, waits LOCK_WAIT at most. Failure modes: the directory unsafe (not ours, a
symlink, or writable by others: anyone could fill it and starve the picks) or unwritable: the
pick goes on without claims, as before, with one warning. Not covered: a process that is not a
fleetwave agent binding the very port in that window (the range keeps clear of the kernel's
picks for outgoing connections; a service with a fixed port is seen by the check), agents of
different users or temp dirs (each has its own directory), and claims of agents older than this
format (empty files named ``<port>-<pid>-<start ms>``, made under the lock), which a pick does
not see: an agent's ``sweep`` at its start removes those whose agent is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from agent.host.processes import process_matches

log = logging.getLogger("fleetwave.agent.ports")

# Where slots' ports come from: Nomad's default dynamic port range, chosen below Linux's
# ephemeral range (32768-60999 by default) for the reason ``free_port`` gives.
SLOT_PORTS = (20000, 32000)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORT_TRIES = 64
LOCK_WAIT = 0.1  # how long ``claim`` and ``sweep`` wait for the claims' lock at most (a pick never)
LOCK_POLL = 0.005
LOCK_NAME = ".lock"


def claims_dir() -> Path:
    """The host's claims directory for this user: ``/run/fleetwave/ports`` for root (a
    directory only root can write into), else ``fleetwave-ports-<uid>`` in the temp dir."""
    uid = os.getuid()
    if uid == 0 and Path("/run").is_dir():
        return Path("/run/fleetwave/ports")
    return Path(tempfile.gettempdir()) / f"fleetwave-ports-{uid}"


def free_port(host: str = "127.0.0.1", avoid: frozenset[int] = frozenset(), *,
              ports: tuple[int, int] = SLOT_PORTS, ephemeral: Path = EPHEMERAL_RANGE,
              rng: random.Random | None = None, claims: Path | None = None) -> int:
    """A port that nothing on ``host`` holds now, for a slot to bind: a random one of ``ports``
    outside the kernel's ephemeral range, else (none left, or none free in PORT_TRIES tries) one
    the kernel picks. ``avoid``: ports of our own slots, which may be between runs. With
    ``claims`` (a directory), ports other agents claimed are skipped and the one given is
    claimed (module docstring).

    Why not simply the kernel's pick (bind to port 0): that port comes from the ephemeral range,
    from which the kernel also gives every outgoing connection on the host its local port. Between
    this check and the slot's own bind, a connection made meanwhile (on a busy host, or under
    load that opens a connection a request) could take it, and the slot would exit "address
    already in use" and be restarted on the same port: a new version failing its bake for
    nothing."""
    low, high = ports
    taken = _ephemeral(ephemeral)
    candidates = [(a, b) for a, b in _outside(low, high, taken) if a <= b]
    if candidates:
        pick = rng or random.SystemRandom()
        weights = [b - a + 1 for a, b in candidates]
        usable = _usable(claims)
        for _ in range(PORT_TRIES):
            a, b = pick.choices(candidates, weights)[0]
            port = pick.randint(a, b)
            if port in avoid or not _bindable(host, port):
                continue
            if usable is None or _take(usable, port):
                return port
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port
    raise OSError("no free port found")


def claim(claims: Path | None, port: int | None) -> None:
    """Claim ``port`` for a slot this agent runs already (one it adopted after a restart: its
    earlier claim named the agent's previous process). Another live agent's claim of it is
    left, with a warning: two slots of this host on one port."""
    usable = _usable(claims)
    if usable is None or port is None:
        return
    with _locked(usable, wait=LOCK_WAIT) as had:
        if not had:
            return
        path = usable / str(port)
        holder = _holder(path)
        if holder is None:
            _take(usable, port)
        elif holder != _owner() and process_matches(holder[0], holder[1] / 1000):
            _warn_once(f"{usable}:{port}", f"slot port {port} is claimed by another agent of "
                       f"this host ({_text(holder)}): two slots may be using it")
        elif holder != _owner():  # a gone agent's (this one before its restart): ours now
            aside = usable / f".{port}.{_text(_owner())}.tmp"
            try:
                with contextlib.suppress(FileNotFoundError):
                    aside.unlink()
                aside.symlink_to(_text(_owner()))
                aside.replace(path)
            except OSError as exc:
                _warn_once(f"{usable}:write", f"cannot claim slot port {port} in {usable}: {exc}")


def drop_claim(claims: Path | None, port: int | None) -> None:
    """The slot on ``port`` stopped: this agent's claim of it goes (only this agent's, and
    only from a directory it may use: nothing is read or removed in one others can write)."""
    if port is None or (usable := _usable(claims)) is None:
        return
    path = usable / str(port)
    if _holder(path) == _owner():
        with contextlib.suppress(OSError):
            path.unlink()


def sweep(claims: Path | None) -> None:
    """Remove the claims of agents that are gone, in this format and the earlier one (an
    agent's start: the earlier format's are not seen by picks)."""
    usable = _usable(claims)
    if usable is None:
        return
    with _locked(usable, wait=LOCK_WAIT) as had:
        if not had:
            return
        with os.scandir(usable) as entries:
            for entry in entries:
                parts = entry.name.split("-")
                if entry.name.isdigit():
                    holder = _holder(Path(entry.path))
                elif len(parts) == 3 and all(p.isdigit() for p in parts):
                    holder = (int(parts[1]), int(parts[2]))
                else:
                    continue
                if holder is None or not process_matches(holder[0], holder[1] / 1000):
                    with contextlib.suppress(OSError):
                        Path(entry.path).unlink()


_warned: set[str] = set()  # the warnings given already (once per agent process each)
_me: tuple[int, int] | None = None  # this process: (pid, start time in ms)


def _owner() -> tuple[int, int]:
    global _me
    if _me is None or _me[0] != os.getpid():  # (a fork is another process)
        _me = (os.getpid(), round(psutil.Process().create_time() * 1000))
    return _me


def _text(owner: tuple[int, int]) -> str:
    return f"{owner[0]}-{owner[1]}"


def _holder(path: Path) -> tuple[int, int] | None:
    """The agent a claim names, (pid, start ms); None when there is none (or it is not ours to
    read: then it names nobody who could be alive, and a pick's removal is what cleans it)."""
    try:
        pid, _, started = str(path.readlink()).partition("-")
        return int(pid), int(started)
    except (OSError, ValueError):
        return None


def _usable(claims: Path | None) -> Path | None:
    """``claims`` if it is a directory of ours alone (made if missing), else None (warned once):
    anyone able to write into it could claim every port and starve the picks."""
    if claims is None:
        return None
    try:
        claims.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(claims)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(errno.EPERM, "not a directory of this user")
        if st.st_mode & 0o022:
            raise OSError(errno.EPERM, "writable by others")
    except OSError as exc:
        _warn_once(str(claims), f"slot port claims in {claims} not used ({exc}): two agents of "
                   "this host could pick the same port at once")
        return None
    return claims


def _take(claims: Path, port: int) -> bool:
    """Claim ``port`` in ``claims`` (a usable directory): False if a live agent (this one
    included) claims it, or a gone one does and its claim cannot be removed now."""
    path = claims / str(port)
    for _ in range(2):
        try:
            path.symlink_to(_text(_owner()))
            return True
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and process_matches(holder[0], holder[1] / 1000):
                return False
            with _locked(claims, wait=0.0) as had:  # never waited for on a pick: skip the port
                if not had or _holder(path) != holder:
                    return False
                with contextlib.suppress(OSError):  # (not ours to remove: the retry fails)
                    path.unlink()
        except OSError as exc:
            _warn_once(f"{claims}:write", f"cannot claim slot port {port} in {claims}: {exc}")
            return True  # picked without a claim, as without the directory
    return False


@contextlib.contextmanager
def _locked(claims: Path, *, wait: float) -> Iterator[bool]:
    """The directory's lock, for removing other agents' claims: whether it was had within
    ``wait`` seconds (0: only if free now)."""
    try:
        fd = os.open(claims / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        _warn_once(f"{claims}:lock", f"slot port claims in {claims}: no lock file ({exc})")
        yield False
        return
    try:
        had = _lock(fd, wait)
        if not had and wait > 0:
            _warn_once(f"{claims}:lock", f"slot port claims in {claims}: lock not had within "
                       f"{wait:g}s; going on without it")
        yield had
    finally:
        os.close(fd)  # (releases the lock)


def _lock(fd: int, wait: float) -> bool:
    """Take the exclusive lock, waiting ``wait`` at most (a stopped agent may hold it)."""
    give_up = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= give_up:
                return False
            time.sleep(LOCK_POLL)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


def _ephemeral(path: Path) -> tuple[int, int] | None:
    """The kernel's ephemeral port range, None if unknown (not Linux, unreadable)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def _outside(low: int, high: int, taken: tuple[int, int] | None) -> list[tuple[int, int]]:
    """``low``..``high`` less the ``taken`` range: up to two runs of ports."""
    if taken is None:
        return [(low, high)]
    return [(low, min(high, taken[0] - 1)), (max(low, taken[1] + 1), high)]


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
