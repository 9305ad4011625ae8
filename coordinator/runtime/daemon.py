"""The coordinator daemon: the node table fed from the bus, its events, the API, and leadership.

Theory of operation: ``Coordinator.run(stop)`` connects (waiting for NATS as long as it takes),
creates the fleet's buckets and stream (``ensure_fleet``, retried until JetStream answers), loads
every node ever registered from the nodes bucket (so that a restarted coordinator lists offline
nodes too), subscribes to heartbeats and registrations, serves the API as the NATS micro service
"fleetwave-coordinator" (and its own subjects ``fw.<fleet>.coord.<id>.*``: a ping, and the
writing verbs forwarded to it), and then owns three tasks until ``stop`` is set:

- *leadership* (``coordinator.runtime.lease``): stand by until this coordinator holds the lease,
  fence the buckets with its term (after a signing-key rotation, taking over from its previous
  key and re-signing what that key signed: ``coordinator.core.rotation``), and run a ``Runner``
  for as long as the lease holds (a lost renewal, or a write refused by a later leader's fence,
  ends it at once); then stand by again.
  On ``stop`` a leader gives the lease up, so a standby takes over within a poll. Beside the
  runner the leader paces the agents' heartbeats (``core.pace``: at most ``heartbeat_rate`` a
  second in all, whatever the fleet's size), tells them of every release pushed
  (``coordinator.runtime.released``: they fetch it before a deploy needs it) and runs the
  notifier (``--notify``: ``coordinator.runtime.notify``), which reads the events stream through
  durable consumers, so the next leader goes on where it was;
- the *ticker* lets time pass in the pure node table (``core.fleet``) so that silent nodes
  go offline; not while the coordinator's own connection is down (then the silence is ours), and
  after a reconnect it excuses the fleet for as long as agents may take to reconnect too. A pause
  of this process (a stalled loop, SIGSTOP, a clock jump) is no evidence either: after one the
  table judges liveness on fresh heartbeats only. Nor is a connection that looks open but
  carries nothing (this host cut off from the bus): time passes for the table only up to when
  the server last answered this coordinator (``Lease.heard``; at most a renewal, 0.4 s, behind);
- the *event publisher* (``protocol.events``) records every transition as an Event in
  the events stream; it retries a while when JetStream is away and drops (with a log line) only
  when its queue is full.

Every coordinator answers the reading verbs (status, rollouts, nodes, key, leader) from its own
node table and the buckets, all of them to every request (the caller takes the first answer, so
a frozen one cannot swallow a read). The writing verbs go to one coordinator of a queue group:
the leader carries them out, a standby forwards them to the leader's own subject (naming the same
caller), and while no coordinator leads they are answered "unavailable" (the CLI asks again for a
few seconds). Every request's subject names its caller (``protocol.subjects``), which becomes
``who`` on every event the request causes; events the coordinator causes by itself (nodes going
offline, gates, automatic rollback) say who = "coordinator". A
frozen coordinator still swallows the writes the queue group hands it until it wakes or dies:
the caller's request times out and says so.

Messages from the fleet are untrusted: a heartbeat or registration that does not decode, or that
claims another node than its subject names, is counted, logged (once per node and kind, not per
message) and ignored. The API never raises either (``coordinator.api.verbs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from coordinator.api.cordons import CordonsApi
from coordinator.api.rollouts import LiveRollout, RolloutsApi
from coordinator.api.verbs import HANDLER_TIMEOUT, Api
from coordinator.core import pace
from coordinator.core.engine import EngineEvent
from coordinator.core.fleet import MIN_INTERVAL, Fleet, Transition
from coordinator.core.history import Retention, newest
from coordinator.core.lines import Lines
from coordinator.core.reconnects import Reconnects
from coordinator.core.rotation import lead_refusal, retired_after, short
from coordinator.errors import ConfigError, RemoteError
from coordinator.releases import resolve_release
from coordinator.runtime import deliveries, released
from coordinator.runtime.calls import TEARDOWN, cancelled_meanwhile, stop_all
from coordinator.runtime.cordons import read_cordons
from coordinator.runtime.executor import Observe
from coordinator.runtime.lease import (
    LEASE_TTL,
    RENEW_EVERY,
    Fenced,
    Lease,
    direct_api,
    fence_markers,
    live_leader,
    new_id,
    ping_subject,
    write_fences,
)
from coordinator.runtime.notify import Notifier
from coordinator.runtime.rotation import resign_desired
from coordinator.runtime.runner import COMPLAINED_MOST, STARTUP_GRACE, TICK, Runner
from coordinator.runtime.store import RolloutStore
from protocol import chunks, subjects
from protocol.bus import RECONNECT_CAP, Bus, EventsLimits, Handler, redact
from protocol.bus import Observer as BusObserver
from protocol.codec import decode, encode, shared
from protocol.creds import Creds
from protocol.errors import BusError, NoRoom, ProtocolError, ServerTooOld, TooFewServers
from protocol.events import EventPublisher, event_id, received_all
from protocol.history import RolloutSummary, SummarisedRollout
from protocol.loop import bounded, first_set
from protocol.messages import (
    ApiReply,
    Cordon,
    Event,
    Heartbeat,
    LeaderRequest,
    NodeInfo,
    NodesRequest,
    NodeView,
    ReleaseRef,
    RolloutRecord,
    RolloutSpec,
)
from protocol.signing import generate_seed, public_key

NODE_EVENT_QUEUE = 100_000  # node transitions waiting for the events stream

log = logging.getLogger("fleetwave.coordinator")

# The cyclic garbage collector's thresholds in a coordinator process (CPython's: 700, 10, 10).
# A coordinator holds a node table, observed states and rollout records of its whole fleet, a
# million objects at 10,000 nodes, and churns through short-lived messages: with the defaults a
# 10,000-node bench spent 3.5 of its 22.5 CPU-s collecting, 2.1 s of it in 19 full collections
# of ~110 ms that each stalled the event loop; with these, 0.6 s and no full collection, and
# the peak RSS at 50,000 nodes unchanged (444.8 MiB). What it replaces step by step (records,
# states: Structs and dicts of plain values) is freed by reference counting; the cycles asyncio
# makes mostly die young, collected by the first generation's collections (every 10,000 net
# allocations); full collections still run, about fifty times more rarely.
GC_THRESHOLDS = (10_000, 50, 100)
SERVICE_NAME = "fleetwave-coordinator"
CONNECT_FOREVER = 10 * 365 * 24 * 3600.0
SETUP_RETRY_CAP = 5.0
PAUSED = 1.0  # a tick this late (or a wall clock this far off the monotonic one) is our pause
WRITE_VERBS = subjects.WRITE_VERBS
RETRY_LEAD = 1.0  # after a leadership that failed by itself (fences, a crash): wait, then stand by
FORWARD_TIMEOUT = HANDLER_TIMEOUT + 5.0
PACE_TICK = 0.5  # how often the leader looks whether the heartbeat pace is due (``core.pace``)
# Every coordinator looks this often whether its offline nodes are still registered (a get of
# each one's key in the nodes bucket, at most FORGOTTEN_MOST a look): one forgotten while it
# was away or cut off (its node.forgotten event is a core message) left its table, as a restart
# would have; a standby kept such a node offline for ever.
# What one node may send the coordinators: every coordinator hears every heartbeat, so one
# node sending large ones fast (a review: 1 MB each, 28 ms to decode, 40 a second) got them all
# cut off by the server as slow consumers. A real heartbeat is a few KB (100 services: ~30 KB),
# every 2 s or longer (the pace; 0.05 s at the shortest an agent takes, ``presence``); one over
# the size, or sooner than the gap after the node's last, is dropped before it is decoded.
HEARTBEAT_MAX = 128 * 1024
HEARTBEAT_MIN_GAP = 0.8 * MIN_INTERVAL  # below the shortest interval a node may announce
FORGOTTEN_EVERY = 10.0
FORGOTTEN_MOST = 500
CORDONS_READ = 2.0  # ``nodes`` waits this long for the cordons, then shows them as last read
# A standby that has not yet been up for one heartbeat interval has not heard every node: its
# ``nodes`` answer waits until then, this long at most, so that a warm coordinator's answer (the
# first whole one wins) comes first; a fresh standby showed a fleet all offline.
COLD_ANSWER_WAIT = 2.0
AGENT_BEAT = 2.0  # the agents' default --heartbeat-interval; the leader's pace may lengthen it

T = TypeVar("T")


def _version() -> str:
    try:
        return version("fleetwave")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


def tune_gc() -> None:
    """Set this process's garbage collector for a coordinator (``GC_THRESHOLDS``)."""
    gc.set_threshold(*GC_THRESHOLDS)


