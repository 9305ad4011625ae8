"""agent.host.ports: slots' ports, picked outside the kernel's ephemeral range and claimed
host-wide so that two agents of one host never pick the same one (real sockets, real files)."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from agent.host import ports
from agent.host.ports import (
    EPHEMERAL_RANGE,
    SLOT_PORTS,
    _bindable,
    _ephemeral,
    claim,
    drop_claim,
    free_port,
    sweep,
)


def test_a_slots_port_is_never_one_the_kernel_gives_outgoing_connections() -> None:
    """Ports come from SLOT_PORTS, outside this host's ephemeral range: an outgoing connection
    cannot take one between the check and the slot's bind (the kernel's own pick, port 0,
    comes from that range, which is what this failed on)."""
    taken = _ephemeral(EPHEMERAL_RANGE)
    assert taken is not None  # Linux
    for _ in range(200):
        port = free_port("127.0.0.1")
        assert SLOT_PORTS[0] <= port <= SLOT_PORTS[1]
        assert not taken[0] <= port <= taken[1]


def test_a_port_held_or_avoided_is_not_given() -> None:
    """A listening socket's port, or one of ``avoid``, is skipped for another of the range."""
    with socket.socket() as held:
        while True:  # a held port whose second neighbour is free now
            busy = free_port("127.0.0.1")
            if SLOT_PORTS[0] <= busy <= SLOT_PORTS[1] - 2 and _bindable("127.0.0.1", busy + 2):
                break
        held.bind(("127.0.0.1", busy))
        held.listen()
        got = {free_port("127.0.0.1", frozenset({busy + 1}), ports=(busy, busy + 2),
                         rng=random.Random(seed)) for seed in range(30)}
    assert got == {busy + 2}


@pytest.mark.parametrize("text", ["25000 40000\n", "1024 65535\n", "garbage", None])
def test_the_ephemeral_range_is_left_out_or_the_kernel_picks(tmp_path: Path,
                                                             text: str | None) -> None:
    """An ephemeral range covering part of SLOT_PORTS leaves the rest; covering all of it, the
    kernel picks (as before); an unreadable range file leaves SLOT_PORTS whole."""
    ranges = tmp_path / "range"
    if text is not None:
        ranges.write_text(text)
    port = free_port("127.0.0.1", ephemeral=ranges)
    if text == "25000 40000\n":
        assert SLOT_PORTS[0] <= port < 25000
    if text in ("garbage", None):
        assert SLOT_PORTS[0] <= port <= SLOT_PORTS[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # and it is free


def _window(free: int = 3) -> tuple[int, int]:
    """A run of ``free`` ports of SLOT_PORTS that nothing holds now."""
    rng = random.Random(os.getpid())
    while True:
        low = rng.randint(SLOT_PORTS[0], SLOT_PORTS[1] - free)
        if all(_bindable("127.0.0.1", p) for p in range(low, low + free)):
            return low, low + free - 1


def _claims_of(claims: Path, port: int) -> list[str]:
    """Who claims ``port``: the agent its claim names, ``<pid>-<start ms>``."""
    path = claims / str(port)
    return [str(path.readlink())] if path.is_symlink() else []


def _agent_text(proc: psutil.Process) -> str:
    return f"{proc.pid}-{round(proc.create_time() * 1000)}"


def _mine(port: int) -> str:
    return _agent_text(psutil.Process())


def _claim_as(claims: Path, port: int, agent: str) -> None:
    """A claim of ``port`` made by the agent ``agent`` names (another process)."""
    claims.mkdir(mode=0o700, exist_ok=True)
    (claims / str(port)).symlink_to(agent)


def _gone_agent() -> str:
    pid, started = _gone_process()
    return f"{pid}-{started}"


def _other_agent(claims: Path, window: tuple[int, int]) -> int:
    """The port another agent (another process) picks in ``window`` with these claims."""
    code = ("import sys; from pathlib import Path; from agent.host.ports import free_port; "
            f"print(free_port(ports=({window[0]}, {window[1]}), claims=Path({str(claims)!r})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         timeout=30)
    return int(out.stdout)


def _gone_process() -> tuple[int, int]:
    """(pid, start ms) of a process that ran and is gone."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = round(psutil.Process(proc.pid).create_time() * 1000)
    proc.wait(timeout=30)
    return proc.pid, started


def test_two_agents_picking_at_once_get_two_ports(tmp_path: Path) -> None:
    """Two agents of one host pick before either's slot binds (a rollout staging every node of
    a dev fleet): the check alone gives both the same port, the claim gives the second another
    one. The same random draws stand for two agents that happen to draw alike; then another
    process, a real second agent, is kept off the one port of a window this agent claimed."""
    window = _window()
    alone = {free_port(ports=window, rng=random.Random(7)) for _ in range(2)}
    assert len(alone) == 1  # what happened: both slots on one port, the second crash-looping
    claims = tmp_path / "claims"
    first = free_port(ports=window, rng=random.Random(7), claims=claims)
    second = free_port(ports=window, rng=random.Random(7), claims=claims)
    assert first != second and {first, second} <= set(range(window[0], window[1] + 1))
    assert _claims_of(claims, first) == [_mine(first)]
    one = (first, first)
    assert _other_agent(claims, one) != first  # (the kernel's pick, outside SLOT_PORTS)


def test_a_claim_lasts_as_long_as_its_agent_and_goes_with_the_slot(tmp_path: Path) -> None:
    """However old, a live agent's claim keeps the port (the slot may be between a crash and
    its restart, the port unbound); a stopped slot's claim goes at once, and only this
    agent's; a claim of an agent that is gone is removed at the next pick."""
    claims = tmp_path / "claims"
    low = _window(1)[0]
    window = (low, low)
    assert free_port(ports=window, rng=random.Random(1), claims=claims) == low
    old = time.time() - 86_400
    os.utime(claims / str(low), (old, old), follow_symlinks=False)
    assert _other_agent(claims, window) != low
    drop_claim(claims, low)
    assert _claims_of(claims, low) == []
    assert _other_agent(claims, window) == low  # free for any agent now
    # That one was the other agent's (a process gone since): this agent's drop leaves a live
    # agent's claim alone, and a gone agent's claim does not keep the port.
    theirs = _agent_text(psutil.Process(os.getppid()))
    (claims / str(low)).unlink()
    _claim_as(claims, low, theirs)
    drop_claim(claims, low)
    assert _claims_of(claims, low) == [theirs]
    assert free_port(ports=window, rng=random.Random(1), claims=claims) != low
    (claims / str(low)).unlink()
    _claim_as(claims, low, _gone_agent())
    assert free_port(ports=window, rng=random.Random(1), claims=claims) == low
    assert _claims_of(claims, low) == [_mine(low)]


