"""Clustering brokers: the words of ``fleetwave broker --name --cluster-listen --routes``, the
watch on a broker's routes, and ``BrokerCluster``, N brokers on loopback for dev fleets and tests.

Vocabulary (nats-server's own):
- **name**: the server's ``server_name``; unique within the cluster (JetStream needs it).
- **cluster listen**: ``HOST:PORT`` where this server takes connections from the other servers.
- **routes**: the other servers' cluster addresses, ``nats-route://HOST:PORT``; a route to this
  server itself may be listed (one list for every server), and is ignored.

Theory of operation: flags are parsed and checked here before anything is written or started, so
a malformed ``--routes`` is one line and exit 2 with nothing created. A member started before the
others is normal: nats-server keeps dialing its routes. ``watch_routes`` reads the server's own
``/routez`` (who is connected, by server name) and, when some configured route has not joined
after a grace period, says **once** which route it cannot reach and why (a TCP dial of our own:
refused, timed out, unknown host), and that the server keeps retrying; it speaks again only when
the state changes (every route up, or one lost again).

``BrokerCluster`` starts N ``Broker``s named ``fleetwave-1..N`` routed to each other on
127.0.0.1, waits until JetStream has a meta leader and every server is current (``/healthz``),
and answers the questions chaos tests ask: who leads the meta group, who leads a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from coordinator.errors import BrokerError, UsageError
from protocol.logs import last_line
from protocol.loop import bounded

if TYPE_CHECKING:  # broker.py imports this module for ClusterSpec
    from coordinator.dev.broker import Broker

CLUSTER_NAME = "fleetwave"
ROUTE_GRACE = 5.0  # seconds a route may take to join before we say it is missing
ROUTE_POLL = 1.0
DIAL_TIMEOUT = 1.0
FORM_TIMEOUT = 30.0
ROUTE_SCHEMES = ("nats-route", "nats")
NOT_JOINED = "it answers but has not joined: another cluster name, TLS or route auth?"


@dataclass(frozen=True)
class ClusterSpec:
    """How one broker joins a cluster (``--name``, ``--cluster-listen``, ``--routes``)."""

    name: str
    listen_host: str
    listen_port: int
    routes: tuple[str, ...]  # nats-route://HOST:PORT, normalised
    cluster_name: str = CLUSTER_NAME

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"


def parse_hostport(value: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); UsageError naming ``what`` otherwise."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{what} {value!r} is not HOST:PORT (e.g. 0.0.0.0:6222)")
    return host, int(port)


def parse_routes(value: str) -> tuple[str, ...]:
    """``--routes`` as nats-route URLs: comma-separated ``nats-route://HOST:PORT`` (or
    ``nats://``, or a bare ``HOST:PORT``); UsageError naming the bad one otherwise."""
    routes: list[str] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        url = part if "://" in part else f"nats-route://{part}"
        u = urlsplit(url)
        try:
            port = u.port
        except ValueError:
            port = None
        if u.scheme not in ROUTE_SCHEMES or not u.hostname or port is None or u.path not in (
                "", "/"):
            raise UsageError(
                f"--routes: {part!r} is not a route; write nats-route://HOST:PORT, "
                "comma-separated (e.g. nats-route://nats-1:6222,nats-route://nats-2:6222)")
        routes.append(f"nats-route://{u.netloc}")
    if not routes:
        raise UsageError("--routes is empty; list the other brokers' nats-route://HOST:PORT")
    return tuple(dict.fromkeys(routes))


