"""The simulated driver: one process hosts N virtual nodes, for control-plane scale tests.

``fleetwave-agent --node-id sim --simulate N`` runs nodes ``sim-1`` ... ``sim-N``. Each registers
and heartbeats like a real node (through ``agent.presence``, the same code the daemon uses), and
answers its desired states through the same protocol path: envelopes are verified with
``protocol.signing.verify`` (trusted keys, fleet, node, service, newer generation) and refused
with an ``agent.refused`` event otherwise. What differs is the work: a virtual node has no
processes, so every desired slot is healthy at once and the weights are applied at once, and the
observed state says ``converged`` on the desired generation straight away.

Scale: ONE watch on the whole desired bucket, filtered in process (N watches would cost N
consumers on the server), heartbeats published in one pass per interval over one connection, and
KV writes (registrations, observed states) pipelined in batches by one writer task with bounded
waits, and the ``agent.refused`` events published, batched and pipelined too, by the one event
publisher (``protocol.events``) real agents and the coordinator use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

import msgspec

from agent import presence
from agent.cadence import sleep_or_wake
from agent.host.hostinfo import HostSampler, host_facts
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.errors import BusError, ProtocolError
from protocol.events import EVENT_QUEUE, EventPublisher
from protocol.messages import (
    DesiredState,
    Event,
    ObservedState,
    ServiceSummary,
    SignedEnvelope,
    SlotStatus,
)
from protocol.signing import verify

log = logging.getLogger("fleetwave.agent.simulate")

WRITE_BATCH = 2048  # writes pipelined before their acks are awaited
WRITE_TIMEOUT = 10.0


def node_ids(base: str, count: int) -> list[str]:
    """The virtual node ids: ``<base>-1`` ... ``<base>-<count>``."""
    return [f"{base}-{i}" for i in range(1, count + 1)]


def instant_observed(node: str, desired: DesiredState, now: float) -> ObservedState:
    """What a virtual node reports: every desired slot healthy, weights applied, converged."""
    mirror = desired.mirror.slot if desired.mirror else None
    slots = {
        s: SlotStatus(slot=s, status="healthy", version=ref.version, digest=ref.digest, since=now)
        for s, ref in desired.slots.items()
    }
    weights = {
        s: w for s, w in desired.weights.items() if w > 0 and s in desired.slots and s != mirror
    }
    return ObservedState(
        node=node, service=desired.service, generation=desired.generation,
        observed_generation=desired.generation, slots=slots, weights=weights, phase="converged",
        time=now,
    )


def summary_of(desired: DesiredState) -> ServiceSummary:
    """The heartbeat line of a virtual node's service: the version with the largest weight."""
    best = max(desired.weights.items(), key=lambda kv: kv[1], default=("", 0))
    ref = desired.slots.get(best[0]) or next(iter(desired.slots.values()), None)
    return ServiceSummary(
        service=desired.service, version=ref.version if ref else "", healthy=ref is not None,
        generation=desired.generation, observed_generation=desired.generation,
    )


@dataclass
class _Accepted:
    envelope: SignedEnvelope
    desired: DesiredState


