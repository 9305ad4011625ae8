"""Control API of the per-node router: the agent's side (client, spawner) and the wire messages.

Theory of operation: the router is its own process (so it outlives the agent) and listens on a unix
socket. The agent sends one JSON object per line and reads one JSON line back; every read on both
sides has a timeout. A ``configure`` is validated and applied atomically by the router: either the
whole new config is in force, or the old one stays and the answer says why.

Errors: ``RouterUnavailable`` is the one error type the agent sees; its message says why in one
line. ``RouterRunning`` (a subclass) is raised by ``start_router`` when a live router already owns
the socket: the caller should just use it (``.pid`` says which process).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import msgspec

from agent.edge import BODY_TIMEOUT, MAX_CONNECTIONS
from agent.errors import RouterRunning, RouterUnavailable
from agent.host.identity import RunAs, child_env, spawn_kwargs
from protocol.logs import last_line
from protocol.loop import bounded
from protocol.messages import CohortSpec, MirrorSpec, RouterStats

# sun_path is 108 bytes on Linux, 104 on macOS; stay under both.
MAX_SOCKET_PATH = 100
MAX_LINE = 1 << 20  # 1 MiB: a config is a few hundred bytes; anything larger is garbage
DEFAULT_TIMEOUT = 5.0
CONTROL_BACKLOG = 100  # pending control connections (asyncio's own default for a server)
# The router must import this package even if the agent runs from a checkout.
_ROOT = str(Path(__file__).resolve().parents[2])


class Upstream(msgspec.Struct, kw_only=True):
    """One slot's service process as the router sees it."""

    slot: str  # "a" | "b"
    host: str = "127.0.0.1"
    port: int
    weight: int  # share of live traffic; 0 = none
    healthy: bool  # the agent's probe verdict; False = send nothing


class RouterConfig(msgspec.Struct, kw_only=True):
    """Everything the router does for one service; replaced as a whole by ``configure``."""

    service: str
    listen_host: str
    listen_port: int
    upstreams: list[Upstream] = []
    mirror: MirrorSpec | None = None
    drain_timeout: float = 10.0
    # The public port's limits. Connections past max_connections get a 503 and are closed (the
    # router also keeps two descriptors per connection within its open-file limit).
    max_connections: int = MAX_CONNECTIONS
    body_timeout: float = BODY_TIMEOUT  # a request body must be whole this long after its head
    # Peers (addresses or networks, "10.0.0.0/8") whose X-Forwarded-For is kept and appended to;
    # from anyone else it is replaced by the peer's address.
    trusted_proxies: list[str] = []
    # Out of service for maintenance (``fleetwave drain``): the readiness path answers 503 at
    # once; ``drain_grace`` seconds later the router stops accepting and drains its connections.
    drained: bool = False
    drain_grace: float = 0.0
    # A canary by users, allow/deny or preview rules (``protocol.cohort``); None: by request.
    cohort: CohortSpec | None = None


# -- wire messages (one per line) -----------------------------------------------------------------


class Ping(msgspec.Struct, tag="ping", kw_only=True):
    pass


class Configure(msgspec.Struct, tag="configure", kw_only=True):
    config: RouterConfig


class GetStats(msgspec.Struct, tag="stats", kw_only=True):
    pass


class Shutdown(msgspec.Struct, tag="shutdown", kw_only=True):
    pass


Request = Ping | Configure | GetStats | Shutdown


class Reply(msgspec.Struct, kw_only=True):
    """The router's answer: ``ok`` with ``pid`` and/or ``stats``, or an ``error`` line."""

    ok: bool
    error: str = ""
    pid: int = 0
    stats: RouterStats | None = None


REQUEST_DECODER: msgspec.json.Decoder[Request] = msgspec.json.Decoder(Request)
REPLY_DECODER: msgspec.json.Decoder[Reply] = msgspec.json.Decoder(Reply)
ENCODER = msgspec.json.Encoder()


def check_socket_path(socket_path: Path) -> None:
    """Refuse a control socket path the kernel cannot bind, with the reason."""
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise RouterUnavailable(
            f"router control socket path {socket_path} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter data directory"
        )


