"""The network test bed itself (``tests.netbed``): hosts reach each other over the bridge and
nothing else; partitions cut exactly the pair; delay and loss really happen (measured, with
bounds a no-op cannot meet and a slow machine cannot break: delay lower bounds only, loss in a
band many standard deviations wide); teardown leaves no namespace, link or process; the sweep
removes what a killed run left. Each test prints its figures (run with -s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import psutil
import pytest

from tests.netbed.bed import NetBed, NetBedError, _link_names, _netns_names, sweep
from tests.netbed.portal import Portal

Make = Callable[[Sequence[str]], NetBed]
ECHO_PORT = 7007


async def echo_server(bed: NetBed, host: str) -> asyncio.Server:
    """A TCP echo server of this test process, listening in ``host``."""
    sock = bed.socket(host)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bed.addr(host), ECHO_PORT))

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(echo, sock=sock)


async def rtts(bed: NetBed, src: str, dst: str, n: int = 5) -> list[float]:
    """Round trips of one small message over one connection from ``src`` to ``dst``'s echo."""
    reader, writer = await bed.open_connection(src, bed.addr(dst), ECHO_PORT)
    out = []
    try:
        for _ in range(n):
            started = time.monotonic()
            writer.write(b"ping")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
            out.append(time.monotonic() - started)
    finally:
        writer.close()
    return out