class SimulatedNodes:
    """N virtual nodes over one bus connection; ``run`` until cancelled."""

    def __init__(
        self, *, bus: Bus, fleet: str, base: str, count: int, labels: dict[str, str],
        trusted_keys: Collection[str], bind_host: str = "127.0.0.1",
        sampler: HostSampler, interval: float = presence.DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.clock = clock
        self.fleet = fleet
        self.nodes = node_ids(base, count)
        self._members = frozenset(self.nodes)
        self.labels = labels
        self.trusted_keys = frozenset(trusted_keys)
        self.pacing = presence.Pacing(interval)  # every virtual node keeps the leader's pace
        self._repaced = asyncio.Event()
        self.sampler = sampler
        self.accepted: dict[tuple[str, str], _Accepted] = {}
        self.refused = 0
        self.registered = 0
        started = clock()
        facts = host_facts()
        self._infos = {
            n: msgspec.structs.replace(
                presence.node_info(node=n, labels=labels, facts=facts, bind_host=bind_host,
                                   started_at=started, trust_keys=self.trusted_keys),
                simulated=True,
            )
            for n in self.nodes
        }
        self._writes: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
        # N agents hold N event queues; this one stands for them all, so it keeps at least one
        # refusal per virtual node before it drops the oldest.
        self.events = EventPublisher(fleet, queue=max(EVENT_QUEUE, count), logger=log,
                                     agent=True)

    async def run(self) -> None:
        await self.bus.subscribe(subjects.pace(self.fleet), self._on_pace)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._writer(), name="sim-writer")
            tg.create_task(self.events.run(self.bus), name="sim-events")
            tg.create_task(self._register_loop(), name="sim-register")
            tg.create_task(self._heartbeat_loop(), name="sim-heartbeat")
            await self._watch_loop()

    # -- presence ---------------------------------------------------------------------------------

    async def _register_loop(self) -> None:
        """Register every node on connect and again after every reconnect; after a reconnect,
        report every accepted observed state again too (the observed bucket is kept in memory:
        a restarted server has none, ``protocol.bus._storage``), as a real agent's periodic
        report does within ``OBSERVE_EVERY``."""
        done_for: int | None = None
        while True:
            if done_for == self.bus.reconnects or not self.bus.connected:
                await asyncio.sleep(0.2)
                continue
            again = done_for is not None
            done_for = self.bus.reconnects
            for n in self.nodes:
                data = encode(self._infos[n])
                with contextlib.suppress(BusError):
                    await self.bus.publish(subjects.register(self.fleet, n), data)
                await self._writes.put((subjects.nodes_bucket(self.fleet), n, data))
            if again:
                for (node, service), acc in list(self.accepted.items()):
                    self._report(node, service, acc.desired)
            self.registered += 1
            log.info("registered %d simulated nodes", len(self.nodes))

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        seq = 0
        while True:
            delay = due - loop.time()
            if delay > 0:
                await sleep_or_wake(delay, self._repaced)  # a new pace: announce it at once
            if self._repaced.is_set():
                self._repaced.clear()
                due = loop.time()
            due = presence.next_beat(due, self.pacing.interval, loop.time())
            if not self.bus.connected:
                continue
            figures = self.sampler.sample()  # one host: every virtual node reports its figures
            now = self.clock()
            by_node: dict[str, list[ServiceSummary]] = {}
            for (node, _svc), acc in self.accepted.items():
                by_node.setdefault(node, []).append(summary_of(acc.desired))
            for n in self.nodes:
                hb = presence.heartbeat(
                    node=n, seq=seq, now=now, interval=self.pacing.interval,
                    labels=self.labels,
                    figures=figures, services=by_node.get(n, []), slots=[],
                )
                try:
                    await self.bus.publish(subjects.heartbeat(self.fleet, n), encode(hb))
                except BusError:
                    break  # disconnected meanwhile: the next pass tries again
            seq += 1

    async def _on_pace(self, subject: str, data: bytes) -> None:
        try:
            changed = self.pacing.offer(data)
        except ProtocolError as exc:
            log.warning("ignored a malformed pace on %s: %s", subject, exc)
            return
        if changed:
            log.info("%d simulated nodes: %s", len(self.nodes), self.pacing.says())
            self._repaced.set()

    # -- desired and observed ---------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        async for entry in self.bus.watch(subjects.desired_bucket(self.fleet), ">"):
            if entry is None or entry.value is None or "." not in entry.key:
                continue
            node, service = entry.key.split(".", 1)
            if node in self._members:
                self.offer(node, service, entry.value)

    def offer(self, node: str, service: str, value: bytes) -> bool:
        """Verify and accept a desired state for a virtual node; True if accepted."""
        prev = self.accepted.get((node, service))
        try:
            env = decode(SignedEnvelope, value)
            if prev is not None and env == prev.envelope:
                return False
            desired = verify(env, self.trusted_keys, fleet=self.fleet, node=node,
                             service=service, min_generation=prev.desired.generation if prev else 0,
                             min_term=prev.envelope.term if prev else 0,
                             running=prev.envelope if prev else None)
        except ProtocolError as exc:
            self.refused += 1
            ev = Event(id=uuid.uuid4().hex, time=self.clock(), fleet=self.fleet,
                       kind="agent.refused", message=str(exc), node=node, service=service)
            self.events.put(ev)
            return False
        self.accepted[(node, service)] = _Accepted(env, desired)
        self._report(node, service, desired)
        return True

    def _report(self, node: str, service: str, desired: DesiredState) -> None:
        obs = instant_observed(node, desired, self.clock())
        self._writes.put_nowait((subjects.observed_bucket(self.fleet),
                                 subjects.node_service_key(node, service), encode(obs)))

    async def _writer(self) -> None:
        """KV writes, pipelined in batches: everything queued while the last batch was out,
        the latest value per key. What fails is retried with backoff before the next
        batch is taken, so a key never goes back to an older value. One writer stands for the
        fleet's N agents writing at once: N request round trips one after another would make
        the simulator, not the coordinator, what a scale test measures."""
        while True:
            batch = [await self._writes.get()]
            while not self._writes.empty() and len(batch) < WRITE_BATCH:
                batch.append(self._writes.get_nowait())
            latest: dict[tuple[str, str], tuple[str, str, bytes]] = {}
            for bucket, key, data in batch:
                latest[(bucket, key)] = (bucket, key, data)
            pending = list(latest.values())
            for attempt in range(10):
                pending = await self._write_batch(pending)
                if not pending:
                    break
                if attempt == 0:
                    log.warning("%d simulated writes failed; retrying", len(pending))
                await asyncio.sleep(presence.retry_delay(attempt))
            if pending:
                log.error("%d simulated writes given up", len(pending))

    async def _write_batch(
        self, items: list[tuple[str, str, bytes]],
    ) -> list[tuple[str, str, bytes]]:
        """Write ``items`` (bucket, key, value); return those that failed."""
        failed: list[tuple[str, str, bytes]] = []
        by_bucket: dict[str, list[tuple[str, str, bytes]]] = {}
        for item in items:
            by_bucket.setdefault(item[0], []).append(item)
        for bucket, group in by_bucket.items():
            results: list[object]
            try:
                results = list(await self.bus.kv_put_all(
                    bucket, [(k, d) for _, k, d in group], timeout=WRITE_TIMEOUT))
            except BusError as exc:  # the bucket cannot even be opened: all of them failed
                results = [exc] * len(group)
            failed += [item for item, r in zip(group, results, strict=True)
                       if isinstance(r, BusError)]
        return failed