def test_an_adopted_slots_port_is_claimed_again(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A restarted agent claims its adopted slots' ports anew (its earlier claims named its
    previous process); a port another live agent claims is left to it, with a warning."""
    claims = tmp_path / "claims"
    claims.mkdir(mode=0o700)
    low = _window(2)[0]
    _claim_as(claims, low, _gone_agent())  # this agent before its restart
    claim(claims, low)
    assert _claims_of(claims, low) == [_mine(low)]
    claim(claims, low)  # (again: nothing changes)
    assert _claims_of(claims, low) == [_mine(low)]
    theirs = _agent_text(psutil.Process(os.getppid()))
    _claim_as(claims, low + 1, theirs)
    ports._warned.clear()
    claim(claims, low + 1)
    assert _claims_of(claims, low + 1) == [theirs]
    assert "claimed by another agent" in caplog.text
    claim(claims, low + 2)  # not claimed by anyone
    assert _claims_of(claims, low + 2) == [_mine(low + 2)]
    assert sorted(p.name for p in claims.iterdir()) == [
        ".lock", str(low), str(low + 1), str(low + 2)]  # (no temp name left)


@pytest.mark.parametrize("unsafe", ["writable by others", "a file", "a symlink"])
def test_an_unsafe_claims_directory_is_not_used(tmp_path: Path, unsafe: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A directory others may write into (they could claim every port), or not a directory of
    ours: no claims are read or written there; ports are still given, with one warning."""
    claims = tmp_path / "claims"
    if unsafe == "writable by others":
        claims.mkdir(mode=0o700)
        claims.chmod(0o777)
    elif unsafe == "a file":
        claims.write_text("")
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        claims.symlink_to(tmp_path / "elsewhere")
    ports._warned.clear()
    port = free_port(claims=claims)
    assert SLOT_PORTS[0] <= port <= SLOT_PORTS[1]
    assert "claims" in caplog.text and "not used" in caplog.text
    if unsafe != "a file":
        assert _claims_of(claims, port) == []
        # ...nor removed there: a name that reads as this agent's claim stays
        _claim_as(claims, port, _mine(port))
        drop_claim(claims, port)
        assert _claims_of(claims, port) == [_mine(port)]


