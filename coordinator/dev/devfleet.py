"""A whole fleet on one machine: broker + coordinator + N agents, for ``fleetwave dev up``,
the demo and the integration tests.

Theory of operation: ``DevFleet`` is an async context manager. Entering starts the embedded broker
(``coordinator.dev.broker.Broker``, JetStream in ``<dir>/jetstream``) or, with ``brokers=3``, a
cluster of three (``coordinator.dev.cluster.BrokerCluster``, ``<dir>/jetstream-1..3``; the
coordinator and agents get every broker's URL and fail over between them), the coordinator as a
child process, and agents ``node-1..N`` as child processes bound to ``127.0.1.1..N`` (all of
127/8 is loopback on Linux, so each node gets its own address and the same service port on every
node does not collide), with data dirs ``<dir>/node-i`` and labels ``zone=a|b`` (alternating) and
``role=web``; then it waits until the coordinator answers and every agent is online. Leaving stops
the agents and the coordinator (SIGTERM, then SIGKILL after a timeout), then the broker; every
child is reaped, also when entering fails half-way or is cancelled.

Children run ``sys.executable -m ...`` so no PATH is needed, and in their own session so that a
Ctrl-C in the terminal reaches only ``dev up``, which then stops them in order (agents before the
broker they talk to). Each child's output goes to ``<dir>/logs/<name>.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import psutil

from coordinator.auth.enroll import CA, META, AuthDir
from coordinator.dev.broker import Broker
from coordinator.dev.cluster import BrokerCluster
from coordinator.errors import BrokerError, FleetwaveError, UsageError
from coordinator.runtime.keyfile import coordinator_seed
from protocol import creds as creds_file
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.errors import BusError
from protocol.loop import bounded
from protocol.messages import ApiReply, NodesRequest, NodeView
from protocol.signing import public_key

STOP_TIMEOUT = 10.0
READY_TIMEOUT = 30.0
OPERATOR = "admin"  # the operator whose credentials a --secure dev fleet's tools use
MAX_AGENTS = 254  # 127.0.1.1 .. 127.0.1.254
MAX_BROKERS = 5
AGENT_MODULE = "agent.main"  # the agent's entry point (see coordinator/dev/__init__.py)


class Child:
    """One child process: started, signalled, stopped (SIGTERM → SIGKILL) and always reaped."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def start(self) -> None:
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                start_new_session=True,
            )

    def signal(self, signum: int) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signum)

    async def kill(self) -> int | None:
        """SIGKILL, as a crash would, and reap."""
        return await self.stop(timeout=0.0)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit status."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.returncode is None and timeout > 0:
                self.signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await bounded(proc.wait(), timeout)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()  # reap, whatever happened above
        return proc.returncode

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def wait(self, timeout: float) -> int:
        """Wait for the child to exit by itself; TimeoutError after ``timeout``."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return await bounded(self._proc.wait(), timeout)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _names_path_under(text: str, root: str) -> bool:
    """Whether ``text`` names ``root`` or a path under it: ``/t/test_a1`` is not under
    ``/t/test_a`` (test runs side by side get such sibling directories)."""
    at = text.find(root)
    while at >= 0:
        end = at + len(root)
        if end == len(text) or text[end] == "/" or not (text[end].isalnum() or text[end] in "._-"):
            return True
        at = text.find(root, at + 1)
    return False


def _router_socket_dirs(directory: Path, depth: int = 4) -> set[str]:
    """Where the routers of the data dirs under ``directory`` (up to ``depth`` levels down) keep
    their control socket when ``<data dir>/run/`` makes too long a unix socket path: a directory
    in the temp dir named after a hash of the data dir, which is all a router's argv names
    (``--control``); its cwd is the agent's. Deep test directories (pytest-xdist's) get there."""
    # The documented entry point (coordinator/dev/__init__.py): the dev fleet runs this agent.
    from agent.manager.routing import router_socket
    from agent.router.control import MAX_SOCKET_PATH

    # Whether a router's socket falls back depends on its service's name as well; a name too
    # long for any path gives the data dir's temp dir, the same for every service.
    too_long = "s" * MAX_SOCKET_PATH
    found: set[str] = set()
    base = len(directory.parts)
    for current, dirs, _files in os.walk(directory):
        here = Path(current)
        if len(here.parts) - base >= depth:
            dirs.clear()
        found.add(str(router_socket(here, too_long).parent))
    return found


# What a fleet's own processes look like (``reap_leftovers(ours_only=True)``): one of its
# programs, or a child an agent started (a service, a hook, a probe: the agent sets these).
_OURS_ARGV = ("agent.main", "agent.router", "coordinator.daemon", "nats-server")
_OURS_ENV = ("FLEETWAVE_NODE", "FLEETWAVE_SLOT")


def _ours(proc: psutil.Process, argv: list[str]) -> bool:
    if any(part in arg for arg in argv for part in _OURS_ARGV):
        return True
    try:
        env = proc.environ()
    except psutil.Error:
        return False
    return all(name in env for name in _OURS_ENV)


REAP_ROUNDS = 3  # looks for leftovers, each after the last one's are gone (``reap_leftovers``)


def reap_leftovers(directory: Path, *, exclude: set[int | None], timeout: float = 5.0,
                   ours_only: bool = False) -> int:
    """Stop every process still working under ``directory``: services and routers.

    By design they outlive their agent (a restarted agent adopts them), so stopping the agents
    leaves them running; a throwaway dev fleet must not. A process belongs to the fleet when its
    working directory or one of its arguments lies under ``directory`` or is the control socket
    of a router of a data dir there; with ``ours_only`` (``fleetwave dev up``, whose ``--dir``
    may hold anything of its user's) only if it is also one of a fleet's programs or a child an
    agent started: a review's ``dev up`` that failed to start killed a ``sleep`` working in its
    directory. SIGTERM, then SIGKILL after ``timeout``; returns how many there were. Looked for
    again once they are gone, up to ``REAP_ROUNDS`` times: one may start another as it stops
    (an agent, given SIGTERM with its router, started a new router before it exited: a CI run
    found it serving the port after the reap).
    """
    roots = [str(directory), *_router_socket_dirs(directory)]
    me = psutil.Process()
    spared = {me.pid, *exclude, *(p.pid for p in me.parents())}  # never our own callers
    total = 0
    for _ in range(REAP_ROUNDS):
        found: list[psutil.Process] = []
        for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
            if proc.pid in spared:
                continue
            cwd = proc.info.get("cwd") or ""
            argv = proc.info.get("cmdline") or []
            if any(_names_path_under(text, root) for text in (cwd, *argv) for root in roots) \
                    and (not ours_only or _ours(proc, argv)):
                found.append(proc)
        if not found:
            break
        for proc in found:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(found, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=timeout)
        total += len(found)
    return total


def _agent_has_trust_key() -> bool:
    """Whether this tree's agent takes ``--trust-key`` (older agents verified nothing)."""
    # The documented entry point (coordinator/dev/__init__.py): the dev fleet runs this very agent.
    from agent.main import agent_command

    return any("--trust-key" in p.opts for p in agent_command.params)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class DevFleet:
    """Broker + coordinator + ``agents`` agents on this machine; an async context manager."""

    def __init__(
        self,
        directory: Path | str,
        *,
        agents: int = 3,
        port: int | None = None,
        fleet: str = "default",
        heartbeat_interval: float | None = None,
        ready_timeout: float = READY_TIMEOUT,
        subnet: str = "127.0.1",
        brokers: int = 1,
        secure: bool = False,
    ) -> None:
        if not 0 <= agents <= MAX_AGENTS:
            raise UsageError(f"--agents {agents} is out of range; use 0 to {MAX_AGENTS}")
        if not 1 <= brokers <= MAX_BROKERS:
            raise UsageError(f"--brokers {brokers} is out of range; use 1 (R1) to {MAX_BROKERS}")
        subjects.check_name("fleet", fleet)
        self.dir = Path(directory).absolute()
        # --secure: a trust root in DIR/auth (fleetwave auth), TLS, and each process its own
        # credentials: node-i its node's, the coordinator its own, this tool the operator's.
        self.auth_dir = self.dir / "auth" if secure else None
        self.fleet = fleet
        # Agents bind to <subnet>.1..N; tests that run side by side pick different subnets of
        # 127/8 so that the same service port on every node never collides between fleets.
        self.subnet = subnet
        self.heartbeat_interval = heartbeat_interval
        self.ready_timeout = ready_timeout
        self.cluster: BrokerCluster | None = None
        if brokers == 1:
            self.broker = Broker(port=port, store_dir=self.dir / "jetstream", auth=self.auth_dir)
            self.brokers = [self.broker]
        else:
            self.cluster = BrokerCluster(self.dir, brokers, first_port=port, auth=self.auth_dir)
            self.brokers = self.cluster.brokers
            self.broker = self.brokers[0]
        # The coordinator's signing key; created before the agents start so that they can be
        # told to trust it.
        self.key_file = self.dir / "coordinator.seed"
        self.public_key: str | None = None
        self.coordinator = Child(
            "coordinator",
            python_module("coordinator.daemon", "--nats", self.nats_url, "--fleet", fleet,
                          "coordinator", "--key-file", str(self.key_file),
                          *self._secure_args("coordinator", "coordinator")),
            self.dir / "logs" / "coordinator.log",
        )
        self.agents = [self._agent_child(i) for i in range(1, agents + 1)]
        self._bus: Bus | None = None
        self._url_in_argv = self.nats_url  # what the children's argv say (``_follow_brokers``)
        self._lock: int | None = None  # DIR/dev.lock while this fleet runs (``hold``)

    def _follow_brokers(self) -> None:
        """A broker that picked its own port picks another when the first is taken before it
        binds (``Broker.start``): the coordinator's and agents' ``--nats``, written when this
        fleet was made, follow it (they connected to the stale port and the fleet never came
        up, "no coordinator answers")."""
        url = self.nats_url
        if url == self._url_in_argv:
            return
        for child in (self.coordinator, *self.agents):
            child.argv = [url if a == self._url_in_argv else a for a in child.argv]
        self._url_in_argv = url

    def _secure_args(self, role: str, name: str) -> list[str]:
        if self.auth_dir is None:
            return []
        creds = AuthDir(self.auth_dir).creds_path(role, name)
        return ["--creds", str(creds), "--tls-ca", str(self.auth_dir / CA)]

    def client_args(self) -> list[str]:
        """The ``fleetwave`` CLI's global options that reach this fleet as its operator."""
        return ["--nats", self.nats_url, "--fleet", self.fleet,
                *self._secure_args("operator", OPERATOR)]

    def client_env(self) -> dict[str, str]:
        """FLEETWAVE_CREDS and FLEETWAVE_TLS_CA of this fleet's operator (none if not secure)."""
        if self.auth_dir is None:
            return {}
        return {"FLEETWAVE_CREDS": str(AuthDir(self.auth_dir).creds_path("operator", OPERATOR)),
                "FLEETWAVE_TLS_CA": str(self.auth_dir / CA)}

    def access(self) -> dict[str, Any]:
        """``Bus.connect``'s credentials and TLS arguments, as this fleet's operator."""
        if self.auth_dir is None:
            return {}
        return {"creds": creds_file.load(AuthDir(self.auth_dir).creds_path("operator", OPERATOR)),
                "tls_ca": str(self.auth_dir / CA)}

    @property
    def caller(self) -> str:
        """Who this tool names itself in API subjects: the operator whose credentials it uses
        on a secure fleet; "dev" on an open one (a claim, as every name there)."""
        return OPERATOR if self.auth_dir is not None else "dev"

    async def _enroll(self) -> None:
        """Make the trust root (first start) and every node's credentials that are missing."""
        if self.auth_dir is None:
            return
        d = AuthDir(self.auth_dir)
        if not (self.auth_dir / META).exists():
            await asyncio.to_thread(d.init, self.fleet, (), OPERATOR)
        _, _, users = d.load()
        have = {u.name for u in users if u.role == "node"}
        for i in range(1, len(self.agents) + 1):
            if f"node-{i}" not in have:
                await asyncio.to_thread(d.add, "node", f"node-{i}")

    @property
    def nats_url(self) -> str:
        """Every broker's URL, comma-separated (FLEETWAVE_NATS takes that)."""
        return ",".join(b.url for b in self.brokers)

    def agent(self, i: int) -> Child:
        """Agent ``node-i`` (1-based, as its id)."""
        if not 1 <= i <= len(self.agents):
            raise IndexError(f"no agent node-{i}: this fleet has node-1..node-{len(self.agents)}")
        return self.agents[i - 1]

    @staticmethod
    def labels(i: int) -> dict[str, str]:
        return {"zone": "a" if i % 2 else "b", "role": "web"}

    @staticmethod
    def bind_host(i: int, subnet: str = "127.0.1") -> str:
        return f"{subnet}.{i}"

    def host(self, i: int) -> str:
        """The address node-i binds to in this fleet."""
        return self.bind_host(i, self.subnet)

    def _agent_child(self, i: int) -> Child:
        node = f"node-{i}"
        args = [
            "--node-id", node, "--data-dir", str(self.dir / node), "--bind-host", self.host(i),
            "--nats", self.nats_url, "--fleet", self.fleet,
        ]
        for k, v in self.labels(i).items():
            args += ["--label", f"{k}={v}"]
        if self.heartbeat_interval is not None:
            args += ["--heartbeat-interval", str(self.heartbeat_interval)]
        args += self._secure_args("node", node)
        return Child(node, python_module(AGENT_MODULE, *args), self.dir / "logs" / f"{node}.log")

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> DevFleet:
        self.hold()
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    def hold(self) -> None:
        """Take ``DIR/dev.lock`` for as long as this fleet runs (``stop`` lets it go): a second
        fleet in the same directory is refused before it starts or stops anything. A review's
        second ``dev up`` in one directory failed to start and, stopping what it had started,
        reaped the first fleet's processes (they work under the same directory)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "dev.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another dev fleet runs in {self.dir}; stop it (Ctrl-C in its "
                             "terminal) or give this one another --dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start everything and wait until every agent shows online."""
        self.dir.mkdir(parents=True, exist_ok=True)
        await self._enroll()
        self.public_key = public_key(await asyncio.to_thread(coordinator_seed, self.key_file))
        if _agent_has_trust_key():
            for a in self.agents:
                if "--trust-key" not in a.argv:
                    a.argv += ["--trust-key", self.public_key]
        if self.cluster is not None:
            await self.cluster.start()
        else:
            await self.broker.start()
        self._follow_brokers()
        await self.coordinator.start()
        self._bus = await Bus.connect(self.nats_url, self.fleet, name="fleetwave-dev",
                                           **self.access())
        # Agents watch buckets the coordinator creates: start them once its API answers.
        await self.wait_online([])
        await asyncio.gather(*(a.start() for a in self.agents))
        await self.wait_online([f"node-{i}" for i in range(1, len(self.agents) + 1)])

    async def stop(self) -> None:
        """Stop agents and coordinator (SIGTERM, then SIGKILL), then the broker; reap all."""
        try:
            if self._bus is not None:
                await self._bus.close()
                self._bus = None
        finally:
            try:
                await asyncio.gather(
                    *(c.stop() for c in [*self.agents, self.coordinator]), return_exceptions=True
                )
                await asyncio.to_thread(reap_leftovers, self.dir,
                                        exclude={b.pid for b in self.brokers}, ours_only=True)
            finally:
                await asyncio.gather(*(b.stop() for b in self.brokers), return_exceptions=True)
                if self._lock is not None:
                    os.close(self._lock)  # (the lock goes with its descriptor)
                    self._lock = None

    # -- looking at it ----------------------------------------------------------------------------

    async def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]:
        """The coordinator's node table (BusError if it does not answer)."""
        if self._bus is None:
            self._bus = await Bus.connect(self.nats_url, self.fleet, name="fleetwave-dev",
                                           **self.access())
        raw = await self._bus.request(
            subjects.api(self.fleet, self.caller, "nodes"),
            encode(NodesRequest(selector=selector or {})),
            timeout=2.0,
        )
        reply = decode(ApiReply, raw)
        if not reply.ok:
            raise FleetwaveError(f"the coordinator refused 'nodes': {reply.error}")
        try:
            return msgspec.convert(reply.data, list[NodeView])
        except msgspec.ValidationError as exc:
            raise FleetwaveError(f"the coordinator sent an unexpected node list: {exc}") from None

    async def wait_online(
        self, ids: list[str], *, online: bool = True, timeout: float | None = None
    ) -> list[NodeView]:
        """Poll until every node in ``ids`` is online (or offline); BrokerError on timeout."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.ready_timeout)
        last = "the coordinator did not answer"
        while True:
            self._check_alive()
            try:
                rows = await self.nodes()
                state = {r.id: r.online for r in rows}
                if all(state.get(i) is online for i in ids):
                    return rows
                waiting = [i for i in ids if state.get(i) is not online]
                last = f"still {'offline' if online else 'online'}: {', '.join(waiting)}"
            except BusError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"dev fleet not ready after {self.ready_timeout:g}s ({last}); see the logs in "
                    f"{self.dir / 'logs'}"
                )
            await asyncio.sleep(0.1)

    def _check_alive(self) -> None:
        if self.coordinator.returncode is not None:
            raise BrokerError(
                f"the coordinator exited with status {self.coordinator.returncode}: "
                f"{self.coordinator.log_tail(1)}"
            )
