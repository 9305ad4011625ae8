"""agent.host.probes against real local sockets and processes: http, tcp and exec attempts.

The thresholds and the prober's pacing (pure) are in tests/unit/agent/host/test_probes.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.cadence import next_tick
from agent.host import probes
from agent.host.probes import (
    Prober,
    ProbeResult,
    connect_now,
    exec_probe,
    http_probe,
    tcp_probe,
)
from protocol.manifest import HealthConfig
from tests.integration.procs import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[bytes, float], asyncio.Future[int]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: bytes, delay: float = 0.0) -> int:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await r.readuntil(b"\r\n\r\n")
                await asyncio.sleep(delay)
                w.write(answer)
                await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass  # the probe hung up first (tcp probe, timeout): fine
            finally:
                w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        return int(srv.sockets[0].getsockname()[1])

    yield start  # type: ignore[misc]
    for s in servers:
        s.close()
        await s.wait_closed()


async def test_http_2xx_and_3xx_pass(serve) -> None:
    """A 200 and a 302 answer both pass."""
    assert (await http_probe(await serve(b"HTTP/1.1 200 OK\r\n\r\n"), "/h", 1.0)).ok
    assert (await http_probe(await serve(b"HTTP/1.0 302 Found\r\n\r\n"), "/h", 1.0)).ok


async def test_http_5xx_fails_with_the_status(serve) -> None:
    """A 503 fails and the reason names the status."""
    r = await http_probe(await serve(b"HTTP/1.1 503 Unavailable\r\n\r\n"), "/h", 1.0)
    assert not r.ok and "503" in r.reason


async def test_http_garbage_fails(serve) -> None:
    """An answer that is not HTTP fails."""
    r = await http_probe(await serve(b"SSH-2.0-hello\r\n"), "/h", 1.0)
    assert not r.ok and "not an HTTP answer" in r.reason


@pytest.mark.parametrize(("answer", "status_line"), [
    (b"HTTP/1.1 200 " + b"O" * 70_000 + b"\r\n\r\n", True),  # past the reader's limit
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n", False),  # a header line
])
async def test_an_answer_with_a_line_too_long_fails_the_probe(
    serve, answer: bytes, status_line: bool
) -> None:
    """A line past the reader's 64 KiB limit is a failed probe, not an error of the agent (which
    took down the slot's supervisor: a serving slot killed where an unhealthy one belongs).
    ``http_probe`` reads the status line alone: only that one can be too long for it."""
    port = await serve(answer)
    r = await http_probe(port, "/h", 1.0)
    assert r.ok is not status_line and ("line longer than" in r.reason) is status_line, r
    for _ in range(2):  # a fresh keep-alive connection, then one reopened after the failure
        conn = probes.HttpProbeConnection(port, "/h")
        try:
            r = await conn.probe(1.0)
        finally:
            await conn.close()
        assert not r.ok and "line longer than" in r.reason, r


async def test_http_slow_answer_times_out(serve) -> None:
    """An answer later than the timeout fails."""
    r = await http_probe(await serve(b"HTTP/1.1 200 OK\r\n\r\n", 2.0), "/h", 0.2)
    assert not r.ok and "within 0.2s" in r.reason


async def test_http_and_tcp_refused_connection_fail() -> None:
    """Nothing listening: both fail with the OS reason."""
    port = _free_port()
    assert not (await http_probe(port, "/", 1.0)).ok
    r = await tcp_probe(port, 1.0)
    assert not r.ok and "refused" in r.reason.lower()


async def test_tcp_connect_passes(serve) -> None:
    """A listening socket passes the tcp probe."""
    assert (await tcp_probe(await serve(b""), 1.0)).ok


async def test_exec_exit_status(tmp_path: Path) -> None:
    """Exit 0 passes; another status fails and is named."""
    env = {"PATH": "/usr/bin:/bin"}
    assert (await exec_probe([sys.executable, "-c", "pass"], tmp_path, env, 5)).ok
    r = await exec_probe([sys.executable, "-c", "raise SystemExit(3)"], tmp_path, env, 5)
    assert not r.ok and "exit status 3" in r.reason


async def test_exec_timeout_kills_the_probe(tmp_path: Path) -> None:
    """A probe that hangs is killed at the timeout and fails."""
    r = await exec_probe([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, {}, 0.3)
    assert not r.ok and "no exit within" in r.reason


@pytest.mark.parametrize("status", [0, 1])
async def test_what_an_exec_probe_leaves_in_the_background_ends_with_it(
    tmp_path: Path, status: int
) -> None:
    """A probe that exits (passing or not) after starting ``sleep &`` leaves nothing running:
    the rest of its process group is ended before the probe's result is given. A review found
    one ``sleep`` left per probe, every interval, outliving the slot and the agent."""
    argv = ["sh", "-c", f"sleep 300 & echo $! > child; exit {status}"]
    r = await exec_probe(argv, tmp_path, {"PATH": "/usr/bin:/bin"}, 5)
    child = int((tmp_path / "child").read_text())
    try:
        assert r.ok is (status == 0)
        assert _gone(child), psutil.Process(child).cmdline()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 9)


def _gone(pid: int) -> bool:
    """No such process, or a zombie (a leftover reparented to an init that does not reap)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_exec_missing_program_fails(tmp_path: Path) -> None:
    """A probe program that does not exist fails with the OS reason."""
    r = await exec_probe([str(tmp_path / "nope")], tmp_path, {}, 1)
    assert not r.ok


