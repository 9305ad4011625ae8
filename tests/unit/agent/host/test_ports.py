"""agent.host.ports: slots' ports, picked outside the kernel's ephemeral range and claimed
host-wide so that two agents of one host never pick the same one (real sockets, real files)."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.host import ports
from agent.host.ports import (
    CLAIM_TTL,
    EPHEMERAL_RANGE,
    SLOT_PORTS,
    _bindable,
    _ephemeral,
    drop_claim,
    free_port,
    renew_claim,
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


def test_two_agents_picking_at_once_get_two_ports(tmp_path: Path) -> None:
    """Two agents of one host pick before either's slot binds (a rollout staging every node of
    a dev fleet): the check alone gives both the same port, the claim gives the second another
    one. The same random draws stand for two agents that happen to draw alike."""
    window = _window()
    alone = {free_port(ports=window, rng=random.Random(7)) for _ in range(2)}
    assert len(alone) == 1  # what happened: both slots on one port, the second crash-looping
    claims = tmp_path / "claims"
    first = free_port(ports=window, rng=random.Random(7), claims=claims)
    second = free_port(ports=window, rng=random.Random(7), claims=claims)
    assert first != second and {first, second} <= set(range(window[0], window[1] + 1))
    assert (claims / str(first)).read_text() == f"{os.getpid()}\n"


def test_a_dropped_or_lapsed_claim_frees_the_port(tmp_path: Path) -> None:
    """A stopped slot's claim goes at once (only the claimer's own); one left behind by a killed
    agent lapses after CLAIM_TTL and is removed at the next pick."""
    window = (low := _window(1)[0], low)
    claims = tmp_path / "claims"
    port = free_port(ports=window, rng=random.Random(1), claims=claims)
    assert port == low
    # Claimed: the only port of the window is not given again; the kernel picks instead.
    again = free_port(ports=window, rng=random.Random(1), claims=claims)
    assert again != low
    drop_claim(claims, low)
    assert not (claims / str(low)).exists()
    assert free_port(ports=window, rng=random.Random(1), claims=claims) == low
    # Another agent's claim is not dropped by this one.
    (claims / str(low)).write_text("1\n")
    drop_claim(claims, low)
    assert (claims / str(low)).exists()
    # Lapsed: older than CLAIM_TTL.
    old = time.time() - CLAIM_TTL - 1
    os.utime(claims / str(low), (old, old))
    assert free_port(ports=window, rng=random.Random(1), claims=claims) == low
    assert (claims / str(low)).read_text() == f"{os.getpid()}\n"  # claimed anew


def test_a_restart_renews_the_claim(tmp_path: Path) -> None:
    """The slot's process starts again on its port: the claim's clock starts again."""
    claims = tmp_path / "claims"
    window = (low := _window(1)[0], low)
    free_port(ports=window, rng=random.Random(1), claims=claims)
    old = time.time() - CLAIM_TTL + 5
    os.utime(claims / str(low), (old, old))
    renew_claim(claims, low)
    assert time.time() - (claims / str(low)).stat().st_mtime < 5


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
        assert not (claims / str(port)).exists()


def test_a_held_lock_is_waited_for_a_bounded_time(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Another agent holding the lock (stopped mid-pick) delays a pick LOCK_WAIT at most; the
    pick then goes on without claims. A lock released meanwhile is taken."""
    monkeypatch.setattr(ports, "LOCK_WAIT", 0.2)
    claims = tmp_path / "claims"
    claims.mkdir(mode=0o700)
    fd = os.open(claims / ports.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        port = free_port(claims=claims)
        assert time.monotonic() - started >= 0.2
        assert not (claims / str(port)).exists()  # not claimed: the lock was not had
        release = threading.Timer(0.05, fcntl.flock, (fd, fcntl.LOCK_UN))
        release.start()
        port = free_port(claims=claims)
        release.join()
        assert (claims / str(port)).exists()
    finally:
        os.close(fd)
