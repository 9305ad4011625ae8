"""agent.router.control and ``python -m agent.router``: a control socket is removed only when
nothing listens on it; a router slow to answer keeps its socket and no second one starts."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import agent.router.__main__ as router_main
from agent.errors import RouterUnavailable
from agent.router.control import Reply, RouterClient, encode_reply, router_pid, start_router


async def reachable(path: Path) -> bool:
    """Whether a listener still takes connections on ``path``."""
    try:
        async with asyncio.timeout(5.0):
            _, writer = await asyncio.open_unix_connection(path)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


@pytest.fixture
async def silent(tmp_path: Path) -> AsyncIterator[Path]:
    """A control socket whose listener takes connections and never answers (a busy router)."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the caller gives up and closes
        writer.close()

    path = tmp_path / "r.sock"
    server = await asyncio.start_unix_server(never_answer, path=str(path))
    try:
        yield path
    finally:
        server.close()
        await server.wait_closed()


async def test_a_router_that_does_not_answer_in_time_keeps_its_socket(
    silent: Path, tmp_path: Path
) -> None:
    """start_router reports the timeout and starts nothing; the socket stays its router's."""
    no_python = str(tmp_path / "no-python")  # (were a launch tried, it would fail at once)
    with pytest.raises(RouterUnavailable, match=r"did not answer within 0\.5s"):
        await start_router(silent, tmp_path / "r.log", python=no_python, timeout=0.5)
    assert await reachable(silent)


async def test_a_socket_nothing_listens_on_is_removed(tmp_path: Path) -> None:
    """A socket file left by a router that is gone is removed, and a router is started."""
    path = tmp_path / "r.sock"
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(path))  # bound, never listening: connecting is refused
    no_python = str(tmp_path / "no-python")
    with pytest.raises(RouterUnavailable, match="cannot start the router with"):
        await start_router(path, tmp_path / "r.log", python=no_python, timeout=0.5)
    assert not await asyncio.to_thread(path.exists)


