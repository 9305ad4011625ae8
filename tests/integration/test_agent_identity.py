"""What the agent's children inherit (issue 20, defect 4): the router and the services never see
the agent's environment; with --service-user they run as another user who can read neither the
agent's environment nor its state; with --router-user the routers run apart from the services.
The agents that switch users run as root held to the capabilities of the systemd drop-in that
sets those flags (``deploy/systemd/fleetwave-agent.service.d/service-user.conf``, read here), as
they run in production: as plain root, an agent had reached routers that the drop-in's agent
could not (``EACCES`` on a control socket of another user)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import site
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.host.identity import RunAs, child_env
from agent.host.probes import exec_probe
from agent.router import RouterClient, start_router
from coordinator.dev.broker import Broker
from coordinator.dev.devfleet import Child
from protocol.messages import ObservedState
from protocol.signing import public_key
from tests.integration.procs import reaping, spawn_agent, wait_until
from tests.integration.test_agent_services import NODE, Fleet, Load, _const, hello_fleet

SECRET = "nats://node-1:s3cret@127.0.0.1:4222"
REPO = Path(__file__).resolve().parents[2]
DROP_IN = REPO / "deploy" / "systemd" / "fleetwave-agent.service.d" / "service-user.conf"


def _as_the_drop_in_runs_it(argv: list[str]) -> list[str]:
    """``argv`` run as systemd runs the agent with the drop-in: root, its capabilities bounded by
    the drop-in's ``CapabilityBoundingSet`` (``setpriv``, util-linux)."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed: apt-get install util-linux"
    caps = next(line.partition("=")[2].split() for line in DROP_IN.read_text().splitlines()
                if line.startswith("CapabilityBoundingSet="))
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    return [setpriv, "--bounding-set", bounding, *argv]


