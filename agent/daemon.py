"""The agent daemon: runs its services, connects to NATS, keeps its node registered and beating.

Theory of operation: ``Agent.run(stop)`` starts the part of its services that needs no bus
(``services.run_local()``: the state file restored, slots adopted, supervised and restarted,
routers set up), then connects (waiting as long as it takes for a broker: a restarted agent
serves what its state file remembers meanwhile, as after a site-wide power cut where the hosts
come back before the broker), then owns three more tasks in one TaskGroup until ``stop`` is set:

- *registration*: publishes the node's NodeInfo on ``register`` and writes it to the nodes bucket,
  on connect and again after every reconnect (``Bus.reconnects`` grows). The bucket may not exist
  yet (no coordinator ever ran): that is retried with backoff and jitter, logged once, never fatal.
  Once registered it does not poll for a reconnect on a timer of its own: every heartbeat tick
  wakes it to look (a re-registration at most one interval after a reconnect, which is also when
  the first heartbeat after it goes out).
- *heartbeats*: every ``interval``, on the grid of ``agent.cadence`` (so the router stats and the
  probes share its wakeups), a Heartbeat with psutil figures and ``services.summary()``. The
  interval is its own ``--heartbeat-interval`` or the leader's pace (``subjects.pace``) when that
  is longer (``presence.Pacing``); when it changes, a beat goes out at once to announce it (the
  coordinator judges the node's silence by the interval its last heartbeat announced).
  While disconnected no heartbeat is sent: nats-py would buffer them and flush a burst of stale
  ones on reconnect. The same loop returns the C heap's free pages to the OS
  (``hostinfo.trim_heap``) once start-up is over and then every ``TRIM_EVERY`` seconds: the agent
  sits on every host, and most of its life is idle.
- *services*: ``services.run_bus(bus)`` (the service manager's watch of desired states, its
  events and observed states), if one is plugged in.

From the moment ``stop`` is set the local part starts nothing (no slot, no router, no restart),
and it is cancelled (saving its state) before the bus is closed; a stop while it still connects
cancels it too.
A failure of one task is a bug: the TaskGroup cancels the others and ``run`` raises, and the
process exits 1 (systemd restarts it). Bus errors are expected weather and are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent import presence
from agent.cadence import sleep_to_tick
from agent.edge import Edge
from agent.host.hostinfo import HostSampler, host_facts, trim_heap
from agent.host.identity import RunAs
from protocol import subjects
from protocol.bus import Bus, redact
from protocol.codec import encode
from protocol.creds import Creds
from protocol.errors import BusError, ProtocolError
from protocol.loop import first_set
from protocol.messages import NodeInfo, Pace, ServiceSummary, SlotProcess

log = logging.getLogger("fleetwave.agent")

# The agent waits for a broker as long as it takes: it is started by systemd before NATS may be up.
CONNECT_FOREVER = 10 * 365 * 24 * 3600.0
# A host enrolled a moment ago may start before its broker reloaded its users ('auth add-node'
# then the agent at once): its key is retried this long before the refusal is final (exit 1).
REFUSED_GRACE = 30.0
REGISTER_TIMEOUT = 5.0  # one publish + one KV put; bounded so a dead link cannot hang the loop
# How long a stopping agent waits for its local part to end (its runners' hooks and probes
# killed and reaped, the state file saved) before it closes the bus anyway.
HALT_TIMEOUT = 5.0
# First trim once start-up is done (connected, registered, services started), then now and then:
# a trim walks the heap (about a millisecond), so once a minute costs nothing measurable.
TRIM_AFTER_START = 10.0
TRIM_EVERY = 60.0


class ServiceSource(Protocol):
    """What the service manager offers the daemon (``agent.manager.shell.ServiceManager``)."""

    async def run_local(self, stop: asyncio.Event) -> None:
        """Restore, supervise and converge what needs no bus, until cancelled; once ``stop`` is
        set, start nothing more (the agent stops)."""

    async def run_bus(self, bus: Bus) -> None:
        """Watch desired states and report, on ``bus``, until cancelled."""

    def summary(self) -> tuple[list[ServiceSummary], list[SlotProcess]]:
        """The services and slot processes of this node now, for the next heartbeat."""
        ...

    def paced(self, pace: Pace) -> None:
        """The leader's pace, valid (``presence.Pacing.offer``): re-reads and reports follow
        it."""


ServiceFactory = Callable[[], ServiceSource]


@dataclass(frozen=True)
class AgentOptions:
    node_id: str
    nats_url: str
    fleet: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    data_dir: Path = Path("fleetwave-data/agent")
    bind_host: str = "127.0.0.1"
    heartbeat_interval: float = presence.DEFAULT_INTERVAL
    service_user: RunAs | None = None  # see agent.host.identity
    service_users: dict[str, RunAs] = field(default_factory=dict)  # SERVICE=USER, each its own
    router_user: RunAs | None = None  # the routers' (None: the service user's)
    edge: Edge = field(default_factory=Edge)  # every router's public-port limits
    creds: Creds | None = None  # this node's identity on the bus (fleetwave auth add-node)
    tls_ca: str | None = None  # the fleet's CA: TLS on
    trust_keys: tuple[str, ...] = ()  # coordinator keys whose desired states are accepted
    prefetch: bool = True  # fetch a release of a service run here when pushed (--prefetch)


class Agent:
    """One agent: owns its bus connection and every task it starts."""

    def __init__(
        self, options: AgentOptions, services: ServiceFactory | None = None, *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.clock = clock
        self._services_factory = services
        self.bus: Bus | None = None
        self.registrations = 0
        self.heartbeats = 0
        self.trims = 0
        self._tick = asyncio.Event()  # set by every heartbeat tick: the registration looks then
        self.pacing = presence.Pacing(options.heartbeat_interval)
        self._repaced = asyncio.Event()  # the interval changed: beat now, to announce it
        self._bad_pace = False  # a malformed pace was logged (once: a flood must not fill logs)
        self._services: ServiceSource | None = None
        self._started_at = clock()
        self._sampler = HostSampler(options.data_dir)
        self._info = presence.node_info(
            node=options.node_id,
            labels=options.labels,
            facts=host_facts(),
            bind_host=options.bind_host,
            started_at=self._started_at,
            trust_keys=options.trust_keys,
        )

    @property
    def info(self) -> NodeInfo:
        return self._info

    async def run(self, stop: asyncio.Event) -> None:
        """Run services, connect, then register, beat and report until ``stop`` is set."""
        services = self._services_factory() if self._services_factory else None
        self._services = services
        gone = False
        try:
            async with asyncio.TaskGroup() as tg:
                local = None
                if services is not None:
                    local = tg.create_task(services.run_local(stop), name="services-local")
                try:
                    bus = await self._connect(stop)
                    if bus is not None:
                        gone = await self._online(bus, services, stop, local)
                finally:
                    if local is not None:
                        local.cancel()  # it saves the state file a last time
        finally:
            if self.bus is not None:  # as ever: said once connected (a refusal is one line)
                log.info("node %s stopped", self.options.node_id)
        if gone:
            # nats-py closed the connection for good (``Bus._closed``): a new process
            # connects anew; its slots run on and are adopted (``restore``).
            raise BusError("the connection to NATS was closed for good (see the line "
                           "before); the agent stops: its supervisor starts it again")

    async def _online(
        self, bus: Bus, services: ServiceSource | None, stop: asyncio.Event,
        local: asyncio.Task[None] | None = None,
    ) -> bool:
        """Register, beat and run the services' bus part until ``stop`` is set or the bus is
        gone for good (then True); the bus is closed on return. On a stop, the services'
        ``local`` part is ended first (up to HALT_TIMEOUT): its state saved before the bus's
        close, which can take seconds (a drain, a broker that does not answer). Slot stops
        under way are cut short as at any stop (a slot left running is adopted by the next
        agent); a router start under way completes, found again by its socket."""
        self.bus = bus
        log.info("connected to %s as node %s", redact(self.options.nats_url), self.options.node_id)
        try:
            await bus.subscribe(subjects.pace(self.options.fleet), self._on_pace)
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._register_loop(bus), name="register"),
                    tg.create_task(self._heartbeat_loop(bus, services), name="heartbeat"),
                ]
                if services is not None:
                    tasks.append(tg.create_task(services.run_bus(bus), name="services-bus"))
                await first_set(stop, bus.gone)
                if stop.is_set() and local is not None:
                    local.cancel()
                    await asyncio.wait({local}, timeout=HALT_TIMEOUT)
                for t in tasks:
                    t.cancel()
            return bus.gone.is_set() and not stop.is_set()
        finally:
            await bus.close()

    async def _connect(self, stop: asyncio.Event) -> Bus | None:
        """The connected bus, or None if ``stop`` was set first."""
        connecting = asyncio.create_task(
            Bus.connect(
                self.options.nats_url,
                self.options.fleet,
                name=f"fleetwave-agent-{self.options.node_id}",
                connect_deadline=CONNECT_FOREVER,
                reconnect_forever=True,
                creds=self.options.creds,
                tls_ca=self.options.tls_ca,
                refused_grace=REFUSED_GRACE,
            )
        )
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connecting
        if connecting.cancelled():
            return None
        bus = connecting.result()
        # Its buckets bound without asking their streams' info, credentials or not (a node's
        # may not ask): at a fleet's cold start, 20,000 agents' info requests at once overflowed
        # the server's JetStream API queue, which then drops every request it holds.
        bus.blind = True
        return bus

    async def _register_loop(self, bus: Bus) -> None:
        f, node = self.options.fleet, self.options.node_id
        data = encode(self._info)
        done_for: int | None = None  # the value of bus.reconnects at the last registration
        attempt = 0
        while True:
            if not bus.connected or done_for == bus.reconnects:
                await self._tick.wait()
                self._tick.clear()
                continue
            generation = bus.reconnects
            try:
                async with asyncio.timeout(REGISTER_TIMEOUT):
                    await bus.publish(subjects.register(f, node), data)
                    await bus.kv_put(subjects.nodes_bucket(f), node, data)
            except (BusError, TimeoutError) as exc:
                delay = presence.retry_delay(attempt)
                if attempt == 0:
                    why = str(exc) or "timed out"
                    log.warning("cannot register node %s yet (%s); retrying", node, why)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            done_for = generation
            attempt = 0
            self.registrations += 1
            log.info("registered node %s (registration %d)", node, self.registrations)

    async def _heartbeat_loop(self, bus: Bus, services: ServiceSource | None) -> None:
        o = self.options
        subject = subjects.heartbeat(o.fleet, o.node_id)
        loop = asyncio.get_running_loop()
        trim_due = loop.time() + TRIM_AFTER_START
        seq = 0
        failing = False
        first = True
        while True:
            if not first:  # the first beat at once, then on the grid (late: skip missed beats)
                await sleep_to_tick(self.pacing.interval, wake=self._repaced)
            first = False
            self._repaced.clear()
            self._tick.set()
            if loop.time() >= trim_due:
                self.trims += trim_heap()
                trim_due = loop.time() + TRIM_EVERY
            if not bus.connected:
                continue
            svc, slots = self._summary(services)
            hb = presence.heartbeat(
                node=o.node_id, seq=seq, now=self.clock(), interval=self.pacing.interval,
                labels=o.labels, figures=self._sampler.sample(), services=svc, slots=slots,
            )
            seq += 1
            try:
                await bus.publish(subject, encode(hb))
            except BusError as exc:
                if not failing:
                    log.warning("cannot send heartbeat: %s", exc)
                failing = True
                continue
            failing = False
            self.heartbeats += 1

    async def _on_pace(self, subject: str, data: bytes) -> None:
        try:
            changed = self.pacing.offer(data)
        except ProtocolError as exc:
            if not self._bad_pace:
                log.warning("ignored a malformed pace on %s (%s); keeping a heartbeat every "
                            "%gs", subject, exc, self.pacing.interval)
            self._bad_pace = True
            return
        if self._services is not None and self.pacing.pace is not None:
            self._services.paced(self.pacing.pace)
        if changed:
            log.info("%s", self.pacing.says())
            self._repaced.set()

    def _summary(
        self, services: ServiceSource | None
    ) -> tuple[list[ServiceSummary], list[SlotProcess]]:
        if services is None:
            return [], []
        try:
            return services.summary()
        except Exception:
            # A bug in the service manager must not silence the node: it would look dead and a
            # rollout would route around a healthy host. Beat without services and say why.
            log.exception("services.summary() failed; heartbeat sent without services")
            return [], []