class Coordinator:
    """One coordinator for one fleet; owns its bus connection and every task it starts."""

    def __init__(
        self, nats_url: str, fleet: str, *, clock: Callable[[], float] = time.time,
        seed: bytes | None = None, replicas: int | None = None,
        creds: Creds | None = None, tls_ca: str | None = None, previous_key: str | None = None,
        notifier: Notifier | None = None, retention: Retention | None = None,
        events_limits: EventsLimits | None = None, lease_ttl: float = LEASE_TTL,
        heartbeat_rate: float = pace.DEFAULT_RATE,
    ) -> None:
        self.nats_url = nats_url
        self.lease_ttl = lease_ttl
        self.pacer = pace.Pacer(heartbeat_rate)
        self._newcomers = False  # registrations since the pace last went out
        self.retention = retention or Retention()
        self.events_limits = events_limits or EventsLimits()
        self._access: dict[str, Any] = {"creds": creds, "tls_ca": tls_ca}
        # With credentials the server proves every API caller (``protocol.subjects``).
        self.proven = creds is not None
        self.replicas = replicas  # of the fleet's streams; None: 3 on a cluster of 3+, else 1
        self.replicas_used = 0
        self.fleet_name = fleet
        self.table = Fleet()
        self.api = Api()
        self.api.add("nodes", NodesRequest, self._nodes)
        self.malformed = 0
        self.heartbeats = 0  # taken (decoded, from the node its subject names): /metrics
        self.bus: Bus | None = None
        self.ready = asyncio.Event()
        self._clock = clock
        # Node transitions: a fleet of 50,000 coming online at once decides 50,000 (the
        # default queue of 10,000 dropped 40,000 node.online); ~0.7 KB each while queued.
        self.events = EventPublisher(fleet, queue=NODE_EVENT_QUEUE, logger=log)
        self.lines = Lines()  # which node transitions are logged one by one (``core.lines``)
        # Bursts of registrations, the agents' reconnects: heard as a standby too, so that a
        # coordinator that takes over after one excuses its rollouts (``core.reconnects``)
        self.reconnects = Reconnects()
        self._mono = time.monotonic  # the bursts' clock (tests give a virtual one)
        self.notifier = notifier
        self._complained: set[tuple[str, str]] = set()
        self._complained_said = -60.0
        self._beat_at: dict[str, float] = {}  # when each node's last heartbeat was taken
        # The key that signs desired states; without a key file (tests) a throwaway one, which
        # agents trust only if told its public key (API verb ``key``).
        self.seed = seed if seed is not None else generate_seed()
        self.public_key = public_key(self.seed)
        # The key a signing-key rotation switched away from (``coordinator.core.rotation``): this
        # coordinator may take over a fleet it fenced, and re-signs the states it signed.
        self.previous_key = previous_key if previous_key != self.public_key else None
        self.id = new_id()
        self.started = clock()  # re-set once it hears the fleet (``_set_up``)
        self.runner: Runner | None = None  # while this coordinator leads
        self.lease: Lease | None = None
        self.store: RolloutStore | None = None  # the reader of a standby
        self.pauses = 0
        self._cordons: dict[str, Cordon] = {}  # as ``nodes`` last read them
        self.version = _version()
        # Observers (``coordinator.http.metrics``): of every bus call, and of every rollout event
        # as it is decided (``coordinator.runtime.executor.Observe``); set before ``run``.
        self.on_bus: BusObserver | None = None
        self.on_event: Observe | None = None
        self._repace = asyncio.Event()  # a rollout event: look at the pace now (``_observe``)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set."""
        bus = await _until(
            stop,
            Bus.connect(
                self.nats_url, self.fleet_name, name=SERVICE_NAME,
                connect_deadline=CONNECT_FOREVER, reconnect_forever=True, **self._access,
            ),
        )
        if bus is None:
            return
        bus.observer = self.on_bus
        self.bus = bus
        try:
            if not await _until(stop, self._set_up(bus)):
                return
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._tick_loop(), name="tick"),
                    tg.create_task(self.events.run(bus), name="events"),
                    tg.create_task(self._lead_loop(bus), name="leadership"),
                    tg.create_task(self._forgotten_loop(bus), name="forgotten"),
                ]
                self.ready.set()
                log.info(
                    "coordinator of fleet %r ready on %s (%d known nodes, R%d)",
                    self.fleet_name, redact(self.nats_url), len(self.table.nodes),
                    self.replicas_used,
                )
                log.info("signing key %s: start agents with --trust-key %s",
                         self.public_key, self.public_key)
                if self.previous_key is not None:
                    log.info("previous signing key %s (a rotation): takes over from it and "
                             "re-signs what it signed", self.previous_key)
                await first_set(stop, bus.gone)
                for t in tasks:
                    t.cancel()
            if bus.gone.is_set() and not stop.is_set():
                raise BusError("the connection to NATS was closed for good (see the line "
                               "before); this coordinator stops: its supervisor starts it again")
        except* ConfigError as group:  # e.g. another signing key: one line for the operator
            raise group.exceptions[0] from None
        finally:
            self._say_bursts(stopping=True)
            await bus.close()
            log.info("coordinator stopped")

    async def _set_up(self, bus: Bus) -> bool:
        f = self.fleet_name
        attempt = 0
        while True:
            try:
                setup = await bus.ensure_fleet(self.replicas, raise_existing=True,
                                               events=self.events_limits)
                self.replicas_used = setup.replicas
                for stream, had in setup.raised:
                    log.info("raised %s from %d to %d replicas", stream, had, setup.replicas)
                for stream in setup.moved:
                    log.warning("made %s again in memory (it was on disk, as fleetwave made it "
                                "before 2026-12-03); agents fill it at their next report",
                                stream)
                await self._load_known(bus)
                break
            except (TooFewServers, NoRoom, ServerTooOld):
                raise  # the operator's --replicas or --events-max-bytes, the server's version:
                # retrying cannot help
            except BusError as exc:
                cancelled_meanwhile()
                delay = min(SETUP_RETRY_CAP, 0.25 * 2**attempt)
                log.warning("cannot set up fleet %r yet (%s); retrying in %.1fs", f, exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
        await bus.subscribe(subjects.heartbeats(f), self._on_heartbeat)
        await bus.subscribe(subjects.registrations(f), self._on_register)
        # A node the leader forgot leaves every coordinator's table (a standby's too).
        await bus.subscribe(subjects.event(f, "node.forgotten"), self._on_forgotten)
        self._hearing()
        await self._check_key(bus)
        self.store = RolloutStore(bus, retention=self.retention)
        self.lease = Lease(bus, me=self.id, key=self.public_key, ttl=self.lease_ttl,
                           renew=min(RENEW_EVERY, self.lease_ttl / 5))
        self.api.max_reply = lambda: chunks.carried(bus.max_payload)
        RolloutsApi(
            _Current(self), public_key=self.public_key,
            resolve=lambda service, version: resolve_release(bus, service, version),
        ).register(self.api)
        CordonsApi(_Current(self), fleet=f, nodes=self.table.view,
                   forgotten=self.table.forget).register(self.api)
        self.api.add("leader", LeaderRequest, self._leader)
        # Reading verbs: every coordinator answers every request (no queue group) and the
        # caller takes the first answer, so a frozen coordinator cannot swallow a read. Writing
        # verbs: one coordinator of the queue group gets each; only the leader carries it out,
        # a standby forwards it to the leader's own subject.
        # Each on the subjects that name the caller, and on an older CLI's, which do not
        # (``protocol.subjects``; answered for caller "unknown", writes refused with credentials).
        writes: dict[str, tuple[str, Handler]] = {}
        for verb, (subject, local) in self.api.endpoints(f).items():
            legacy = subjects.legacy_api(f, verb)
            if verb in WRITE_VERBS:
                forwarding = self._forwarding(bus, verb, local)
                writes[verb] = (subject, forwarding)
                writes[f"{verb}-legacy"] = (legacy, forwarding)
                direct = self._direct(local)
                await bus.respond(subjects.coordinator_endpoint(f, self.id, verb), direct)
                await bus.respond(subjects.legacy_coordinator_api(f, self.id, verb), direct)
            else:
                await bus.respond(subject, local)
                await bus.respond(legacy, local)
        await bus.respond(ping_subject(f, self.id), _pong)
        await bus.serve(SERVICE_NAME, _version(), writes)
        return True

    # -- leadership -------------------------------------------------------------------------------

    async def _check_key(self, bus: Bus) -> None:
        """Refuse to join a fleet whose live leader signs with another key: agents trust the
        keys they were given, so this one's desired states would all be refused."""
        leader = await live_leader(bus)
        if leader is not None and leader.key and leader.key == self.previous_key:
            log.info("coordinator %s leads with the previous signing key %s: standing by to take "
                     "over with the new one", leader.holder, short(leader.key))
        elif leader is not None and leader.key and leader.key != self.public_key:
            raise ConfigError(
                f"coordinator {leader.holder} ({leader.host} pid {leader.pid}) leads fleet "
                f"{self.fleet_name!r} with signing key {leader.key[:12]}..., but this one has "
                f"{self.public_key[:12]}...; give every coordinator of a fleet the same key file "
                "(--key-file / FLEETWAVE_KEY_FILE; after 'fleetwave auth rotate-signing-key "
                "switch': the new one and KEY.previous), or stop the other one first")

    async def _lead_loop(self, bus: Bus) -> None:
        """Stand by, lead while the lease holds, stand by again; see the module docstring."""
        lease = self.lease
        assert lease is not None
        try:
            while True:
                held = await lease.acquire()
                # Renewed from now on, while the buckets are fenced and the desired states
                # re-signed (seconds at 50,000 nodes): standbys count the ttl from the take.
                holding = asyncio.create_task(lease.hold(), name="lease")
                try:
                    markers = await fence_markers(bus)
                    refusal = lead_refusal(markers, own=self.public_key,
                                           previous=self.previous_key)
                    if refusal is not None:
                        await _stopped(holding)
                        await lease.release()
                        raise ConfigError(f"fleet {self.fleet_name!r}: {refusal}")
                    fence = await write_fences(
                        bus, term=held.term, holder=self.id, now=self._clock(),
                        key=self.public_key, retired=retired_after(
                            markers, own=self.public_key, previous=self.previous_key))
                    if self.previous_key is not None:
                        await resign_desired(bus, Fenced(bus, fence), seed=self.seed,
                                             previous={self.previous_key})
                    if holding.done():
                        raise BusError(f"the lease was lost meanwhile: {_held_why(holding)}")
                except BusError as exc:  # Deposed too: a later term fenced first
                    log.warning("took the lease (term %d) but cannot fence the buckets (or "
                                "re-sign the desired states): %s", held.term, exc)
                    await _stopped(holding)
                    await lease.release()
                    await asyncio.sleep(RETRY_LEAD)
                    continue
                except BaseException:
                    await _stopped(holding)
                    raise
                runner = Runner(bus, seed=self.seed, fenced=Fenced(bus, fence),
                                nodes=lambda: self.table.view(services=False),
                                liveness=self.table.liveness,
                                liveness_changes=lambda: self.table.changes,
                                batchable=self.table.takes_batch_signatures,
                                unheard=self.table.unheard,
                                size=lambda: len(self.table.nodes),
                                reconnects=self.reconnects,
                                clock=self._clock, started=self.started,
                                startup_grace=pace.startup_grace(
                                    len(self.table.nodes), self.pacer.rate, STARTUP_GRACE),
                                observe=self._observe, retention=self.retention)
                self.runner = runner
                log.info("coordinator %s leads fleet %r (term %d)", self.id, self.fleet_name,
                         held.term)
                work = [_awaited(holding), runner.run(), self._pace_loop(bus),
                        deliveries.sweep_loop(bus), deliveries.guard(bus),
                        released.relay(bus)]
                if self.notifier is not None:  # only the leader notifies (its own task)
                    work.append(self.notifier.lead(bus, self._clock()))
                why, crashed = await _first_of(*work)
                self.runner = None
                lease.deposed()
                if runner.deposed is not None:
                    why = str(runner.deposed)
                log.error("coordinator %s stopped leading (term %d): %s", self.id, held.term,
                          why or "its runner ended")
                if crashed:
                    await asyncio.sleep(RETRY_LEAD)  # our own failure: no hot loop of terms
        finally:
            self.runner = None
            with contextlib.suppress(asyncio.CancelledError, BusError):
                async with asyncio.timeout(2.0):
                    await lease.release()

    def _forwarding(self, bus: Bus, verb: str,
                    local: Handler) -> Handler:
        """The handler of a writing verb: carried out here while leading, else forwarded to
        the leader's own subject, for the caller the request's subject names (only the
        coordinators' credentials may publish a subject naming another caller than their
        holder's: ``coordinator.auth.perms``)."""
        async def handler(subject: str, data: bytes) -> bytes:
            caller = self._caller(subject)
            if isinstance(caller, bytes):
                return caller
            if self.runner is not None:
                return await local(subject, data)
            leader = self.lease.leader if self.lease is not None else None
            if leader is None or leader.holder == self.id:
                return _unavailable(f"no coordinator leads fleet {self.fleet_name!r} right now; "
                                    f"a standby takes over within {self.lease_ttl + 1:g}s: "
                                    "try again")
            log.info("forwarding %s of %s to the leading coordinator %s", verb, caller,
                     leader.holder)
            try:
                return await bus.request(direct_api(self.fleet_name, leader.holder, caller, verb),
                                         data, timeout=FORWARD_TIMEOUT)
            except BusError as exc:
                return _unavailable(f"the leading coordinator ({leader.host} pid {leader.pid}) "
                                    f"did not take the request: {exc}; try again")
        return handler

    def _direct(self, local: Handler) -> Handler:
        """The handler of a writing verb sent to this coordinator's own subject (by the CLI, or
        forwarded by a standby)."""
        async def handler(subject: str, data: bytes) -> bytes:
            caller = self._caller(subject)
            if isinstance(caller, bytes):
                return caller
            if self.runner is None:
                return _unavailable(f"this coordinator no longer leads fleet {self.fleet_name!r}; "
                                    "try again")
            return await local(subject, data)
        return handler

    def _caller(self, subject: str) -> str | bytes:
        """Who a writing request's subject names, or the reply refusing it: a caller that is no
        name, or an older CLI's request (which names none) where credentials prove every
        caller, so that no change goes unattributed on a secure fleet."""
        try:
            caller = subjects.api_caller(subject)
        except ProtocolError as exc:
            return encode(ApiReply(ok=False, code="usage", error=str(exc)))
        if caller == subjects.UNKNOWN_CALLER and self.proven:
            return encode(ApiReply(ok=False, code="usage", error=(
                "this fleet records who asks for every change, and this fleetwave CLI names no "
                "one (it is older than the coordinator): upgrade fleetwave on this host")))
        return caller

    async def _leader(self, req: LeaderRequest, caller: str) -> dict[str, Any]:
        lease = self.lease.leader if self.lease is not None else None
        out: dict[str, Any] = {"you": self.id, "leading": self.runner is not None}
        if lease is not None:
            out.update(holder=lease.holder, term=lease.term, host=lease.host, pid=lease.pid,
                       since=lease.since, renewed=lease.renewed, ttl=lease.ttl, key=lease.key)
        return out

    def _hearing(self) -> None:
        """From now on this coordinator hears the fleet (it can have waited minutes for its
        bus): the startup grace, the runner's and the node table's, counts from here; until
        it is over, silence is no evidence yet."""
        self.started = self._clock()
        self.table.listen(self.started, pace.startup_grace(
            len(self.table.nodes), self.pacer.rate, STARTUP_GRACE))

    async def _load_known(self, bus: Bus) -> None:
        for entry in await bus.kv_entries(subjects.nodes_bucket(self.fleet_name)):
            try:
                info = shared(decode(NodeInfo, entry.value or b""))
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
        now = self._clock()
        if 0.0 <= now - self._beat_at.get(node, -HEARTBEAT_MIN_GAP) < HEARTBEAT_MIN_GAP:
            self.malformed += 1  # too soon after its last: not even decoded
            return  # (a wall clock stepped back drops none: the gap is negative then)
        self._beat_at[node] = now
        try:
            if len(data) > HEARTBEAT_MAX:
                # Refused before it is decoded: a review's node sent 1 MB heartbeats as fast
                # as it could, each 28 ms to decode, until the server cut the coordinator off
                # as a slow consumer (and its lease lapsed: every coordinator hears them all).
                raise ProtocolError(f"a heartbeat of {len(data)} bytes (at most "
                                    f"{HEARTBEAT_MAX}): not decoded")
            hb = shared(decode(Heartbeat, data))  # kept per node: see ``shared``
            if hb.node != node:
                raise ProtocolError(f"heartbeat on {subject} claims to be from node {hb.node!r}")
        except ProtocolError as exc:
            self._complain(node, "heartbeat", str(exc))
            return
        self.heartbeats += 1
        self._emit(self.table.heartbeat(hb, self._clock()))

    async def _on_register(self, subject: str, data: bytes) -> None:
        # The subject names the sender (the server lets a node publish only on its own), so a
        # registration is believed for that node alone: never for another, never for a new one.
        node = subject.rsplit(".", 1)[-1]
        try:
            info = shared(decode(NodeInfo, data))
            subjects.check_name("node", info.id)
            if info.id != node:
                raise ProtocolError(f"registration on {subject} claims to be node {info.id!r}")
        except ProtocolError as exc:
            self._complain(node, "registration", str(exc))
            return
        now = self._clock()
        transitions = self.table.register(info, now)
        self._newcomers = True  # it beats at its own interval until it hears the pace
        # An agent registers within one heartbeat of its connect or reconnect: over that (and
        # the agents' reconnect backoff) a burst of registrations is many agents reconnecting.
        window = RECONNECT_CAP + self._beat()
        if (self.reconnects.note(now, len(self.table.nodes), window, node)
                and self.reconnects.began == now):
            self._repace.set()  # a burst begins: the pace says so at once (``Pace.burst``)
        # A node coming online says so in its transition's line ("online (registered)"): one
        # line a node, not two, when a fleet of 50,000 registers at a coordinator's start; one
        # already online (its agent reconnected) in a line of its own, in bursts (``core.lines``).
        alone = not transitions and self.lines.admit("node.registered", self._mono())
        log.log(logging.INFO if alone else logging.DEBUG, "node %s registered (labels %s)",
                info.id, info.labels)
        self._emit(transitions)

    async def _forgotten_loop(self, bus: Bus) -> None:
        """Drop offline nodes whose registration is gone from the nodes bucket: forgotten
        (``fleetwave forget``, or purged by hand) while this coordinator did not hear it."""
        bucket = subjects.nodes_bucket(self.fleet_name)
        while True:
            await asyncio.sleep(FORGOTTEN_EVERY)
            for node in self.table.offline_ids(FORGOTTEN_MOST):
                try:
                    entry = await bus.kv_get(bucket, node)
                except BusError:
                    break  # the bus is away: the next look asks again
                if entry is None and self.table.forget(node):
                    log.info("node %s forgotten: its registration is gone from the nodes "
                             "bucket (forgotten while this coordinator did not hear it)", node)

    async def _on_forgotten(self, subject: str, data: bytes) -> None:
        try:
            events = received_all(self.fleet_name, subject, data)
        except ProtocolError as exc:
            self._complain("events", "node.forgotten", str(exc))
            return
        for event in events:
            if event.kind == "node.forgotten" and event.node and self.table.forget(event.node):
                log.info("node %s forgotten (by %s)", event.node, event.who or "?")

    async def _nodes(self, req: NodesRequest, caller: str) -> list[NodeView] | dict[str, Any]:
        if self.runner is None:  # a standby: a cold one answers last (COLD_ANSWER_WAIT)
            beat = self._beat()
            warm = self.started + beat
            wait = min(warm - self._clock(), COLD_ANSWER_WAIT)
            if wait > 0:
                await asyncio.sleep(wait)
        await self._read_cordons()
        answer: list[NodeView] | dict[str, Any]
        if req.max_nodes > 0:  # ``NodesRequest.max_nodes``: offline and cordoned rows first
            rows, count, online, unheard = self.table.page(req.selector, req.max_nodes,
                                                           self._cordons)
            answer = {"nodes": rows, "node_count": count, "online": online, "unheard": unheard}
        else:
            rows = answer = self.table.view(req.selector)
        for row in rows:
            row.cordon = self._cordons.get(row.id)
        return answer

    async def _read_cordons(self) -> None:
        """The cordons as they are now; as last read when the bucket cannot be read."""
        if self.bus is not None:  # (always, once serving: the API is served after connecting)
            try:
                async with asyncio.timeout(CORDONS_READ):
                    self._cordons = await read_cordons(self.bus)
            except (BusError, TimeoutError) as exc:
                # The node table answers without JetStream; the cordons as last read do too.
                log.warning("cannot read the cordons (%s); showing them as last read", exc)

    def _complain(self, node: str, kind: str, message: str) -> None:
        self.malformed += 1
        if (node, kind) in self._complained:  # once per source: a flood must not fill the log
            return
        if len(self._complained) >= COMPLAINED_MOST:
            # The sources are names the senders choose (a review's junk on 2,000 subjects gave
            # 2,000 lines and a set that grew for ever): past the bound, a count a minute.
            now = time.monotonic()
            if now - self._complained_said >= 60.0:
                self._complained_said = now
                log.warning("ignored %d malformed messages in all so far (from more sources "
                            "than are named one by one)", self.malformed)
            return
        self._complained.add((node, kind))
        log.warning("ignored malformed %s from %s: %s", kind, node, message)

    # -- outputs ----------------------------------------------------------------------------------

    def _emit(self, transitions: list[Transition]) -> None:
        """Log the node table's transitions, and record them as events unless another
        coordinator leads (every coordinator sees the same heartbeats: the leader's copy is the
        audit log's; before any leader is known, as at the start, ours is recorded)."""
        if not transitions:
            return
        leader = self.lease.leader if self.lease is not None else None
        mono, now = self._mono(), self._clock()
        for t in transitions:
            log.log(logging.INFO if self.lines.admit(t.kind, mono) else logging.DEBUG,
                    "%s", t.message)
            if leader is not None and leader.holder != self.id:
                continue
            event = Event(
                id=event_id(), time=now, fleet=self.fleet_name, kind=t.kind,
                message=t.message, node=t.node, data=dict(t.data),
                who=subjects.COORDINATOR_CALLER,
            )
            self.events.put(event)

    async def _tick_loop(self) -> None:
        deaf = False
        mono, wall = time.monotonic(), self._clock()
        while True:
            last_mono, last_wall = mono, wall
            mono, wall = time.monotonic(), self._clock()
            late = mono - last_mono - TICK
            if late > PAUSED or abs((wall - last_wall) - (mono - last_mono)) > PAUSED:
                # Our own pause (a stalled loop, SIGSTOP, a clock jump): the silence we did not
                # hear was ours. Judge liveness on heartbeats that arrive from now on.
                self.pauses += 1
                log.warning("this coordinator was paused for %.1fs (or its clock jumped); "
                            "nodes are judged on fresh heartbeats", max(late, 0.0))
                self.table.excuse(wall)
            if self.bus is not None and not self.bus.connected:
                deaf = True  # nothing reaches us: the nodes' silence is not theirs
            else:
                if deaf:
                    # Agents reconnect with jittered backoff of up to RECONNECT_CAP after the
                    # broker is back; until then their silence is still no evidence.
                    self.table.excuse(self._clock() + RECONNECT_CAP)
                    deaf = False
                self._emit(self.table.tick(self._heard_until()))
            self._say_bursts()
            await asyncio.sleep(TICK)

    def _say_bursts(self, *, stopping: bool = False) -> None:
        """Log the summaries of the node transitions held back (``core.lines``): those whose
        window has closed, or, ``stopping``, all of them (a partition's offline count must not
        die with the process)."""
        for line in self.lines.due(self._mono(), every=stopping):
            log.info("%s", line)

    def _observe(self, event: Event, record: RolloutRecord | None) -> None:
        """Every rollout event as it is decided: the pace is looked at again at once (a rollout
        that reads counters starting, pausing or ending changes ``_reading``), and the
        ``on_event`` hook (``--http``'s metrics) is told."""
        if event.kind.startswith("rollout."):
            self._repace.set()
        if self.on_event is not None:
            self.on_event(event, record)

    def _reading(self) -> list[str] | None:
        """The services whose rollouts read their routers' counters now (``pace.reads_now``); None
        until the runner has resumed every live rollout (a leader that has just taken over
        would name none: its agents keep what the last leader told them meanwhile)."""
        if self.runner is None or not self.runner.ready.is_set():
            return None
        return [d.rollout.record.spec.service for d in list(self.runner.drivers.values())
                if pace.reads_now(d.rollout.record)]

    async def _pace_loop(self, bus: Bus) -> None:
        """The leader's pace of the fleet's heartbeats (``core.pace``), for as long as it leads."""
        warned = False
        while True:
            self._repace.clear()  # before looking: an event from now on wakes the next look
            nodes = self.table.beating(self._clock())  # not those long offline: no beats
            newcomers = self._newcomers
            due = self.pacer.due(time.monotonic(), nodes, newcomers, self._reading(),
                                 burst=self.reconnects.under_way(self._clock()))
            if due is not None:
                moved = self.pacer.moved(due)
                # Told by this pace: those registered until now. One who registers while it
                # goes out is a newcomer for the next (cleared after the publish, it waited
                # for the next REPEAT, 30 s, where it waits FIRST_PACE_WAIT at most).
                self._newcomers = False
                try:
                    await bus.publish(subjects.pace(self.fleet_name), encode(due))
                except BusError as exc:  # disconnected: the next turn tries again
                    self._newcomers = self._newcomers or newcomers
                    if not warned:
                        log.warning("cannot publish the heartbeat pace: %s", exc)
                    warned = True
                else:
                    warned = False
                    if (grace := self.pacer.grace(due)) > 0:
                        self.table.excuse(self._clock() + grace, deaf=False)
                    self.pacer.published(time.monotonic(), due)
                    if moved and nodes:
                        log.info("heartbeat pace: %d nodes at most %g heartbeats/s: agents beat "
                                 "every %gs, or at their own --heartbeat-interval if longer",
                                 nodes, due.rate, due.interval)
            with contextlib.suppress(TimeoutError):
                await bounded(self._repace.wait(), PACE_TICK)

    def _beat(self) -> float:
        """How often the fleet's agents beat: their default, or the leader's pace if longer."""
        return max(AGENT_BEAT, pace.interval(len(self.table.nodes), self.pacer.rate))

    def _heard_until(self) -> float:
        """The wall time up to which this coordinator has heard the bus: when the last lease
        call the server answered was sent (a node's silence after it may be our own deafness)."""
        now = self._clock()
        if self.lease is None:
            return now
        return now - max(0.0, time.monotonic() - self.lease.heard)


class _Current:
    """The rollout verbs' runner (``coordinator.api.rollouts.Runner``): the runner of this
    leadership, or, on a standby, the persisted records (writes are forwarded before here)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator
        self.fleet = coordinator.fleet_name

    def _runner(self) -> Runner:
        if self._c.runner is None:
            raise RemoteError(f"this coordinator does not lead fleet {self.fleet!r}; try again",
                              "unavailable")
        return self._c.runner

    async def deploy(self, spec: RolloutSpec, release: ReleaseRef, who: str, *,
                     undo: bool = False) -> RolloutRecord:
        return await self._runner().deploy(spec, release, who, undo=undo)

    async def request(self, rollout_id: str, event: EngineEvent) -> RolloutRecord:
        return await self._runner().request(rollout_id, event)

    async def get(self, rollout_id: str) -> RolloutRecord | None:
        if self._c.runner is not None:
            return await self._c.runner.get(rollout_id)
        assert self._c.store is not None
        return await self._c.store.load(rollout_id)

    async def find(self, rollout_id: str, *, whole: bool = True,
                   seen: bool = False) -> RolloutRecord | SummarisedRollout | None:
        if self._c.runner is not None:
            return await self._c.runner.find(rollout_id, whole=whole, seen=seen)
        assert self._c.store is not None
        found = await self._c.store.find(rollout_id, whole=whole, seen=seen)
        return found[0] if found is not None else None

    async def latest(self, *, seen: bool = False) -> RolloutRecord | SummarisedRollout | None:
        if self._c.runner is not None:
            return await self._c.runner.latest(seen=seen)
        assert self._c.store is not None
        rid = await self._c.store.latest()
        return await self.find(rid, seen=seen) if rid else None

    async def history(self, service: str = "", limit: int = 50) -> list[RolloutSummary]:
        if self._c.runner is not None:
            return await self._c.runner.history(service, limit)
        assert self._c.store is not None
        if service:
            return (await self._c.store.index(service))[:limit]
        return newest((await self._c.store.indexes()).values(), limit)

    async def records(self) -> list[RolloutRecord]:
        if self._c.runner is not None:
            return await self._c.runner.records()
        assert self._c.store is not None
        return await self._c.store.records()

    def active(self, service: str) -> LiveRollout | None:
        return self._c.runner.active(service) if self._c.runner is not None else None

    async def cordon(self, nodes: list[str], *, drain: bool, grace: float,
                     who: str) -> list[dict[str, Any]]:
        return await self._runner().cordon(nodes, drain=drain, grace=grace, who=who)

    async def uncordon(self, nodes: list[str], *, who: str) -> list[dict[str, Any]]:
        return await self._runner().uncordon(nodes, who=who)

    async def forget(self, nodes: list[str], *, who: str) -> list[dict[str, Any]]:
        return await self._runner().forget(nodes, who=who)

    def refused(self, verb: str, spec: RolloutSpec, who: str, reason: str, code: str) -> None:
        if self._c.runner is not None:  # a standby forwarded the write before it got here
            self._c.runner.refused(verb, spec, who, reason, code)


def _unavailable(message: str) -> bytes:
    return encode(ApiReply(ok=False, code="unavailable", error=message))


async def _pong(subject: str, data: bytes) -> bytes:
    return b"pong"


async def _awaited(task: asyncio.Task[T]) -> T:
    """``task``'s result, as a coroutine (``_first_of`` runs coroutines)."""
    return await task


async def _stopped(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _held_why(task: asyncio.Task[str]) -> str:
    """Why a finished ``Lease.hold`` ended."""
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return f"{type(exc).__name__}: {exc}" if exc is not None else task.result()


async def _first_of(*work: Coroutine[Any, Any, Any],
                    teardown: float = TEARDOWN) -> tuple[str, bool]:
    """Run ``work`` until the first of it ends; cancel the rest; the first's result as text,
    and whether an exception ended it."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await stop_all(tasks, teardown, what="the leadership's work")
    first = next(t for t in tasks if t in done)
    if first.cancelled():
        return "cancelled", True
    if (exc := first.exception()) is not None:
        log.error("leadership ended by an error", exc_info=exc)
        return f"{type(exc).__name__}: {exc}", True
    return str(first.result() or ""), False


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