async def test_a_second_router_process_leaves_a_slow_one_alone(
    silent: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m agent.router`` on the socket of a router slow to answer exits 1, saying so,
    without removing the socket or serving."""
    started: list[Path] = []

    class Server:
        def __init__(self, socket_path: Path) -> None:
            started.append(socket_path)

        async def run(self) -> None:
            pass

    monkeypatch.setattr(router_main, "RouterServer", Server)
    assert await router_main._serve(silent, None) == 1
    assert await reachable(silent) and not started
    assert "did not answer within 1s" in capsys.readouterr().err


@pytest.mark.parametrize(("fd", "message"), [
    ("999", "no control socket on descriptor 999"), ("tcp", "is not a unix stream socket")])
def test_a_bad_inherited_control_socket_is_refused(
    tmp_path: Path, fd: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--control-fd`` naming no socket, or not a unix stream one, exits 2 with one line."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        number = str(tcp.fileno()) if fd == "tcp" else fd
        code = router_main.main(["--control", str(tmp_path / "r.sock"), "--control-fd", number])
    assert code == 2
    assert message in capsys.readouterr().err


async def test_the_socket_is_made_in_a_directory_of_the_agent_alone(tmp_path: Path) -> None:
    """The agent binds the control socket itself, 0600, in a directory it makes 0700 (one left
    open by an older agent is closed); the launch failing, the socket is gone again."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    no_python = str(tmp_path / "no-python")
    with pytest.raises(RouterUnavailable, match="cannot start the router with"):
        await start_router(run / "r.sock", tmp_path / "r.log", python=no_python, timeout=0.5)
    st = run.lstat()
    assert (st.st_uid, st.st_mode & 0o7777) == (os.geteuid(), 0o700)
    assert not (run / "r.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root (CI runs as root)")
async def test_a_directory_an_older_agent_handed_over_is_taken_back(tmp_path: Path) -> None:
    """An older agent gave the routers' socket directory to the service user: the agent takes it
    back (an agent without CAP_DAC_OVERRIDE could not reach a socket made there)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(run, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(RouterUnavailable, match="cannot start the router with"):
        await start_router(run / "r.sock", tmp_path / "r.log",
                           python=str(tmp_path / "no-python"), timeout=0.5)
    assert run.lstat().st_uid == os.geteuid()


async def test_a_socket_directory_that_is_no_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    with pytest.raises(RouterUnavailable, match="is not a directory; remove it"):
        await start_router(tmp_path / "run" / "r.sock", tmp_path / "r.log", timeout=0.5)


def test_the_agents_socket_is_never_cleaned_up_by_the_router() -> None:
    """Where a loop cleans a given socket up at close (asyncio from 3.13; uvloop takes the
    argument), the router asks it not to: that stats the socket's path at the start, in a
    directory the router's user cannot look into, and the router would not start."""
    import inspect

    from agent.router.server import keep_socket

    class Loop313:
        async def create_unix_server(self, factory: object, path: object = None, *,
                                     sock: object = None, cleanup_socket: bool = True) -> None:
            pass

    assert keep_socket(Loop313()) == {"cleanup_socket": False}  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        takes = "cleanup_socket" in inspect.signature(loop.create_unix_server).parameters
        assert keep_socket(loop) == ({"cleanup_socket": False} if takes else {})
    finally:
        loop.close()
    import uvloop  # a dependency of the agent on Linux

    fast = uvloop.new_event_loop()
    try:
        assert keep_socket(fast) == {"cleanup_socket": False}
    finally:
        fast.close()


def _socket_of(path: Path, uid: int, gid: int) -> socket.socket:
    """A listening unix socket at ``path`` whose file is ``uid``'s (as an older agent's router
    running as the services' user left it)."""
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(path))
    listening.listen()
    os.chown(path, uid, gid)
    return listening


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root (CI runs as root)")
async def test_a_directory_an_older_router_still_uses_is_left_to_it(tmp_path: Path) -> None:
    """An older agent's router, running as the services' user, still listens in the directory
    the older agent gave that user: a new router's socket is made there, the directory stays
    that user's (that router removes its socket when it stops, then drains: taken, the removal
    would fail and the drain be skipped) and the old socket stays that user's too."""
    nobody = pwd.getpwnam("nobody")
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chown(run, nobody.pw_uid, nobody.pw_gid)
    with _socket_of(run / "old.sock", nobody.pw_uid, nobody.pw_gid):
        with pytest.raises(RouterUnavailable, match="cannot start the router with"):
            await start_router(run / "new.sock", tmp_path / "r.log",
                               python=str(tmp_path / "no-python"), timeout=0.5)
        assert run.lstat().st_uid == nobody.pw_uid
        assert (run / "old.sock").lstat().st_uid == nobody.pw_uid


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root (CI runs as root)")
async def test_an_older_routers_socket_the_agent_may_not_write_is_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the agent may not write an older router's socket (no CAP_DAC_OVERRIDE: the
    drop-in's; stood for here by ``os.access``), the socket becomes the agent's before the
    ping, so that the router is reached; one it may write is left as it is."""
    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "old.sock"
    with _socket_of(path, nobody.pw_uid, nobody.pw_gid):
        with pytest.raises(RouterUnavailable, match="did not answer"):
            await start_router(path, tmp_path / "r.log", timeout=0.3)
        assert path.lstat().st_uid == nobody.pw_uid  # writable to this root: left
        monkeypatch.setattr(os, "access", lambda p, mode: False)
        with pytest.raises(RouterUnavailable, match="did not answer"):
            await start_router(path, tmp_path / "r.log", timeout=0.3)
        assert path.lstat().st_uid == os.geteuid()


@pytest.fixture
async def imposter(tmp_path: Path) -> AsyncIterator[tuple[Path, int]]:
    """A listener on a router's control socket that answers every call as a router would, naming
    the pid of another process (a ``sleep``: what the agent might then kill)."""
    victim = await asyncio.create_subprocess_exec("sleep", "60")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(encode_reply(Reply(ok=True, pid=victim.pid)))
        await writer.drain()
        writer.close()

    path = tmp_path / "r.sock"
    server = await asyncio.start_unix_server(answer, path=str(path))
    try:
        yield path, victim.pid
    finally:
        server.close()
        await server.wait_closed()
        victim.kill()
        await victim.wait()


async def test_a_listener_naming_a_pid_that_is_no_router_of_its_socket_is_refused(
    imposter: tuple[Path, int], tmp_path: Path
) -> None:
    """The agent signals the pid its router names (a router that does not exit after its drain
    is killed): a listener that names another process is not adopted as the router, its socket
    is left to it, and no router is started beside it."""
    path, victim = imposter
    with pytest.raises(RouterUnavailable, match=f"names pid {victim}, which is not a router"):
        await RouterClient(path).ping()
    with pytest.raises(RouterUnavailable, match="not a router on that socket"):
        await start_router(path, tmp_path / "r.log", python=str(tmp_path / "no-python"),
                           timeout=0.5)
    assert await reachable(path)


async def test_a_router_of_another_socket_is_no_router_of_this_one(tmp_path: Path) -> None:
    """A real router is the router of its own socket (reached through a symlink to it too), not
    of another one; pid 0 is no process."""
    mine = tmp_path / "mine.sock"
    pid = await start_router(mine, tmp_path / "r.log", timeout=10.0)
    try:
        assert router_pid(pid, mine) == pid
        link = tmp_path / "link.sock"
        link.symlink_to(mine)
        assert router_pid(pid, link) == pid
        with pytest.raises(RouterUnavailable, match="not a router on that socket"):
            router_pid(pid, tmp_path / "other.sock")
        with pytest.raises(RouterUnavailable, match="names pid 0"):
            router_pid(0, mine)
    finally:
        os.kill(pid, signal.SIGKILL)
