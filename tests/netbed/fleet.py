"""A fleet on a ``NetBed``: the broker, coordinators and agents each in a host of their own.

Theory of operation: ``NetFleet(bed, directory, agents=N, coordinators=K)`` is an async context
manager over a bed built with ``NetFleet.hosts(N, K)``: host ``bus`` runs ``fleetwave broker`` on
its bed address, hosts ``coord-1..K`` run ``fleetwave coordinator`` (one shared signing key, as
replicas of one fleet have), hosts ``node-1..N`` run ``fleetwave-agent --node-id node-i`` bound to
their bed address (so each node's router serves ``<addr>:8080`` on the bed's network), and host
``load`` is where the test's traffic and samplers come from. Every process is a
``coordinator.dev.devfleet.Child`` (SIGTERM → SIGKILL, always reaped) whose argv is wrapped in
``ip netns exec``, so ``fleet.coordinator.signal(SIGSTOP)`` freezes that very process.

With ``brokers=3`` (a bed of ``NetFleet.hosts(N, K, brokers=3)``) hosts ``bus-1..3`` replace
``bus``: each runs one member of a JetStream cluster, ``fleetwave broker --name fleetwave-i
--cluster-listen <addr>:6222 --routes <all three>`` (``coordinator.dev.cluster``'s words), and
every client is given all three URLs.

The test reaches the bus through a ``Portal`` (``fleet.nats_url``, a root-namespace URL made from
inside host ``bus``, immune to the scenario's faults; a cluster has one portal per broker host,
all in ``nats_url``) and the nodes through ``fleet.connect`` (a socket made in host ``load``,
crossing the bridge like any client). Agents and coordinators use ``fleet.bus_url``, the
brokers' bed addresses: their traffic is what partitions and impairments hit.

Faults for a scenario: ``bed.partition("coord-1", BUS)`` cuts a coordinator from the bus (and
``bed.heal``), ``fleet.process("coord-1").signal(SIGSTOP)`` / ``SIGCONT`` freezes and thaws it,
``await fleet.process("coord-1").kill()`` is a crash (reaped), ``.start()`` starts it again;
``bed.impair(host, delay=, loss=, peer=)`` makes a link slow and lossy. A cluster's brokers are
looked at through their monitoring endpoint (``fleet.monitor("bus-2", "/jsz")``, reached from
inside the host: it listens on that host's 127.0.0.1), e.g. ``fleet.meta_leader()``; a broker
host is crashed with ``fleet.crash_broker("bus-2")`` (SIGKILL to every process in it: the
``fleetwave broker`` wrapper and its nats-server; its portal closes, so it stays dead for the
rest of the test).

Leaving stops agents, coordinators and the broker, then every service and router the agents left
(``reap_leftovers``); the bed's own teardown (the ``netbed`` fixture) kills whatever is still in a
host and removes the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

from coordinator.dev.cluster import (
    CLUSTER_NAME,
    ClusterSpec,
    broker_flags,
    not_current_peers,
)
from coordinator.dev.devfleet import Child, DevFleet, python_module, reap_leftovers
from coordinator.dev.traffic import Connector, Traffic, probe_version
from coordinator.runtime.keyfile import coordinator_seed
from protocol.signing import public_key
from tests.integration.procs import nodes_json, online, spawn_agent, wait_until
from tests.netbed.bed import NetBed
from tests.netbed.portal import Portal

BUS = "bus"
LOAD = "load"
NATS_PORT = 4222
CLUSTER_PORT = 6222
SERVICE_PORT = 8080
READY_TIMEOUT = 40.0
CLI = "from coordinator.console import run; run()"


class NetFleet:
    """Broker, ``coordinators`` coordinators and ``agents`` agents on ``bed``; async with."""

    @staticmethod
    def hosts(agents: int, coordinators: int = 1, brokers: int = 1) -> list[str]:
        """The hosts a bed needs for such a fleet: bus (or bus-1..N), coord-*, node-*, load."""
        return [*NetFleet.bus_hosts(brokers), *(f"coord-{i}" for i in range(1, coordinators + 1)),
                *(f"node-{i}" for i in range(1, agents + 1)), LOAD]

    @staticmethod
    def bus_hosts(brokers: int) -> list[str]:
        """``bus`` for one broker, ``bus-1..N`` for a cluster of N."""
        if brokers < 1 or brokers == 2:
            raise ValueError(f"brokers={brokers}: 1, or 3 and more (JetStream's quorum)")
        return [BUS] if brokers == 1 else [f"{BUS}-{i}" for i in range(1, brokers + 1)]

    def __init__(
        self,
        bed: NetBed,
        directory: Path,
        *,
        agents: int = 3,
        coordinators: int = 1,
        brokers: int = 1,
        fleet: str = "default",
        heartbeat_interval: float = 0.5,
    ) -> None:
        missing = set(self.hosts(agents, coordinators, brokers)) - set(bed.hosts)
        if missing:
            raise ValueError(f"the bed lacks hosts {sorted(missing)}; build it with "
                             f"NetFleet.hosts({agents}, {coordinators}, {brokers})")
        self.bed = bed
        self.dir = directory.absolute()
        self.fleet = fleet
        self.key_file = self.dir / "coordinator.seed"
        self.buses = self.bus_hosts(brokers)
        self.bus_url = ",".join(f"nats://{bed.addr(h)}:{NATS_PORT}" for h in self.buses)
        self.portals = [Portal(bed, h, bed.addr(h), NATS_PORT) for h in self.buses]
        self.portal = self.portals[0]
        self.connect: Connector = bed.connector(LOAD)
        routes = tuple(f"nats-route://{bed.addr(h)}:{CLUSTER_PORT}" for h in self.buses)
        self.specs = {h: ClusterSpec(name=self.server_name(h), listen_host=bed.addr(h),
                                     listen_port=CLUSTER_PORT, routes=routes,
                                     cluster_name=CLUSTER_NAME)
                      for h in self.buses if brokers > 1}
        self.brokers = [
            self._child(h, "broker" if h == BUS else h, [
                sys.executable, "-c", CLI, "broker", "--host", bed.addr(h), "--port",
                str(NATS_PORT), "--store-dir", str(self.store_dir(h)),
                *(broker_flags(self.specs[h]) if h in self.specs else [])])
            for h in self.buses]
        self.broker = self.brokers[0]
        self.coordinators = [
            self._child(f"coord-{i}", f"coord-{i}", python_module(
                "coordinator.daemon", "--nats", self.bus_url, "--fleet", fleet, "coordinator",
                "--key-file", str(self.key_file)))
            for i in range(1, coordinators + 1)]
        self.nodes = [f"node-{i}" for i in range(1, agents + 1)]
        self.agents: list[Child] = []
        self.heartbeat_interval = heartbeat_interval

    @staticmethod
    def server_name(host: str) -> str:
        """The broker's server name (``bus-2`` runs ``fleetwave-2``; ``bus``: ``fleetwave``)."""
        return "fleetwave" + host.removeprefix(BUS)

    def store_dir(self, host: str) -> Path:
        return self.dir / ("jetstream" + host.removeprefix(BUS))

    def _child(self, host: str, name: str, argv: list[str]) -> Child:
        return Child(name, self.bed.argv(host, argv), self.dir / "logs" / f"{name}.log")

    @property
    def nats_url(self) -> str:
        """The bus as the test (and the CLI it runs) reaches it: through the portal(s)."""
        return ",".join(p.url for p in self.portals)

    @property
    def coordinator(self) -> Child:
        return self.coordinators[0]

    def agent(self, i: int) -> Child:
        """Agent ``node-i`` (1-based, as its id)."""
        return self.agents[i - 1]

    def process(self, host: str) -> Child:
        """The fleetwave process of ``host`` (bus: the broker, coord-i, node-i)."""
        by_host = {**dict(zip(self.buses, self.brokers, strict=True)),
                   **{f"coord-{i}": c for i, c in enumerate(self.coordinators, start=1)},
                   **dict(zip(self.nodes, self.agents, strict=True))}
        return by_host[host]

    def host(self, i: int) -> str:
        """The bed address of node-i (its router listens there)."""
        return self.bed.addr(f"node-{i}")

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> NetFleet:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the broker, the coordinators, then the agents; wait until all are online."""
        self.dir.mkdir(parents=True, exist_ok=True)
        key = public_key(await asyncio.to_thread(coordinator_seed, self.key_file))
        self.agents = []
        for node in self.nodes:
            child = spawn_agent(self.bus_url, node, self.dir, labels=DevFleet.labels(
                int(node.rsplit("-", 1)[1])), fleet=self.fleet,
                interval=self.heartbeat_interval,
                extra=["--bind-host", self.bed.addr(node), "--trust-key", key])
            child.argv = self.bed.argv(node, child.argv)
            self.agents.append(child)
        for p in self.portals:
            await p.__aenter__()
        await asyncio.gather(*(b.start() for b in self.brokers))
        for h in self.buses:
            await wait_until(functools.partial(self._bus_answers, h), bool,
                             timeout=READY_TIMEOUT, what=f"the broker on {h}", interval=0.1)
        if self.specs:
            await self.wait_formed()
        for c in self.coordinators:
            await c.start()
        await self.wait_online([])
        await asyncio.gather(*(a.start() for a in self.agents))
        await self.wait_online(self.nodes)

    async def _bus_answers(self, host: str) -> bool:
        broker = self.process(host)
        if broker.returncode is not None:
            raise RuntimeError(f"the broker on {host} exited: {broker.log_tail(3)}")
        try:
            reader, writer = await self.bed.open_connection(host, self.bed.addr(host), NATS_PORT)
        except (OSError, TimeoutError):
            return False
        try:
            return (await asyncio.wait_for(reader.readline(), 5)).startswith(b"INFO")
        finally:
            writer.close()

    async def wait_online(self, ids: list[str], *, state: bool = True,
                          timeout: float = READY_TIMEOUT) -> dict[str, dict[str, Any]]:
        """Poll ``fleetwave nodes`` until the coordinator answers and ``ids`` are all online
        (or all offline)."""
        return await wait_until(lambda: nodes_json(self.nats_url),
                                lambda rows: online(rows, ids, state), timeout=timeout,
                                what=f"{ids or 'the coordinator'} {'on' if state else 'off'}line",
                                interval=0.3)

    async def stop(self) -> None:
        """Stop agents, coordinators, the broker; then the services and routers left behind."""
        try:
            for c in [*self.agents, *self.coordinators, *self.brokers]:
                c.signal(signal.SIGCONT)  # a frozen process would sit out its SIGTERM
            await asyncio.gather(*(c.stop(timeout=5.0) for c in
                                   [*self.agents, *self.coordinators]), return_exceptions=True)
            await asyncio.gather(*(b.stop(timeout=5.0) for b in self.brokers),
                                 return_exceptions=True)
            await asyncio.to_thread(reap_leftovers, self.dir, exclude=set())
        finally:
            for p in self.portals:
                await p.close()

    # -- a cluster of brokers ---------------------------------------------------------------------

    async def monitor(self, host: str, path: str, timeout: float = 2.0) -> Any:
        """GET ``path`` of the monitoring endpoint of the broker on ``host`` (it listens on that
        host's own 127.0.0.1, at the port its config names) as JSON, whatever the HTTP status
        (``/healthz`` says why it is not ok in its body); OSError/ValueError if unreachable."""
        conf = (self.store_dir(host) / "nats-server.conf").read_text()
        found = re.search(r'^http: "127\.0\.0\.1:(\d+)"', conf, re.M)
        if found is None:
            raise ValueError(f"no monitoring port in {host}'s config")
        reader, writer = await self.bed.open_connection(host, "127.0.0.1", int(found[1]),
                                                        timeout=timeout)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            async with asyncio.timeout(timeout):
                raw = await reader.read()
        finally:
            writer.close()
        _, _, body = raw.partition(b"\r\n\r\n")
        return json.loads(body)

    async def meta_leader(self) -> str:
        """The server name of JetStream's meta leader now, as a running broker tells ("")."""
        for h in self.buses:
            if self.process(h).running:
                with contextlib.suppress(OSError, ValueError, TimeoutError):
                    leader = (await self.monitor(h, "/jsz")).get("meta_cluster", {}).get("leader")
                    if leader:
                        return str(leader)
        return ""

    def bus_host(self, server_name: str) -> str:
        """The host of the broker named ``server_name``."""
        hosts = {self.server_name(h): h for h in self.buses}
        return hosts[server_name]

    async def connected_from(self, host: str) -> str | None:
        """The host of the running broker that ``host``'s process is connected to (by the
        connections' addresses in ``/connz``), if any."""
        addr = self.bed.addr(host)
        for h in self.buses:
            if self.process(h).running:
                with contextlib.suppress(OSError, ValueError, TimeoutError):
                    connz = await self.monitor(h, "/connz?limit=4096")
                    if any(c.get("ip") == addr for c in connz.get("connections") or []):
                        return h
        return None

    async def wait_formed(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every running broker says JetStream is healthy and the meta leader sees each
        of them as a current peer (``BrokerCluster.wait_formed``'s test, through ``monitor``)."""
        deadline = time.monotonic() + timeout
        while True:
            running = [h for h in self.buses if self.process(h).running]
            bad = []
            for h in running:
                try:
                    health = await self.monitor(h, "/healthz")
                except (OSError, ValueError, TimeoutError) as exc:
                    health = {"error": str(exc)}
                if health.get("status") != "ok":
                    bad.append(f"{h}: {health.get('error', health)}")
            if not bad:
                leader = await self.meta_leader()
                if not leader:
                    bad = ["no meta leader"]
                else:
                    meta = (await self.monitor(self.bus_host(leader), "/jsz")).get(
                        "meta_cluster", {})
                    bad = not_current_peers(meta, [self.server_name(h) for h in running
                                                   if self.server_name(h) != leader])
            if not bad:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the broker cluster did not form within {timeout:g}s: "
                                   f"{'; '.join(bad)}")
            await asyncio.sleep(0.2)

    async def crash_broker(self, host: str) -> None:
        """SIGKILL every process of broker host ``host`` (the wrapper and its nats-server, as
        the host dying would) and reap the wrapper; its store stays. Its portal is closed too:
        the test's clients are refused there, as at a dead host (an open portal would accept
        and then hang up, and nats-py leaves such a connection unclosed)."""
        await asyncio.to_thread(self.bed.signal_all, host, signal.SIGKILL)
        await self.process(host).kill()
        await self.portals[self.buses.index(host)].close()

    # -- looking at it ----------------------------------------------------------------------------

    async def serving(self) -> dict[str, str]:
        """What each node's router answers now (from host ``load``): a version or ``<why>``."""
        answers = await asyncio.gather(*(probe_version(self.bed.addr(n), SERVICE_PORT,
                                                       connect=self.connect)
                                         for n in self.nodes))
        return dict(zip(self.nodes, answers, strict=True))

    @contextlib.asynccontextmanager
    async def loaded(self, *, rate: float = 20.0) -> AsyncIterator[Traffic]:
        """Steady checked GET traffic from host ``load`` to every node's router."""
        traffic = Traffic([(self.bed.addr(n), SERVICE_PORT) for n in self.nodes],
                          workers_per_target=2, rate=rate, connect=self.connect)
        traffic.start()
        try:
            yield traffic
        finally:
            await traffic.stop()
