"""The coordinator daemon: the node table fed from the bus, its events, and the API.

Theory of operation: ``Coordinator.run(stop)`` connects (waiting for NATS as long as it takes),
creates the fleet's buckets and stream (``ensure_fleet``, retried until JetStream answers), loads
every node ever registered from the nodes bucket (so that a restarted coordinator lists offline
nodes too), subscribes to heartbeats and registrations, serves the API as the NATS micro service
"fleetwave-coordinator", and then owns two tasks until ``stop`` is set:

- the *ticker* lets time pass in the pure node table (``core.fleet``) so that silent nodes
  go offline; not while the coordinator's own connection is down (then the silence is ours), and
  after a reconnect it excuses the fleet for as long as agents may take to reconnect too;
- the *event publisher* (``protocol.events``) records every transition as an Event in
  the events stream; it retries a while when JetStream is away and drops (with a log line) only
  when its queue is full.

Messages from the fleet are untrusted: a heartbeat or registration that does not decode, or that
claims another node than its subject names, is counted, logged (once per node and kind, not per
message) and ignored. The API never raises either (``coordinator.api.verbs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from coordinator.api.rollouts import RolloutsApi
from coordinator.api.verbs import Api
from coordinator.core.fleet import Fleet, Transition
from coordinator.releases import resolve_release
from coordinator.runtime.runner import TICK, Runner
from protocol import subjects
from protocol.bus import RECONNECT_CAP, Bus, redact
from protocol.codec import decode
from protocol.errors import BusError, ProtocolError, TooFewServers
from protocol.events import EventPublisher
from protocol.messages import Event, Heartbeat, NodeInfo, NodesRequest, NodeView
from protocol.signing import generate_seed, public_key

log = logging.getLogger("fleetwave.coordinator")

SERVICE_NAME = "fleetwave-coordinator"
CONNECT_FOREVER = 10 * 365 * 24 * 3600.0
SETUP_RETRY_CAP = 5.0

T = TypeVar("T")


def _version() -> str:
    try:
        return version("fleetwave")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


class Coordinator:
    """One coordinator for one fleet; owns its bus connection and every task it starts."""

    def __init__(
        self, nats_url: str, fleet: str, *, clock: Callable[[], float] = time.time,
        seed: bytes | None = None, replicas: int | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.replicas = replicas  # of the fleet's streams; None: 3 on a cluster of 3+, else 1
        self.replicas_used = 0
        self.fleet_name = fleet
        self.table = Fleet()
        self.api = Api()
        self.api.add("nodes", NodesRequest, self._nodes)
        self.malformed = 0
        self.bus: Bus | None = None
        self.ready = asyncio.Event()
        self._clock = clock
        self.events = EventPublisher(fleet, logger=log)
        self._complained: set[tuple[str, str]] = set()
        # The key that signs desired states; without a key file (tests) a throwaway one, which
        # agents trust only if told its public key (API verb ``key``).
        self.seed = seed if seed is not None else generate_seed()
        self.public_key = public_key(self.seed)
        self.runner: Runner | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set."""
        bus = await _until(
            stop,
            Bus.connect(
                self.nats_url, self.fleet_name, name=SERVICE_NAME,
                connect_deadline=CONNECT_FOREVER, reconnect_forever=True,
            ),
        )
        if bus is None:
            return
        self.bus = bus
        try:
            if not await _until(stop, self._set_up(bus)):
                return
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._tick_loop(), name="tick"),
                    tg.create_task(self.events.run(bus), name="events"),
                ]
                if self.runner is not None:
                    tasks.append(tg.create_task(self.runner.run(), name="rollouts"))
                self.ready.set()
                log.info(
                    "coordinator of fleet %r ready on %s (%d known nodes, R%d)",
                    self.fleet_name, redact(self.nats_url), len(self.table.nodes),
                    self.replicas_used,
                )
                log.info("signing key %s: start agents with --trust-key %s",
                         self.public_key, self.public_key)
                await stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            await bus.close()
            log.info("coordinator stopped")

    async def _set_up(self, bus: Bus) -> bool:
        f = self.fleet_name
        attempt = 0
        while True:
            try:
                setup = await bus.ensure_fleet(self.replicas, raise_existing=True)
                self.replicas_used = setup.replicas
                for stream, had in setup.raised:
                    log.info("raised %s from %d to %d replicas", stream, had, setup.replicas)
                await self._load_known(bus)
                break
            except TooFewServers:
                raise  # the operator's --replicas: retrying cannot help; nothing was created
            except BusError as exc:
                delay = min(SETUP_RETRY_CAP, 0.25 * 2**attempt)
                log.warning("cannot set up fleet %r yet (%s); retrying in %.1fs", f, exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
        await bus.subscribe(subjects.heartbeats(f), self._on_heartbeat)
        await bus.subscribe(subjects.registrations(f), self._on_register)
        self.runner = Runner(bus, seed=self.seed, nodes=self.table.view,
                             liveness=self.table.liveness, clock=self._clock)
        RolloutsApi(
            self.runner, public_key=self.public_key,
            resolve=lambda service, version: resolve_release(bus, service, version),
        ).register(self.api)
        await bus.serve(SERVICE_NAME, _version(), self.api.endpoints(f))
        return True

    async def _load_known(self, bus: Bus) -> None:
        for entry in await bus.kv_entries(subjects.nodes_bucket(self.fleet_name)):
            try:
                info = decode(NodeInfo, entry.value or b"")
                subjects.check_name("node", info.id)
                if info.id != entry.key:  # only node K may write key K (deploy/nats/auth.conf)
                    raise ProtocolError(f"the entry of node {entry.key!r} claims to be {info.id!r}")
            except ProtocolError as exc:
                self._complain(entry.key, "nodes-bucket", f"ignoring nodes bucket entry: {exc}")
                continue
            self.table.load(info)

    # -- inputs -----------------------------------------------------------------------------------

    async def _on_heartbeat(self, subject: str, data: bytes) -> None:
        node = subject.rsplit(".", 1)[-1]
        try:
            hb = decode(Heartbeat, data)
            if hb.node != node:
                raise ProtocolError(f"heartbeat on {subject} claims to be from node {hb.node!r}")
        except ProtocolError as exc:
            self._complain(node, "heartbeat", str(exc))
            return
        self._emit(self.table.heartbeat(hb, self._clock()))

    async def _on_register(self, subject: str, data: bytes) -> None:
        # The subject names the sender (the server lets a node publish only on its own), so a
        # registration is believed for that node alone: never for another, never for a new one.
        node = subject.rsplit(".", 1)[-1]
        try:
            info = decode(NodeInfo, data)
            subjects.check_name("node", info.id)
            if info.id != node:
                raise ProtocolError(f"registration on {subject} claims to be node {info.id!r}")
        except ProtocolError as exc:
            self._complain(node, "registration", str(exc))
            return
        log.info("node %s registered (labels %s)", info.id, info.labels)
        self._emit(self.table.register(info, self._clock()))

    async def _nodes(self, req: NodesRequest) -> list[NodeView]:
        return self.table.view(req.selector)

    def _complain(self, node: str, kind: str, message: str) -> None:
        self.malformed += 1
        if (node, kind) not in self._complained:  # once per source: a flood must not fill the log
            self._complained.add((node, kind))
            log.warning("ignored malformed %s from %s: %s", kind, node, message)

    # -- outputs ----------------------------------------------------------------------------------

    def _emit(self, transitions: list[Transition]) -> None:
        for t in transitions:
            log.info("%s", t.message)
            event = Event(
                id=uuid.uuid4().hex, time=self._clock(), fleet=self.fleet_name, kind=t.kind,
                message=t.message, node=t.node, data=dict(t.data),
            )
            self.events.put(event)

    async def _tick_loop(self) -> None:
        deaf = False
        while True:
            if self.bus is not None and not self.bus.connected:
                deaf = True  # nothing reaches us: the nodes' silence is not theirs
            else:
                if deaf:
                    # Agents reconnect with jittered backoff of up to RECONNECT_CAP after the
                    # broker is back; until then their silence is still no evidence.
                    self.table.excuse(self._clock() + RECONNECT_CAP)
                    deaf = False
                self._emit(self.table.tick(self._clock()))
            await asyncio.sleep(TICK)

async def _until(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work`` unless ``stop`` is set first; then cancel it and return None."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()

