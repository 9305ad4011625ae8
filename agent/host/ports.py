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

So a pick is also a **claim**: an empty file named ``<port>-<pid>-<start ms>`` after the
claiming agent's process, in a directory every agent of the host's user shares (``claims_dir``),
made under an exclusive lock. A port whose claim's agent still runs (the same pid *and* start
time: a reused pid is not it) is not given again, by any agent, for as long as that agent runs:
through the slot's crashes and restarts on the same port too. The claim goes when the slot stops
or fails (``drop_claim``); one left by an agent that is gone (killed, restarted) is removed at
the next pick, and a restarted agent claims the ports of the slots it adopts again
(``claim``). Failure modes: the directory unsafe (not ours, a symlink, or writable by others:
anyone could fill it and starve the picks) or unwritable, or its lock held longer than
LOCK_WAIT (an agent stopped in the middle of a pick; the wait blocks the agent's loop, hence
short): the pick goes on without claims, as before, with one warning. Not covered: a process
that is not a fleetwave agent binding the very port in that window (the range keeps clear of
the kernel's picks for outgoing connections; a service with a fixed port is seen by the check),
and agents of different users or temp dirs (each has its own directory).
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
LOCK_WAIT = 0.1  # at most this long for the claims' lock (held for well under 1 ms by others)
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
        with _claiming(claims) as claimed:
            for _ in range(PORT_TRIES):
                a, b = pick.choices(candidates, weights)[0]
                port = pick.randint(a, b)
                if port in avoid or (claimed and port in claimed) or not _bindable(host, port):
                    continue
                if claims is not None and claimed is not None:
                    _write_claim(claims, port)
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
    if claims is None or port is None:
        return
    with _claiming(claims) as claimed:
        if claimed is None:
            return
        holder = claimed.get(port)
        if holder is None:
            _write_claim(claims, port)
        elif holder != _name(port):
            _warn_once(f"{claims}:{port}", f"slot port {port} is claimed by another agent of "
                       f"this host ({holder}): two slots may be using it")


def drop_claim(claims: Path | None, port: int | None) -> None:
    """The slot on ``port`` stopped: this agent's claim of it goes."""
    if claims is None or port is None:
        return
    with _claiming(claims) as claimed:
        if claimed is not None and claimed.get(port) == _name(port):
            with contextlib.suppress(OSError):
                (claims / _name(port)).unlink()


_warned: set[str] = set()  # the warnings given already (once per agent process each)
_me: tuple[int, int] | None = None  # this process: (pid, start time in ms)


def _owner() -> tuple[int, int]:
    global _me
    if _me is None or _me[0] != os.getpid():  # (a fork is another process)
        _me = (os.getpid(), round(psutil.Process().create_time() * 1000))
    return _me


def _name(port: int) -> str:
    pid, started = _owner()
    return f"{port}-{pid}-{started}"


@contextlib.contextmanager
def _claiming(claims: Path | None) -> Iterator[dict[int, str] | None]:
    """Under the claims' lock: the live claims, port -> its file's name (the claims of agents
    that are gone are removed); None when there is no usable directory or its lock was not had
    in time."""
    if claims is None:
        yield None
        return
    try:
        fd = _lock_file(claims)
    except OSError as exc:
        _warn_once(str(claims), f"slot port claims in {claims} not used ({exc}): two agents of "
                   "this host could pick the same port at once")
        yield None
        return
    try:
        if not _lock(fd):
            _warn_once(f"{claims}:lock", f"slot port claims in {claims}: lock not had within "
                       f"{LOCK_WAIT:g}s; picking without them")
            yield None
            return
        yield _live_claims(claims)
    finally:
        os.close(fd)  # (releases the lock)


def _lock_file(claims: Path) -> int:
    """The claims' lock file, opened, after checking the directory is ours alone."""
    claims.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(claims)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(errno.EPERM, "not a directory of this user")
    if st.st_mode & 0o022:
        raise OSError(errno.EPERM, "writable by others")
    return os.open(claims / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)


def _lock(fd: int) -> bool:
    """Take the exclusive lock, waiting LOCK_WAIT at most (a stopped agent may hold it)."""
    give_up = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= give_up:
                return False
            time.sleep(LOCK_POLL)


def _live_claims(claims: Path) -> dict[int, str]:
    live: dict[int, str] = {}
    alive: dict[tuple[int, int], bool] = {_owner(): True}
    with os.scandir(claims) as entries:
        for entry in entries:
            parts = entry.name.split("-")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                continue
            port, owner = int(parts[0]), (int(parts[1]), int(parts[2]))
            if owner not in alive:
                alive[owner] = process_matches(owner[0], owner[1] / 1000)
            if alive[owner]:
                live[port] = entry.name
            else:
                with contextlib.suppress(OSError):  # gone meanwhile
                    Path(entry.path).unlink()
    return live


def _write_claim(claims: Path, port: int) -> None:
    try:
        os.close(os.open(claims / _name(port), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    except OSError as exc:
        _warn_once(f"{claims}:write", f"cannot claim slot port {port} in {claims}: {exc}")


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
