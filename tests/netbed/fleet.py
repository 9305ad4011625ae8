"""A fleet on a ``NetBed``: the broker, coordinators and agents each in a host of their own.

Theory of operation: ``NetFleet(bed, directory, agents=N, coordinators=K)`` is an async context
manager over a bed built with ``NetFleet.hosts(N, K)``: host ``bus`` runs ``fleetwave broker`` on
its bed address, hosts ``coord-1..K`` run ``fleetwave coordinator`` (one shared signing key, as
replicas of one fleet have), hosts ``node-1..N`` run ``fleetwave-agent --node-id node-i`` bound to
their bed address (so each node's router serves ``<addr>:8080`` on the bed's network), and host
``load`` is where the test's traffic and samplers come from. Every process is a
``coordinator.dev.devfleet.Child`` (SIGTERM → SIGKILL, always reaped) whose argv is wrapped in
``ip netns exec``, so ``fleet.coordinator.signal(SIGSTOP)`` freezes that very process.

The test reaches the bus through a ``Portal`` (``fleet.nats_url``, a root-namespace URL made from
inside host ``bus``, immune to the scenario's faults) and the nodes through ``fleet.connect`` (a
socket made in host ``load``, crossing the bridge like any client). Agents and coordinators use
``fleet.bus_url``, the broker's bed address: their traffic is what partitions and impairments hit.

Faults for a scenario: ``bed.partition("coord-1", BUS)`` cuts a coordinator from the bus (and
``bed.heal``), ``fleet.process("coord-1").signal(SIGSTOP)`` / ``SIGCONT`` freezes and thaws it,
``await fleet.process("coord-1").kill()`` is a crash (reaped), ``.start()`` starts it again;
``bed.impair(host, delay=, loss=, peer=)`` makes a link slow and lossy.

Leaving stops agents, coordinators and the broker, then every service and router the agents left
(``reap_leftovers``); the bed's own teardown (the ``netbed`` fixture) kills whatever is still in a
host and removes the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

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
SERVICE_PORT = 8080
READY_TIMEOUT = 40.0
CLI = "import sys; from coordinator.cli import main; main(sys.argv[1:])"


class NetFleet:
    """Broker, ``coordinators`` coordinators and ``agents`` agents on ``bed``; async with."""

    @staticmethod
    def hosts(agents: int, coordinators: int = 1) -> list[str]:
        """The hosts a bed needs for such a fleet: bus, coord-*, node-*, load."""
        return [BUS, *(f"coord-{i}" for i in range(1, coordinators + 1)),
                *(f"node-{i}" for i in range(1, agents + 1)), LOAD]

    def __init__(
        self,
        bed: NetBed,
        directory: Path,
        *,
        agents: int = 3,
        coordinators: int = 1,
        fleet: str = "default",
        heartbeat_interval: float = 0.5,
    ) -> None:
        missing = set(self.hosts(agents, coordinators)) - set(bed.hosts)
        if missing:
            raise ValueError(f"the bed lacks hosts {sorted(missing)}; build it with "
                             f"NetFleet.hosts({agents}, {coordinators})")
        self.bed = bed
        self.dir = directory.absolute()
        self.fleet = fleet
        self.key_file = self.dir / "coordinator.seed"
        self.bus_url = f"nats://{bed.addr(BUS)}:{NATS_PORT}"
        self.portal = Portal(bed, BUS, bed.addr(BUS), NATS_PORT)
        self.connect: Connector = bed.connector(LOAD)
        self.broker = self._child(BUS, "broker", [
            sys.executable, "-c", CLI, "broker", "--host", bed.addr(BUS), "--port",
            str(NATS_PORT), "--store-dir", str(self.dir / "jetstream")])
        self.coordinators = [
            self._child(f"coord-{i}", f"coord-{i}", python_module(
                "coordinator.daemon", "--nats", self.bus_url, "--fleet", fleet, "coordinator",
                "--key-file", str(self.key_file)))
            for i in range(1, coordinators + 1)]
        self.nodes = [f"node-{i}" for i in range(1, agents + 1)]
        self.agents: list[Child] = []
        self.heartbeat_interval = heartbeat_interval

    def _child(self, host: str, name: str, argv: list[str]) -> Child:
        return Child(name, self.bed.argv(host, argv), self.dir / "logs" / f"{name}.log")

    @property
    def nats_url(self) -> str:
        """The bus as the test (and the CLI it runs) reaches it: through the portal."""
        return self.portal.url

    @property
    def coordinator(self) -> Child:
        return self.coordinators[0]

    def agent(self, i: int) -> Child:
        """Agent ``node-i`` (1-based, as its id)."""
        return self.agents[i - 1]

    def process(self, host: str) -> Child:
        """The fleetwave process of ``host`` (bus: the broker, coord-i, node-i)."""
        by_host = {BUS: self.broker, **{f"coord-{i}": c for i, c in
                                        enumerate(self.coordinators, start=1)},
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
        await self.portal.__aenter__()
        await self.broker.start()
        await wait_until(self._bus_answers, bool, timeout=READY_TIMEOUT,
                         what=f"the broker on {self.bus_url}", interval=0.1)
        for c in self.coordinators:
            await c.start()
        await self.wait_online([])
        await asyncio.gather(*(a.start() for a in self.agents))
        await self.wait_online(self.nodes)

    async def _bus_answers(self) -> bool:
        if self.broker.returncode is not None:
            raise RuntimeError(f"the broker exited: {self.broker.log_tail(3)}")
        reader, writer = await self.bed.open_connection(BUS, self.bed.addr(BUS), NATS_PORT)
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
            for c in [*self.agents, *self.coordinators, self.broker]:
                c.signal(signal.SIGCONT)  # a frozen process would sit out its SIGTERM
            await asyncio.gather(*(c.stop(timeout=5.0) for c in
                                   [*self.agents, *self.coordinators]), return_exceptions=True)
            await self.broker.stop(timeout=5.0)
            await asyncio.to_thread(reap_leftovers, self.dir, exclude=set())
        finally:
            await self.portal.close()

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