def test_a_pick_never_waits_for_the_lock(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A pick takes no lock: with the directory's lock held (another agent stopped in the
    middle of removing a gone agent's claim, or of claiming its adopted slots), picks are
    claimed at once; a gone agent's claim is then skipped, not removed (that needs the lock),
    and removed by the next pick once the lock is free. ``claim`` waits LOCK_WAIT at most, then
    goes on without claiming; a lock released meanwhile is taken."""
    monkeypatch.setattr(ports, "LOCK_WAIT", 0.2)
    claims = tmp_path / "claims"
    claims.mkdir(mode=0o700)
    low = _window(2)[0]
    gone = _gone_agent()
    _claim_as(claims, low, gone)
    fd = os.open(claims / ports.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        sleeps: list[float] = []
        monkeypatch.setattr("agent.host.ports.time.sleep", sleeps.append)
        assert free_port(ports=(low, low + 1), rng=random.Random(3), claims=claims) == low + 1
        assert free_port(ports=(low, low), claims=claims) != low  # (the kernel's pick)
        assert sleeps == []
        assert _claims_of(claims, low) == [gone] and _claims_of(claims, low + 1) == [_mine(0)]
        monkeypatch.undo()
        monkeypatch.setattr(ports, "LOCK_WAIT", 0.2)
        started = time.monotonic()
        claim(claims, low)  # this agent's adopted slot on that port: the claim waits, then not
        assert time.monotonic() - started >= 0.2
        assert _claims_of(claims, low) == [gone]
        release = threading.Timer(0.05, fcntl.flock, (fd, fcntl.LOCK_UN))
        release.start()
        claim(claims, low)
        release.join()
        assert _claims_of(claims, low) == [_mine(low)]
        (claims / str(low)).unlink()
        _claim_as(claims, low, gone)
        assert free_port(ports=(low, low), claims=claims) == low  # the lock is free: removed
        assert _claims_of(claims, low) == [_mine(low)]
    finally:
        os.close(fd)


def test_many_agents_picking_at_once_get_distinct_ports(tmp_path: Path) -> None:
    """Eight agents (processes) each pick five ports of a window of 48 at the same moment, with
    no slot binding any of them, and live on (a gone agent's claims are free to take): every
    port is given once (a claim is made in one step that fails if the port is claimed, with no
    lock to wait for)."""
    claims = tmp_path / "claims"
    window = _window(48)
    go = tmp_path / "go"
    code = ("import sys, time; from pathlib import Path; from agent.host.ports import free_port\n"
            "end = time.monotonic() + 30\n"  # (the start line: all pick together, bounded)
            f"while not Path({str(go)!r}).exists() and time.monotonic() < end: time.sleep(0.001)\n"
            f"print(*[free_port(ports={window}, claims=Path({str(claims)!r})) for _ in range(5)],"
            " flush=True)\n"
            "sys.stdin.read()")  # (alive until told)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    try:
        go.touch()
        picked = [int(p) for proc in procs for p in _line(proc).split()]
    finally:
        for proc in procs:
            proc.communicate(timeout=60)
    assert all(proc.returncode == 0 for proc in procs)
    assert len(picked) == 40 and len(set(picked)) == 40
    assert all(window[0] <= p <= window[1] for p in picked)


def _line(proc: subprocess.Popen[str]) -> str:
    """The first line ``proc`` prints (within 60 s)."""
    stdout = proc.stdout
    assert stdout is not None
    out: list[str] = []
    ready = threading.Thread(target=lambda: out.append(stdout.readline()), daemon=True)
    ready.start()
    ready.join(timeout=60)
    assert out, "no ports printed within 60 s"
    return out[0]


def test_the_earlier_formats_claims_of_gone_agents_are_swept(tmp_path: Path) -> None:
    """An agent's start removes every claim of a gone agent, in this format (a symlink named
    after the port) and the earlier one (an empty file ``<port>-<pid>-<start ms>``); a live
    agent's claims, other names and a file named like a port stay."""
    claims = tmp_path / "claims"
    low = _window(4)[0]
    gone, parent = _gone_agent(), _agent_text(psutil.Process(os.getppid()))
    _claim_as(claims, low, gone)
    _claim_as(claims, low + 1, parent)
    (claims / f"{low + 2}-{gone}").touch()
    (claims / f"{low + 3}-{parent}").touch()
    (claims / "notes").touch()
    sweep(claims)
    assert sorted(p.name for p in claims.iterdir()) == sorted(
        [".lock", str(low + 1), f"{low + 3}-{parent}", "notes"])
    sweep(None)  # (no directory: nothing to do)


@pytest.mark.parametrize("squatter", ["file", "directory", "not a number"])
def test_a_port_name_that_is_not_a_claim_is_skipped_or_removed(tmp_path: Path,
                                                             squatter: str) -> None:
    """Something of this user's named like a port that is no claim (a file, a directory, a
    symlink naming nobody) names no live agent: a pick removes what it can and takes the port,
    and skips it (for another port) when it cannot; never an error."""
    claims = tmp_path / "claims"
    claims.mkdir(mode=0o700)
    low = _window(2)[0]
    path = claims / str(low)
    if squatter == "file":
        path.write_text("x")
    elif squatter == "directory":
        path.mkdir()
        (path / "inside").touch()
    else:
        path.symlink_to("nobody")
    got = free_port(ports=(low, low + 1), rng=random.Random(3), claims=claims)
    if squatter == "directory":
        assert got == low + 1 and path.is_dir()
    else:
        assert got == low and _claims_of(claims, low) == [_mine(low)]