class RouterClient:
    """The agent's handle on one router: a short-lived unix connection per call."""

    def __init__(self, socket_path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    async def ping(self) -> int:
        """Return the router's pid; raises RouterUnavailable if nothing answers, or if the pid
        it names is not a router on this socket (``router_pid``)."""
        return router_pid((await self._call(Ping())).pid, self.socket_path)

    async def configure(self, cfg: RouterConfig) -> RouterStats:
        """Apply ``cfg`` atomically; returns the stats as applied or raises with the reason."""
        reply = await self._call(Configure(config=cfg))
        assert reply.stats is not None  # the router always answers a configure with stats
        return reply.stats

    async def stats(self) -> RouterStats:
        """Cumulative counters since ``epoch``, with the weights as applied, pid and port."""
        reply = await self._call(GetStats())
        assert reply.stats is not None
        return reply.stats

    async def shutdown(self) -> None:
        """Ask the router to drain in-flight requests and exit (it answers before draining)."""
        await self._call(Shutdown())

    async def _call(self, request: Request) -> Reply:
        what = f"router at {self.socket_path}"
        check_socket_path(self.socket_path)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(
                    self.socket_path, limit=MAX_LINE
                )
                writer.write(ENCODER.encode(request) + b"\n")
                await writer.drain()
                line = await reader.readline()
        except TimeoutError:
            raise RouterUnavailable(
                f"{what} did not answer within {self.timeout:g}s; check its log"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise RouterUnavailable(f"{what} is not running (no listener on the socket)") from None
        except (OSError, ValueError) as exc:
            raise RouterUnavailable(f"{what} failed: {exc}; check its log") from None
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await bounded(writer.wait_closed(), 1.0)
        if not line.endswith(b"\n"):
            raise RouterUnavailable(f"{what} closed the connection without answering")
        try:
            reply = REPLY_DECODER.decode(line)
        except msgspec.DecodeError as exc:
            raise RouterUnavailable(f"{what} answered garbage: {exc}") from None
        if not reply.ok:
            raise RouterUnavailable(f"{what} refused: {reply.error}")
        return reply


def router_pid(pid: int, socket_path: Path) -> int:
    """``pid`` if it is a process running ``agent.router --control socket_path``; else raise
    RouterUnavailable. The agent later signals the pid its router names (a router that does not
    exit after its drain is killed), as root under the systemd drop-in, with ``CAP_KILL``: a
    listener on the socket that is not our router (one planted by the services' user in a
    directory an older agent gave it, or a router of that user's under its control) must not
    make it kill another process. Whoever runs a router on that socket can only name itself."""
    import psutil  # the agent's side alone: the router process never needs it (its memory)

    want = os.path.realpath(socket_path)
    try:
        argv = psutil.Process(pid).cmdline() if pid > 0 else []
    except psutil.Error:
        argv = []
    control = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--control"]
    if "agent.router" in argv and any(os.path.realpath(c) == want for c in control):
        return pid
    raise RouterUnavailable(
        f"the listener on {socket_path} names pid {pid}, which is not a router on that socket; "
        "stop whatever listens there (ss -xlp) and remove the socket"
    )


def _own_directory(path: Path, *, take: bool = True) -> None:
    """Make ``path`` a directory of the agent's alone (0700): also one an older agent handed to
    the services' user for its routers to make their sockets in, unless ``take`` is False (then
    such a directory is left as it is)."""
    try:
        with contextlib.suppress(FileExistsError):  # not a directory: said below
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Changed through a descriptor of the directory itself, never by its name: a name
        # swapped for a symlink meanwhile (by a router's user, in the temp dir) changes nothing.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise RouterUnavailable(f"{path} is not a directory; remove it") from None
            raise
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                if not take:
                    return
                os.fchown(fd, os.geteuid(), os.getegid())
            if st.st_mode & 0o7777 != 0o700:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    except OSError as exc:
        raise RouterUnavailable(f"cannot make {path} the agent's alone: {exc.strerror}") from None


def _others_listen_in(path: Path) -> bool:
    """Whether a socket of another user is in ``path``: an older agent's router, running as
    the services' user. Its directory is left to it while it runs (it removes its socket from
    there when it stops, before it drains: taken, the removal fails and the drain is skipped)."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISSOCK(st.st_mode) and st.st_uid != os.geteuid():
                    return True
        return False
    except OSError:
        return False


def _listen_in_own(socket_path: Path) -> socket.socket:
    """``_listen`` in a directory of the agent's (``_own_directory``). One an older agent gave
    the services' user is taken only once no router of that user is left in it, or when the
    agent cannot make its socket there otherwise (the systemd drop-in's, without
    ``CAP_DAC_OVERRIDE``)."""
    parent = socket_path.parent
    _own_directory(parent, take=not _others_listen_in(parent))
    try:
        return _listen(socket_path)
    except PermissionError:
        _own_directory(parent)
        return _listen(socket_path)


def _take_socket(socket_path: Path) -> None:
    """A socket an older agent's router made as another user (0600), which this agent may not
    write (it lacks ``CAP_DAC_OVERRIDE``: the systemd drop-in's): the agent's own now, so that
    it can reach that router to adopt it rather than be refused it for ever. Nothing else is
    touched: not a socket, or already the agent's, or gone."""
    with contextlib.suppress(OSError):
        st = socket_path.lstat()
        if stat.S_ISSOCK(st.st_mode) and st.st_uid != os.geteuid():
            os.chown(socket_path, os.geteuid(), os.getegid(), follow_symlinks=False)


def _listen(socket_path: Path) -> socket.socket:
    """The router's control socket, bound and listening, 0600 (in a 0700 directory: no one
    else can reach it in between)."""
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        control.bind(str(socket_path))
        socket_path.chmod(0o600)
        control.listen(CONTROL_BACKLOG)
    except OSError:
        control.close()
        socket_path.unlink(missing_ok=True)
        raise
    return control


async def start_router(
    socket_path: Path,
    log_path: Path,
    *,
    python: str = sys.executable,
    timeout: float = 5.0,
    run_as: RunAs | None = None,
) -> int:
    """Spawn ``python -m agent.router --control SOCK`` detached and return its pid once it answers.

    The router double-forks (the launcher we wait for exits at once), runs in its own session with
    stdin on /dev/null and output appended to ``log_path``, so it depends on nothing of ours and we
    leave no zombie. If a live router already answers on ``socket_path`` this raises RouterRunning
    (carrying its pid) and starts nothing; a stale socket file (nothing listens on it) is removed,
    and a router that listens but does not answer in time raises RouterUnavailable (its socket
    stays). It faces the internet, so it inherits none of the agent's environment
    (``agent.host.identity``) and runs as ``run_as`` when given.

    The control socket is made here, by the agent, and the router inherits it listening
    (``--control-fd``): the socket and its directory are the agent's (0600 in 0700), so neither
    the services' user nor the routers' own can reach it by path, and an agent held to the
    capabilities of its systemd drop-in (no ``CAP_DAC_OVERRIDE``) can always connect to it. A
    socket the router made itself, as another user, refused that agent (``EACCES``: every
    service of a host with ``--service-user`` and the drop-in was left unrouted).
    """
    socket_path = Path(socket_path)
    check_socket_path(socket_path)
    client = RouterClient(socket_path, timeout=min(timeout, 2.0))
    if socket_path.exists():
        if not os.access(socket_path, os.W_OK):  # (for root: without CAP_DAC_OVERRIDE)
            _take_socket(socket_path)
        try:
            pid = await client.ping()
        except RouterUnavailable as exc:
            await remove_stale_socket(socket_path, exc, client.timeout)
        else:
            raise RouterRunning(
                f"a router (pid {pid}) already runs on {socket_path}; use it", pid
            )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        control = _listen_in_own(socket_path)
    except OSError as exc:
        raise RouterUnavailable(f"cannot listen on {socket_path}: {exc.strerror}") from None
    argv = [python, "-m", "agent.router", "--control", str(socket_path), "--control-fd",
            str(control.fileno()), "--detach"]
    path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = child_env(run_as, {"PYTHONPATH": path})
    deadline = asyncio.get_running_loop().time() + timeout
    with control, log_path.open("ab") as log:  # the router keeps its own copy of the socket
        try:
            launcher = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                pass_fds=(control.fileno(),),
                env=env,
                **spawn_kwargs(run_as),
            )
        except OSError as exc:
            socket_path.unlink(missing_ok=True)
            raise RouterUnavailable(f"cannot start the router with {python}: {exc}") from None
        try:
            code = await bounded(launcher.wait(), timeout)
        except TimeoutError:
            launcher.kill()
            await launcher.wait()
            raise RouterUnavailable(
                f"the router launcher did not detach within {timeout:g}s; see {log_path}"
            ) from None
    if code != 0:
        raise RouterUnavailable(
            f"the router failed to start (exit {code}): {_log_tail(log_path)}; see {log_path}"
        )
    last = "no answer"
    while True:
        try:
            return await client.ping()
        except RouterUnavailable as exc:
            last = str(exc)
        if asyncio.get_running_loop().time() >= deadline:
            raise RouterUnavailable(
                f"the router did not answer within {timeout:g}s ({last}): {_log_tail(log_path)}"
            )
        await asyncio.sleep(0.02)  # polling the socket for readiness, bounded by the deadline


async def remove_stale_socket(
    socket_path: Path, failure: RouterUnavailable, timeout: float
) -> None:
    """Remove a control socket whose ping failed with ``failure`` if nothing listens on it (its
    router is gone); else raise ``failure``: a router that is slow to answer is alive, and
    removing its socket would leave it running beyond reach while a second one cannot bind."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_unix_connection(socket_path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Stale: its router is gone. (A local metadata call on a socket file: instant.)
        socket_path.unlink(missing_ok=True)  # noqa: ASYNC240
        return
    except (OSError, TimeoutError):
        raise failure from None  # (a listener whose queue is full is alive too)
    writer.close()
    with contextlib.suppress(OSError):
        await bounded(writer.wait_closed(), 1.0)
    raise failure


def _log_tail(log_path: Path) -> str:
    """The last non-empty line of the router log, for error messages."""
    return last_line(log_path, missing="no log", empty="empty log")


def encode_reply(reply: Reply) -> bytes:
    """One reply line."""
    return ENCODER.encode(reply) + b"\n"