async def test_prober_reports_health_changes(tmp_path: Path) -> None:
    """The probe loop reports healthy once the thresholds are met, and unhealthy after."""
    flag = tmp_path / "ok"
    flag.touch()
    check = [
        sys.executable,
        "-c",
        f"import os,sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 1)",
    ]
    health = HealthConfig(
        exec=check, interval=0.05, timeout=5, healthy_threshold=2, unhealthy_threshold=2
    )
    changes: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()

    async def on_change(healthy: bool, reason: str) -> None:
        await changes.put((healthy, reason))

    p = Prober(health, None, tmp_path, {}, on_change)
    task = asyncio.create_task(p.run())
    try:
        assert (await asyncio.wait_for(changes.get(), 10))[0] is True
        flag.unlink()
        healthy, reason = await asyncio.wait_for(changes.get(), 10)
        assert healthy is False and "exit status 1" in reason
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


FAR = 1e6  # a probe period whose next turn is days away: only the port's opening can wake it


async def _refused(prober: Prober) -> None:
    async def last() -> ProbeResult:
        return prober.last

    await wait_until(last, lambda r: r.refused, timeout=10, what="a refused probe", interval=0.01)


async def test_a_starting_slot_is_probed_as_soon_as_it_listens() -> None:
    """Nothing listens yet, so the first probe is refused; the prober watches the port and
    probes the moment a server listens there, not at the next ``start_interval`` (here days
    away), and on the connection that found it listening (one connection in all)."""
    loop = asyncio.get_running_loop()
    assert next_tick(loop.time(), FAR) - loop.time() > 60  # the grid cannot wake it in this test
    port = _free_port()
    connections = 0
    answered = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while await r.readuntil(b"\r\n\r\n"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await w.drain()
                answered.set()
        w.close()

    changes: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()

    async def on_change(healthy: bool, reason: str) -> None:
        await changes.put((healthy, reason))

    health = HealthConfig(http="/healthz", interval=FAR, start_interval=FAR, healthy_threshold=1)
    prober = Prober(health, port, Path("."), {}, on_change)
    task = asyncio.create_task(prober.run())

    async def stopped() -> None:
        prober.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        await _refused(prober)  # the first probe found nothing listening
        srv = await asyncio.start_server(handle, "127.0.0.1", port)
        async with srv:
            try:
                assert await asyncio.wait_for(changes.get(), 10) == (True, "")
                assert connections == 1
            finally:
                # The prober's kept-alive connection closed before the server: from Python
                # 3.12.1 a server's wait_closed waits for its connections (it hung here).
                await stopped()
    finally:
        await stopped()


async def test_a_starting_tcp_slot_is_probed_as_soon_as_it_listens() -> None:
    """The same for a tcp probe."""
    loop = asyncio.get_running_loop()
    assert next_tick(loop.time(), FAR) - loop.time() > 60
    port = _free_port()
    healthy = asyncio.Event()

    async def on_change(ok: bool, reason: str) -> None:
        if ok:
            healthy.set()

    health = HealthConfig(tcp=True, interval=FAR, start_interval=FAR, healthy_threshold=1)
    prober = Prober(health, port, Path("."), {}, on_change)
    task = asyncio.create_task(prober.run())
    try:
        await _refused(prober)
        srv = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        async with srv:
            await asyncio.wait_for(healthy.wait(), 10)
    finally:
        prober.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_connect_now_tells_refused_accepted_and_unanswered_apart() -> None:
    """One connect attempt that never waits: refused (nothing listens) is False, accepted is
    the connected socket, and a handshake the kernel has not answered (here: a listener whose
    queue is full, so its SYNs are dropped) is True, for the usual connect to wait on; no
    socket is left open but the one given back."""
    fds = len(os.listdir("/proc/self/fd"))
    assert connect_now(_free_port()) is False
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        accepted = connect_now(port)
        assert isinstance(accepted, socket.socket)
        peer, _ = listener.accept()
        with peer, accepted:
            accepted.setblocking(True)
            accepted.sendall(b"ping")
            assert peer.recv(4) == b"ping"
        # Fill the queue: backlog 0 holds one connection; the next SYNs are dropped.
        queued = [socket.create_connection(("127.0.0.1", port), timeout=5)]
        try:
            assert connect_now(port) is True
        finally:
            for s in queued:
                s.close()
    assert len(os.listdir("/proc/self/fd")) == fds


async def test_a_refused_listen_poll_makes_no_asyncio_connect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While a starting slot's port refuses, each listen poll is one non-blocking connect: the
    asyncio connect (ten times the CPU) is made by the grid's probes only."""
    loop = asyncio.get_running_loop()
    assert next_tick(loop.time(), FAR) - loop.time() > 60
    attempts, asyncio_connects = 0, 0
    real_now, real_open = probes.connect_now, asyncio.open_connection

    def counted_now(port: int, host: str = "127.0.0.1") -> socket.socket | bool:
        nonlocal attempts
        attempts += 1
        return real_now(port, host)

    async def counted_open(*args: Any, **kwargs: Any) -> Any:
        nonlocal asyncio_connects
        asyncio_connects += 1
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(probes, "connect_now", counted_now)
    monkeypatch.setattr("agent.host.probes.asyncio.open_connection", counted_open)

    async def on_change(healthy: bool, reason: str) -> None:
        pass

    health = HealthConfig(http="/healthz", interval=FAR, start_interval=FAR, healthy_threshold=1)
    prober = Prober(health, _free_port(), Path("."), {}, on_change)
    task = asyncio.create_task(prober.run())
    async def polls() -> int:
        return attempts

    try:
        await wait_until(polls, lambda n: n >= 5, timeout=10,
                         what="five listen polls", interval=0.01)
        assert asyncio_connects == 1  # the first probe's, which was refused
    finally:
        prober.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