async def reaches(bed: NetBed, src: str, dst: str, timeout: float = 1.0) -> bool:
    try:
        _, writer = await bed.open_connection(src, bed.addr(dst), ECHO_PORT, timeout=timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def test_hosts_get_their_127_addresses(netbed: Make) -> None:
    """Each host has lo and eth0 with its 127.77.0.N address, 127.0.0.1 stays local, and no
    interface of the bed has any other address (no IPv6 link-local either)."""
    bed = netbed(["a", "b"])
    assert [bed.addr("a"), bed.addr("b")] == ["127.77.0.1", "127.77.0.2"]
    out = bed.run("b", ["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
    assert "inet 127.77.0.2/24" in out, out
    assert "local 127.0.0.1" in bed.run("b", ["ip", "route", "show", "table", "local"])
    # Only 127/8, ever: no IPv6 (not even link-local) in a host or on the bridge and veths.
    assert "inet6" not in bed.run("b", ["ip", "addr", "show"])
    root_side = subprocess.run(["ip", "addr", "show", "master", bed.bridge], capture_output=True,
                               text=True, check=True).stdout
    bridge = subprocess.run(["ip", "addr", "show", "dev", bed.bridge], capture_output=True,
                            text=True, check=True).stdout
    assert root_side.count("fwv") == 2 and "inet" not in root_side + bridge, root_side + bridge
    with pytest.raises(KeyError):
        bed.addr("c")
    with pytest.raises(ValueError, match="only 127"):
        NetBed(["a"], subnet="10.0.0")


async def test_partition_cuts_exactly_the_pair_and_heals(netbed: Make) -> None:
    """partition(a, b) stops a<->b both ways while both still reach c; heal restores it."""
    bed = netbed(["a", "b", "c"])
    servers = [await echo_server(bed, h) for h in ("a", "b", "c")]
    try:
        assert await reaches(bed, "a", "b") and await reaches(bed, "b", "a")
        bed.partition("a", "b")
        assert not await reaches(bed, "a", "b") and not await reaches(bed, "b", "a")
        assert await reaches(bed, "a", "c") and await reaches(bed, "b", "c")
        assert await reaches(bed, "c", "a") and await reaches(bed, "c", "b")
        bed.heal("a", "b")
        assert await reaches(bed, "a", "b") and await reaches(bed, "b", "a")
        bed.partition("c")
        assert not await reaches(bed, "a", "c") and not await reaches(bed, "c", "b")
        assert await reaches(bed, "a", "b")
        bed.heal("c")
        assert await reaches(bed, "a", "c")
        with pytest.raises(KeyError):
            bed.heal("a", "c")
    finally:
        for s in servers:
            s.close()


async def test_delay_is_added_to_every_round_trip_with_the_peer_only(netbed: Make) -> None:
    """impair(a, delay=0.1, peer=b): every a<->b round trip takes >= 0.2 s (0.1 s each way),
    through the NFQUEUE delayer; a<->c stays fast; unimpair makes a<->b fast again."""
    bed = netbed(["a", "b", "c"])
    servers = [await echo_server(bed, h) for h in ("b", "c")]
    try:
        before = await rtts(bed, "a", "b")
        bed.impair("a", delay=0.1, peer="b")
        slow = await rtts(bed, "a", "b")
        other = await rtts(bed, "a", "c")
        bed.unimpair("a")
        after = await rtts(bed, "a", "b")
    finally:
        for s in servers:
            s.close()
    print(f"\nRTT a<->b: before {statistics.median(before) * 1000:.1f} ms, impaired min "
          f"{min(slow) * 1000:.1f} ms (median {statistics.median(slow) * 1000:.1f}), a<->c "
          f"{statistics.median(other) * 1000:.1f} ms, after {statistics.median(after) * 1000:.1f}"
          " ms")
    assert min(slow) >= 0.195, slow
    # Medians against the 200 ms: generous for a busy 2-core machine, yet no 0.1 s delay passes.
    assert statistics.median(other) < 0.1 and statistics.median(before) < 0.1, (other, before)
    assert statistics.median(after) < 0.1, after


async def test_loss_drops_about_the_asked_share(netbed: Make) -> None:
    """impair(a, loss=0.2): of 1000 datagrams a->b, about 200 are lost (band 120..280, over 5
    standard deviations either side); with loss 0 none is."""
    bed = netbed(["a", "b"])
    rx = bed.socket("b", socket.SOCK_DGRAM)
    tx = bed.socket("a", socket.SOCK_DGRAM)
    rx.bind((bed.addr("b"), ECHO_PORT))
    rx.setblocking(False)

    async def send_and_count(n: int) -> int:
        loop, got = asyncio.get_running_loop(), 0

        async def receive() -> None:
            nonlocal got
            while True:
                await loop.sock_recv(rx, 64)
                got += 1

        receiver = asyncio.create_task(receive())
        try:
            for i in range(n):
                tx.sendto(str(i).encode(), (bed.addr("b"), ECHO_PORT))
                if i % 20 == 0:
                    await asyncio.sleep(0.002)  # pacing, and the receiver reads meanwhile
            last = -1
            while got != last:  # until nothing more arrives for 0.5 s
                last = got
                await asyncio.sleep(0.5)
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        return got

    try:
        clean = await send_and_count(300)
        bed.impair("a", loss=0.2)
        lossy = await send_and_count(1000)
    finally:
        rx.close()
        tx.close()
    print(f"\nloss 0: {300 - clean}/300 lost; loss 0.2: {1000 - lossy}/1000 lost")
    assert clean == 300
    assert 120 <= 1000 - lossy <= 280, lossy


async def test_portal_reaches_a_host_from_the_root_namespace(netbed: Make) -> None:
    """A root 127.0.0.1 port forwards into a host, and survives the host's partition."""
    bed = netbed(["a", "b"])
    server = await echo_server(bed, "a")
    try:
        async with Portal(bed, "a", bed.addr("a"), ECHO_PORT) as portal:
            bed.partition("a")
            reader, writer = await asyncio.open_connection("127.0.0.1", portal.port)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
            writer.close()
    finally:
        server.close()


def test_signals_reach_the_process_in_a_host(netbed: Make) -> None:
    """popen's pid is the command's own (ip netns exec execs): SIGSTOP stops it, SIGCONT
    resumes it, SIGKILL kills it; pids(host) lists it."""
    bed = netbed(["a"])
    proc = bed.popen("a", ["sleep", "60"])
    deadline = time.monotonic() + 10
    while proc.pid not in bed.pids("a") or psutil.Process(proc.pid).name() != "sleep":
        assert time.monotonic() < deadline, "sleep never showed in host a"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)
    assert _wait_status(proc.pid, psutil.STATUS_STOPPED)
    os.kill(proc.pid, signal.SIGCONT)
    assert _wait_status(proc.pid, psutil.STATUS_SLEEPING)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def _wait_status(pid: int, status: str) -> bool:
    deadline = time.monotonic() + 10
    while psutil.Process(pid).status() != status:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_teardown_leaves_nothing_and_kills_strays() -> None:
    """After the bed closes: no namespace, veth or bridge of it, and every process that ran in a
    host is gone, ours (popen) or not (a detached grandchild), delayer included."""
    with NetBed(["a", "b"]) as bed:
        ours = bed.popen("a", ["sleep", "60"])
        stray = bed.popen("b", ["sh", "-c", "setsid sleep 61 & echo $!"], stdout=subprocess.PIPE)
        assert stray.stdout is not None
        stray_pid = int(stray.stdout.readline())
        stray.stdout.close()
        stray.wait(timeout=10)
        bed.impair("a", delay=0.05)
        delayer = next(p for p in bed.pids("a") if "delayer.py" in " ".join(
            psutil.Process(p).cmdline()))
        tag = bed.tag
    assert ours.returncode is not None
    for pid in (stray_pid, delayer):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid
    assert not [n for n in _netns_names() if tag in n]
    assert not [n for n in _link_names() if tag in n]


def test_teardown_runs_when_the_block_raises() -> None:
    """An exception inside the block still removes everything."""
    with pytest.raises(RuntimeError, match="boom"), NetBed(["a"]) as bed:
        tag = bed.tag
        raise RuntimeError("boom")
    assert not [n for n in _netns_names() + _link_names() if tag in n]


def test_sweep_removes_what_a_killed_run_left() -> None:
    """A namespace and a bridge named for a dead process are removed by the next bed's start;
    a live bed of another process is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"{dead.pid:x}x01"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other_tag = f"{other.pid:x}x01"
    try:
        subprocess.run(["ip", "netns", "add", f"fwbed-{tag}-h"], check=True)
        subprocess.run(["ip", "link", "add", f"fwb{tag}", "type", "bridge"], check=True)
        subprocess.run(["ip", "netns", "add", f"fwbed-{other_tag}-h"], check=True)
        with NetBed(["a"]):
            names = _netns_names() + _link_names()
            assert f"fwbed-{tag}-h" not in names and f"fwb{tag}" not in names
            assert f"fwbed-{other_tag}-h" in names
    finally:
        other.kill()
        other.wait()
        subprocess.run(["ip", "netns", "del", f"fwbed-{other_tag}-h"], check=False,
                       capture_output=True)
        subprocess.run(["ip", "netns", "del", f"fwbed-{tag}-h"], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", f"fwb{tag}"], check=False, capture_output=True)
    assert f"fwbed-{other_tag}-h" not in sweep() + _netns_names()


def test_bad_names_are_refused() -> None:
    """Host names must fit in a namespace name; duplicates and impossible impairments refused."""
    with pytest.raises(ValueError):
        NetBed(["a", "a"])
    with pytest.raises(ValueError):
        NetBed(["Bad Name"])
    with NetBed(["a"]) as bed, pytest.raises(ValueError):
        bed.impair("a", loss=1.5)
    assert issubclass(NetBedError, RuntimeError)