# What nats-server takes as a server name and our config can quote: no spaces (the server
# refuses them, after the config is written), no quotes.
_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_server_name(name: str) -> str:
    """``name`` if it can name a nats-server; UsageError (before anything is written) if not."""
    if not _SERVER_NAME.match(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise UsageError(f"--name {shown!r} cannot name a server: use 1-64 letters, digits, "
                         "'.', '_' or '-' (starting with a letter or digit), e.g. fleetwave-1")
    return name


def cluster_spec(name: str | None, listen: str | None, routes: str | None) -> ClusterSpec | None:
    """The broker's cluster settings from its flags (None: a single server); UsageError when
    they do not fit together, before anything is created."""
    if name is not None:
        check_server_name(name)
    if listen is None and routes is None:
        return None  # a single server (a --name alone just names it)
    if listen is None:
        raise UsageError("--routes needs --cluster-listen HOST:PORT (where this broker takes "
                         "the other brokers' connections)")
    if not name:
        raise UsageError("a clustered broker needs --name (unique in the cluster, e.g. "
                         "fleetwave-1): JetStream tells its servers apart by name")
    host, port = parse_hostport(listen, what="--cluster-listen")
    return ClusterSpec(name=name, listen_host=host, listen_port=port,
                       routes=parse_routes(routes) if routes else ())


def broker_flags(spec: ClusterSpec) -> list[str]:
    """``spec`` as the flags of ``fleetwave broker`` (``cluster_spec`` reads them back)."""
    return ["--name", spec.name, "--cluster-listen", spec.listen,
            "--routes", ",".join(spec.routes)]


def render_cluster(spec: ClusterSpec, auth: Path | None = None) -> str:
    """The ``cluster {}`` block of the config (see deploy/nats/cluster-1.conf); with an auth
    directory, routes over mutual TLS with the fleet's route user (``enroll.cluster_block``)."""
    # Here, not at the top: auth.routes brings cryptography's x509 (~50 ms), which every command
    # that only parses HOST:PORT (``fleetwave nodes``, the coordinator's config) would pay.
    from coordinator.auth.routes import cluster_block, secure_route

    routes = "\n".join(f'    "{secure_route(r, auth) if auth is not None else r}"'
                       for r in spec.routes)
    secured = cluster_block(auth) if auth is not None else ""
    return f"""cluster {{
  name: "{spec.cluster_name}"
  listen: "{spec.listen}"
{secured}  routes: [
{routes}
  ]
}}
"""


# -- a broker's routes -----------------------------------------------------------------------------


def _is_local(addr: str) -> bool:
    """Whether ``addr`` is an address of this host (we can bind it)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
    return True


def is_self_route(route: str, spec: ClusterSpec) -> bool:
    """A route to this very server (listed so that every server has the same list)."""
    u = urlsplit(route)
    if u.port != spec.listen_port or not u.hostname:
        return False
    try:
        addrs = {str(a[4][0])
                 for a in socket.getaddrinfo(u.hostname, u.port, type=socket.SOCK_STREAM)}
    except OSError:
        return False
    wildcard = spec.listen_host in ("0.0.0.0", "::", "")
    return any((wildcard and _is_local(a)) or a == spec.listen_host for a in addrs)


async def dial(route: str, timeout: float = DIAL_TIMEOUT) -> str | None:
    """None if a TCP connection to the route's address opens, else why not (a few words)."""
    u = urlsplit(route)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(u.hostname, u.port)
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except socket.gaierror:
        return f"unknown host {u.hostname}"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


def monitor_get(port: int, path: str, timeout: float = 2.0) -> Any:
    """GET a nats-server monitoring endpoint on loopback as JSON (OSError/ValueError if not)."""
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


async def other_routes(spec: ClusterSpec) -> list[str]:
    """The configured routes but the one to this server itself (name lookups bounded: a route
    whose host does not resolve in time counts as another server's)."""
    others = []
    for route in spec.routes:
        try:
            mine = await bounded(asyncio.to_thread(is_self_route, route, spec),
                                 DIAL_TIMEOUT * 2)
        except TimeoutError:
            mine = False
        if not mine:
            others.append(route)
    return others


async def route_problems(others: Sequence[str], monitor_port: int) -> list[str]:
    """What is wrong with this server's routes to ``others`` now: per route that has not joined,
    ``"ROUTE (why)"``; [] when as many servers are connected as there are ``others``."""
    try:
        routez = await asyncio.to_thread(monitor_get, monitor_port, "/routez")
    except (OSError, ValueError) as exc:
        return [f"its own monitoring endpoint ({exc})"]
    connected = {r.get("remote_name") for r in routez.get("routes") or []} - {None}
    if len(connected) >= len(others):
        return []
    problems = []
    for route in others:
        why = await dial(route) or NOT_JOINED
        problems.append(f"{route} ({why})")
    return problems


async def watch_routes(spec: ClusterSpec, monitor_port: int, say: Callable[[str], None],
                       stop: asyncio.Event, *, grace: float = ROUTE_GRACE,
                       interval: float = ROUTE_POLL) -> None:
    """Say once when routes are missing after ``grace`` and once when they are all up again;
    nothing in between (nats-server itself keeps retrying)."""
    started = time.monotonic()
    others = await other_routes(spec)
    if not others:
        return  # a seed: the others route to it, and nats-server logs their arrival
    reported: bool | None = None  # None: nothing said yet; True: said "missing"
    while not stop.is_set():
        problems = await route_problems(others, monitor_port)
        if problems and reported is not True and time.monotonic() - started >= grace:
            what = "route" if len(problems) == 1 else "routes"
            say(f"broker {spec.name}: cannot reach {what} {', '.join(problems)}; still retrying "
                "— start the broker(s) there or fix --routes (a broker started before the "
                "others waits for them: JetStream answers once most of the cluster is up)")
            reported = True
        elif not problems and reported is not False:
            say(f"broker {spec.name}: routes up, in cluster {spec.cluster_name!r} with "
                f"{len(others)} other server(s)")
            reported = False
        with contextlib.suppress(TimeoutError):
            await bounded(stop.wait(), interval)


# -- N brokers on loopback -------------------------------------------------------------------------


class BrokerCluster:
    """``size`` brokers ``fleetwave-1..size`` on 127.0.0.1, routed to each other; JetStream in
    ``<directory>/jetstream-<i>``. An async context manager; leaving stops every broker."""

    def __init__(self, directory: Path | str, size: int = 3, *, first_port: int | None = None,
                 auth: Path | None = None, max_payload: str = "8MB") -> None:
        from coordinator.dev.broker import Broker

        if size < 2:  # a lone clustered server waits for peers for ever: run a plain Broker
            raise UsageError(f"--brokers {size}: a cluster needs at least 2 brokers (3 for R3)")
        self.dir = Path(directory).absolute()
        self.brokers: list[Broker] = [
            Broker(
                port=first_port + i if first_port is not None else None,
                store_dir=self.dir / f"jetstream-{i + 1}", server_name=f"fleetwave-{i + 1}",
                auth=auth, max_payload=max_payload, cluster=spec,
            )
            for i, spec in enumerate(_cluster_specs(size))
        ]

    @property
    def url(self) -> str:
        """Every broker's client URL, comma-separated (what FLEETWAVE_NATS takes)."""
        return ",".join(b.url for b in self.brokers)

    def by_name(self, name: str) -> Broker:
        for b in self.brokers:
            if b.server_name == name:
                return b
        raise KeyError(f"no broker named {name!r} in this cluster")

    async def __aenter__(self) -> BrokerCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, timeout: float = FORM_TIMEOUT) -> None:
        """Start every broker (together: each waits for the others) and wait until formed.

        The cluster ports were free when picked; one taken before its broker bound it (by
        any process: outgoing connections draw from the same range) means new ports for all
        of them (each broker's routes name the others'), up to PORT_ATTEMPTS times."""
        from coordinator.dev.broker import PORT_ATTEMPTS, ClusterPortTaken

        for attempt in range(PORT_ATTEMPTS):
            started = await asyncio.gather(*(b.start() for b in self.brokers),
                                           return_exceptions=True)
            failed = [e for e in started if isinstance(e, BaseException)]
            if not failed:
                break
            other = [e for e in failed if not isinstance(e, ClusterPortTaken)]
            if other or attempt == PORT_ATTEMPTS - 1:
                raise (other or failed)[0]
            await self.stop()
            for b, spec in zip(self.brokers, _cluster_specs(len(self.brokers)), strict=True):
                b.cluster = spec
        await self.wait_formed(timeout)

    async def stop(self) -> None:
        await asyncio.gather(*(b.stop() for b in self.brokers), return_exceptions=True)

    async def wait_formed(self, timeout: float = FORM_TIMEOUT,
                          among: Sequence[Broker] | None = None) -> None:
        """Until every running broker (or those in ``among``) reports JetStream healthy (a meta
        leader known, every stream current: ``/healthz``) and the meta leader sees each of them
        current (before that, JetStream places no replica on it: "peer offline");
        BrokerError after ``timeout``, or at once when one of them exited by itself (it would
        not come back: waiting for it, the health asked on its monitor port was whoever took
        the port since)."""
        deadline = time.monotonic() + timeout
        last = "not asked yet"
        while True:
            running = [b for b in (among or self.brokers) if b.pid is not None]
            if gone := [b for b in running if b.exited is not None]:
                raise BrokerError("; ".join(
                    f"{b.server_name}'s nats-server exited (status {b.exited}): "
                    f"{last_line(b.log_path, missing='no log', empty='no output')}"
                    for b in gone))
            states = await asyncio.gather(*(asyncio.to_thread(_health, b.monitor_port)
                                            for b in running))
            bad = [f"{b.server_name}: {s}" for b, s in zip(running, states, strict=True) if s]
            if not bad:
                bad = await self._not_current(running)
            if not bad:
                return
            last = "; ".join(bad)
            if time.monotonic() > deadline:
                raise BrokerError(f"the broker cluster did not form within {timeout:g}s ({last})")
            await asyncio.sleep(0.1)

    async def _not_current(self, running: Sequence[Broker]) -> list[str]:
        """The running brokers the meta leader does not see as current peers yet."""
        try:
            leader = self.by_name(await self.meta_leader())
            meta = (await self.jsz(leader)).get("meta_cluster", {})
        except (KeyError, OSError, ValueError) as exc:
            return [f"no meta leader to ask ({exc})"]
        return not_current_peers(meta, [b.server_name for b in running if b is not leader])

    async def jsz(self, broker: Broker | None = None) -> dict[str, Any]:
        """``/jsz`` of ``broker`` (default: the first running one)."""
        b = broker or next(b for b in self.brokers if b.pid is not None)
        doc: dict[str, Any] = await asyncio.to_thread(monitor_get, b.monitor_port, "/jsz")
        return doc

    async def serving(self, client: str) -> Broker | None:
        """The running broker a client named ``client`` is connected to (``/connz``), if any."""
        for b in self.brokers:
            if b.pid is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                conns = await asyncio.to_thread(monitor_get, b.monitor_port, "/connz?limit=4096")
                if any(c.get("name") == client for c in conns.get("connections") or []):
                    return b
        return None

    async def meta_leader(self) -> str:
        """The name of the server that leads JetStream's meta group now ("" if none)."""
        for b in self.brokers:
            if b.pid is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                leader = (await self.jsz(b)).get("meta_cluster", {}).get("leader", "")
                if leader:
                    return str(leader)
        return ""