def _environ(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


async def test_the_router_inherits_nothing_of_the_agents_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router started by the agent gets PATH and the like, never FLEETWAVE_NATS or others."""
    monkeypatch.setenv("FLEETWAVE_NATS", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    sock = tmp_path / "run" / "router.sock"
    pid = await start_router(sock, tmp_path / "router.log")
    try:
        env = _environ(pid)
        assert "FLEETWAVE_NATS" not in env and "AWS_SECRET_ACCESS_KEY" not in env
        assert env["PATH"] == os.environ["PATH"] and "PYTHONPATH" in env
    finally:
        with contextlib.suppress(Exception):
            await RouterClient(sock).shutdown()
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A base dir another user can traverse (pytest's own tmp dirs are 0700 to their owner)."""
    base = Path(tempfile.mkdtemp(prefix="fw-identity-"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
async def test_services_and_routers_run_as_the_service_user(
    broker: Broker, open_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --service-user nobody the slot, its probes and the router run as nobody, serve
    traffic, and can read neither the agent's environment nor its state file, nor list the
    releases (0711, also when an older agent left the directory 0755), while the slot lists and
    reads its own. A review found releases/ listable, and every service's manifest readable."""
    nobody = pwd.getpwnam("nobody")
    monkeypatch.setenv("FLEETWAVE_NATS", broker.url)  # the agent's secret, in its environment
    python = _python_for(RunAs(nobody.pw_name, nobody.pw_uid, nobody.pw_gid, nobody.pw_dir),
                         monkeypatch)
    async with hello_fleet(broker, open_base) as fleet:
        data = fleet.base / NODE
        (data / "releases").mkdir(parents=True)
        (data / "releases").chmod(0o755)  # as an older agent left it: made 0711 at the start
        agent = _bounded_agent(broker, fleet, python, "--service-user", "nobody")
        async with reaping(agent):
            obs = await _serving(fleet)
            slot_pid = obs.slots["a"].pid
            assert slot_pid is not None and agent.pid is not None
            router = _router_pid(fleet.base / NODE)
            for pid in (slot_pid, router):
                proc = psutil.Process(pid)
                assert proc.uids().real == nobody.pw_uid, proc.cmdline()
                assert proc.gids().real == nobody.pw_gid
                env = _environ(pid)
                assert "FLEETWAVE_NATS" not in env and env["HOME"] == nobody.pw_dir
                assert env["USER"] == "nobody"

            assert stat.S_IMODE(data.stat().st_mode) == 0o711
            assert stat.S_IMODE((data / "releases").stat().st_mode) == 0o711
            assert stat.S_IMODE((data / "state.json").stat().st_mode) == 0o600
            assert stat.S_IMODE((data / "logs").stat().st_mode) == 0o700
            # What the service's user can actually do, tried as that user: not list the
            # releases (each one's fleetwave.toml holds its service's [env])...
            for argv in (["cat", f"/proc/{agent.pid}/environ"], ["cat", str(data / "state.json")],
                         ["ls", str(data)], ["ls", str(data / "releases")]):
                assert await _exit_as(nobody.pw_uid, argv) != 0, argv
            # ...but list and read its own release, where it runs.
            own = Path(psutil.Process(slot_pid).cwd())
            assert own.parent == data / "releases"
            for argv in (["ls", str(own)], ["cat", str(own / "fleetwave.toml")]):
                assert await _exit_as(nobody.pw_uid, argv) == 0, argv
            # ...but one user for both lets a service signal its router (stop it, take its
            # port): the agent says so at start (--router-user keeps them apart, below).
            assert await _exit_as(nobody.pw_uid, ["kill", "-0", str(router)]) == 0
        log = (fleet.base / "logs" / f"{NODE}.log").read_text()
        assert "the routers run as the services' user 'nobody'" in log


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
async def test_routers_run_apart_from_the_services_with_router_user(
    broker: Broker, open_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --service-user nobody --router-user daemon the slot runs as nobody and the router as
    daemon. Tried as the service's user, the router can be neither signalled (stopped, its
    public port taken) nor reached on its control socket; the routers' own user can signal it
    and the agent's (root) reach it, so the refusals are the users', not a broken check. The
    socket and its directory are the agent's (the router inherits the socket listening). The
    agent warns of shared users only when they are shared."""
    nobody, daemon, python = _two_users(monkeypatch)
    async with hello_fleet(broker, open_base) as fleet:
        agent = _bounded_agent(broker, fleet, python, "--service-user", "nobody",
                               "--router-user", "daemon")
        async with reaping(agent):
            obs = await _serving(fleet)
            slot_pid = obs.slots["a"].pid
            assert slot_pid is not None
            router = _router_pid(fleet.base / NODE)
            assert psutil.Process(slot_pid).uids().real == nobody.pw_uid
            proc = psutil.Process(router)
            assert (proc.uids().real, proc.gids().real) == (daemon.pw_uid, daemon.pw_gid)
            assert _environ(router)["USER"] == "daemon"

            from agent.manager.routing import router_socket

            sock = router_socket(fleet.base / NODE, "hello")
            for path, mode in ((sock.parent, 0o700), (sock, 0o600)):
                st = path.stat()
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), mode), path
            reach = [python, "-c", "import socket, sys; "
                     "socket.socket(socket.AF_UNIX).connect(sys.argv[1])", str(sock)]
            signal0 = ["kill", "-0", str(router)]
            for argv in (signal0, reach):
                assert await _exit_as(nobody.pw_uid, argv) != 0, argv
            assert await _exit_as(daemon.pw_uid, signal0) == 0
            assert await _exit_as(os.geteuid(), reach) == 0
        log = (fleet.base / "logs" / f"{NODE}.log").read_text()
        assert "give the routers a user of their own" not in log


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
async def test_a_service_of_its_own_user_is_kept_from_the_others(
    broker: Broker, open_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --service-user nobody --service-user hello=daemon, hello runs as daemon (its
    probes too) and its router as nobody, the services' user: the other services' user can no
    longer read hello's environment (its secrets), signal it, or see where it runs, which with
    one user for every service it could (session 37's review). The agent killed and started
    again adopts hello as daemon's."""
    nobody, daemon, python = _two_users(monkeypatch)
    async with hello_fleet(broker, open_base) as fleet:
        agent = _bounded_agent(broker, fleet, python, "--service-user", "nobody",
                               "--service-user", "hello=daemon")
        async with reaping(agent):
            obs = await _serving(fleet)
            slot_pid = obs.slots["a"].pid
            assert slot_pid is not None
            proc = psutil.Process(slot_pid)
            assert (proc.uids().real, proc.gids().real) == (daemon.pw_uid, daemon.pw_gid)
            assert _environ(slot_pid)["USER"] == "daemon"
            assert psutil.Process(_router_pid(fleet.base / NODE)).uids().real == nobody.pw_uid
            for argv in (["cat", f"/proc/{slot_pid}/environ"], ["kill", "-0", str(slot_pid)],
                         ["ls", f"/proc/{slot_pid}/cwd/"]):
                # (as the user and its group: /proc/<pid>/environ wants both to match)
                assert await _exit_as(nobody.pw_uid, argv, nobody.pw_gid) != 0, argv  # another
                assert await _exit_as(daemon.pw_uid, argv, daemon.pw_gid) == 0, argv  # its own
            # Its release is its group's alone (the agent's own, not its to change): the other
            # services' user cannot read it even knowing the path; its own can.
            release = Path(_environ(slot_pid)["FLEETWAVE_RELEASE_DIR"])
            st = os.stat(release)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, daemon.pw_gid, 0o750)
            manifest = ["cat", str(release / "fleetwave.toml")]
            assert await _exit_as(nobody.pw_uid, manifest, nobody.pw_gid) != 0
            assert await _exit_as(daemon.pw_uid, manifest, daemon.pw_gid) == 0
            assert await _exit_as(daemon.pw_uid, ["touch", str(release / "app.py")],
                                  daemon.pw_gid) != 0
            agent.signal(signal.SIGKILL)
            await agent.stop(timeout=0)
            await agent.start()
            again = await fleet.converged(await fleet.desire({"a": "1.0.0"}, {"a": 100}))
            assert again.slots["a"].pid == slot_pid and again.slots["a"].status == "healthy"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
async def test_the_drop_ins_agent_killed_adopts_its_services_and_routers(
    broker: Broker, open_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of an agent run as the drop-in runs it (both users apart) under load: no request
    fails, and the agent started again adopts the service's process and its router (another
    user's /proc: the drop-in's SYS_PTRACE and DAC_READ_SEARCH) instead of starting them again."""
    nobody = pwd.getpwnam("nobody")
    python = _python_for(RunAs(nobody.pw_name, nobody.pw_uid, nobody.pw_gid, nobody.pw_dir),
                         monkeypatch)
    async with hello_fleet(broker, open_base) as fleet:
        agent = _bounded_agent(broker, fleet, python, "--service-user", "nobody",
                               "--router-user", "daemon")
        async with reaping(agent):
            obs = await _serving(fleet)
            slot, router = obs.slots["a"].pid, _router_pid(fleet.base / NODE)
            async with Load(fleet.port).running() as load:
                await wait_until(_const(load), lambda ld: ld.ok > 30, timeout=20, what="load")
                agent.signal(signal.SIGKILL)
                await agent.stop(timeout=0)
                served = load.ok
                await wait_until(_const(load), lambda ld: ld.ok > served + 50, timeout=20,
                                 what="traffic with the agent dead")
                await agent.start()
                gen = await fleet.desire({"a": "1.0.0", "b": "2.0.0"}, {"a": 50, "b": 50})
                obs = await fleet.converged(gen)
            assert load.failed == 0, load.errors
            assert obs.slots["a"].pid == slot  # adopted, not started again
            assert obs.slots["b"].status == "healthy" and obs.weights == {"a": 50, "b": 50}
            assert _router_pid(fleet.base / NODE) == router


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
async def test_a_router_adopted_as_the_old_user_after_router_user_is_named(
    broker: Broker, open_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routers started as the service user, then the agent restarted with --router-user: it
    adopts the running router (at its start, from its state) and names it in the log as
    running as the old user, with how to move it; the router serves on."""
    nobody = pwd.getpwnam("nobody")
    python = _python_for(RunAs(nobody.pw_name, nobody.pw_uid, nobody.pw_gid, nobody.pw_dir),
                         monkeypatch)
    async with hello_fleet(broker, open_base) as fleet:
        agent = _bounded_agent(broker, fleet, python, "--service-user", "nobody")
        async with reaping(agent):
            await _serving(fleet)
            router = _router_pid(fleet.base / NODE)
            agent.signal(signal.SIGKILL)
            await agent.stop(timeout=0)
            agent.argv = [*agent.argv, "--router-user", "daemon"]
            await agent.start()
            log = fleet.base / "logs" / f"{NODE}.log"
            said = await wait_until(lambda: asyncio.to_thread(log.read_text),
                                    lambda t: "not as daemon" in t, timeout=30,
                                    what="the agent to name the router of the old user")
            assert (f"the router of hello (pid {router}) runs as uid {nobody.pw_uid}, not as "
                    f"daemon" in said and f"kill {router}" in said)
            assert _router_pid(fleet.base / NODE) == router  # adopted, serving on
            assert await _get(fleet.port) is not None


def _bounded_agent(broker: Broker, fleet: Fleet, python: str, *flags: str) -> Child:
    """The fleet's agent run by ``python`` as the drop-in runs it, with ``flags``."""
    agent = spawn_agent(broker.url, NODE, fleet.base, python=python, extra=[
        "--trust-key", public_key(fleet.seed), *flags])
    agent.argv = _as_the_drop_in_runs_it(agent.argv)
    return agent


async def _serving(fleet: Fleet) -> ObservedState:
    """1.0.0 desired in slot a: converged, healthy, and served through the router."""
    obs = await fleet.converged(await fleet.desire({"a": "1.0.0"}, {"a": 100}))
    assert obs.phase == "converged" and obs.slots["a"].status == "healthy"
    body = await wait_until(lambda: _get(fleet.port), lambda b: b is not None,
                            timeout=10, what="the router to answer")
    assert body is not None and body["version"] == "1.0.0"
    return obs


async def _exit_as(uid: int, argv: list[str], gid: int | None = None) -> int:
    """``argv``'s exit status run as ``uid`` (and ``gid`` with no other group, if given)."""
    group = {} if gid is None else {"group": gid, "extra_groups": []}
    proc = await asyncio.create_subprocess_exec(
        *argv, user=uid, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        **group)  # type: ignore[arg-type]
    return await asyncio.wait_for(proc.wait(), 10)


async def _get(port: int) -> dict[str, str] | None:
    """GET / through the router; None while nothing answers."""
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            raw = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    return json.loads(body) if head.startswith(b"HTTP/1.1 200") else None  # type: ignore[no-any-return]


def _router_pid(data_dir: Path) -> int:
    """The router serving this data dir's hello service (its argv names its socket)."""
    from agent.manager.routing import router_socket

    sock = str(router_socket(data_dir, "hello"))
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "agent.router" in cmd and sock in cmd:
            return p.pid
    raise AssertionError(f"no router runs on {sock}")


def _two_users(monkeypatch: pytest.MonkeyPatch) -> tuple[pwd.struct_passwd, pwd.struct_passwd,
                                                          str]:
    """The users nobody and daemon, and a Python both can run (``_python_for``)."""
    nobody, daemon = pwd.getpwnam("nobody"), pwd.getpwnam("daemon")
    python = _python_for(RunAs(nobody.pw_name, nobody.pw_uid, nobody.pw_gid, nobody.pw_dir),
                         monkeypatch)
    assert _python_for(RunAs(daemon.pw_name, daemon.pw_uid, daemon.pw_gid, daemon.pw_dir),
                       monkeypatch) == python
    return nobody, daemon, python


def _python_for(user: RunAs, monkeypatch: pytest.MonkeyPatch) -> str:
    """A Python that ``user`` can run, with this test run's packages on its path.

    The agent checks that its service user can run its interpreter (routers are Python). A
    virtualenv made from an interpreter under /root (pyenv) fails that check, as it should: then
    the same minor version from /usr/bin runs the agent, with the virtualenv's packages (the same
    ABI) and the checkout on PYTHONPATH.
    """
    if user.cannot_read(Path(sys.executable)) is None:
        return sys.executable
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    assert user.cannot_read(system) is None, (
        f"neither {sys.executable} nor {system} can be run by {user.name}: make a virtualenv "
        "from a system Python to run this test")
    paths = [str(REPO), *site.getsitepackages(), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    return str(system)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
async def test_exec_probes_run_as_the_service_user(open_base: Path) -> None:
    """An exec probe runs as the service user, with the user's HOME and none of the agent's env."""
    nobody = pwd.getpwnam("nobody")
    run_as = RunAs(nobody.pw_name, nobody.pw_uid, nobody.pw_gid, nobody.pw_dir)
    check = f'test "$(id -u)" = {nobody.pw_uid} && test "$HOME" = {nobody.pw_dir} && test -z "$X"'
    env = child_env(run_as, {})
    os.environ["X"] = "agent-only"
    try:
        as_user = await exec_probe(["sh", "-c", check], open_base, env, 5.0, run_as)
        as_agent = await exec_probe(["sh", "-c", check], open_base, env, 5.0)
    finally:
        del os.environ["X"]
    assert as_user.ok, as_user.reason
    assert not as_agent.ok  # the same check fails as the agent's own user: it is a real check