def _cluster_specs(size: int) -> list[ClusterSpec]:
    """``size`` members ``fleetwave-1..size`` on loopback, each on a cluster port free now,
    routed to all of them."""
    from coordinator.dev.broker import free_port

    ports = [free_port() for _ in range(size)]
    routes = tuple(f"nats-route://127.0.0.1:{p}" for p in ports)
    return [ClusterSpec(name=f"fleetwave-{i + 1}", listen_host="127.0.0.1", listen_port=port,
                        routes=routes) for i, port in enumerate(ports)]


def not_current_peers(meta: dict[str, Any], names: Sequence[str]) -> list[str]:
    """Of the servers ``names`` (the meta leader not among them), those the meta leader's
    ``/jsz`` ``meta_cluster`` does not show as current peers, each with why."""
    peers = {r.get("name"): r for r in meta.get("replicas") or []}
    return [f"{n}: not a current peer of the meta group yet" for n in names
            if n not in peers or peers[n].get("offline") or not peers[n].get("current")]


def _health(port: int) -> str:
    """"" when the server at monitor ``port`` says JetStream is healthy, else what it says."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                    timeout=2.0) as resp:
            return "" if resp.status == 200 else f"status {resp.status}"
    except urllib.error.HTTPError as exc:
        try:
            return str(json.loads(exc.read()).get("error", exc.code))
        except ValueError:
            return f"status {exc.code}"
    except (OSError, ValueError) as exc:
        return str(exc)
