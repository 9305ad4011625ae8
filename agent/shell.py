"""The service manager: the async shell around the pure reconciler.

Theory of operation. ``ServiceManager.run`` owns every task in one TaskGroup:

- *watch*: ``bus.watch(desired, "<node>.*")`` (it survives reconnects); each value is a signed
  envelope, verified against the trusted keys, the node and the service, and accepted only if its
  generation is newer than the accepted one. Anything else is refused with an ``agent.refused``
  event saying why, and changes nothing. A full re-read every ``REREAD`` seconds is a safety net.
- *reconcile*: on every change (a wake: new desired state, slot event, fetch done, fresh router
  stats) and, as a safety net, every ``tick`` seconds while something is in motion or every
  ``IDLE_TICK`` seconds once every service is settled (``settled``: no timer of the reconciler can
  fire), per service, build the local view, call ``reconcile`` and carry out its actions; then
  write the state file if it changed and the ObservedState if it changed (and every
  ``OBSERVE_EVERY`` seconds, with the router's stats). An idle agent thus passes once per stats
  fetch instead of five times a second.
  Actions that take long (fetch, stop, fail) run as their own tasks so that one slow service never
  holds the others; the view says "fetching"/"stopping" meanwhile, so the reconciler waits.
- *runners*: one ``SlotRunner.run`` task per slot process; cancelling them leaves the processes
  alive (they outlive the agent by design).
- *events*: slot and refusal events are queued and published to the events stream in order.

On start the state file is loaded: accepted envelopes are verified again, slot processes are
adopted by pid + create_time, and each router is found again on its control socket. Then the loop
converges from there: nothing is started twice.

Every await on the bus or a router is bounded (the bus and RouterClient have timeouts; the rest
uses ``asyncio.timeout``). Bus errors are weather: logged once and retried on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from agent.reconcile import (
    Action,
    Drain,
    Fail,
    Fetch,
    FetchError,
    ReleaseInfo,
    Resume,
    Route,
    ServiceView,
    SlotView,
    Start,
    Stop,
    assess,
    reconcile,
)
from agent.releases import ReleaseCache, ReleaseError
from agent.router.control import (
    MAX_SOCKET_PATH,
    RouterClient,
    RouterConfig,
    RouterRunning,
    RouterUnavailable,
    Upstream,
    start_router,
)
from agent.slots import SlotRunner, SlotSpec, find_orphans, free_port, stop_orphans
from agent.state import AgentState, ServiceRecord, SlotRecord, load_state, save_state
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.errors import BusError, ProtocolError
from protocol.manifest import MANIFEST_NAME, Manifest, load_manifest
from protocol.messages import (
    SLOTS,
    DesiredState,
    Event,
    MirrorSpec,
    ObservedState,
    ReleaseRef,
    RouterStats,
    ServiceSummary,
    SignedEnvelope,
    SlotProcess,
    SlotStatus,
)
from protocol.signing import verify

log = logging.getLogger("fleetwave.agent.services")

TICK = 0.2
IDLE_TICK = 2.0  # all settled: wakes bring every change; this only guards against a missed one
REREAD = 30.0
OBSERVE_EVERY = 5.0
STATS_EVERY = 2.0
BUS_TIMEOUT = 10.0
PRUNE_EVERY = 60.0


@dataclass
class Release:
    path: Path
    manifest: Manifest
    info: ReleaseInfo
    ref: ReleaseRef


@dataclass
class Service:
    """Everything mutable the manager holds for one service."""

    name: str
    envelope: SignedEnvelope | None = None
    desired: DesiredState | None = None
    # The newest generation this node ever accepted, kept even when the remembered envelope can
    # no longer be verified (a rotated key): anything not newer is a replay.
    floor: int = 0
    runners: dict[str, SlotRunner] = field(default_factory=dict)
    releases: dict[str, Release] = field(default_factory=dict)
    fetching: set[str] = field(default_factory=set)
    fetch_errors: dict[str, FetchError] = field(default_factory=dict)
    applied_weights: dict[str, int] = field(default_factory=dict)
    applied_mirror: MirrorSpec | None = None
    observed_generation: int = 0
    router: RouterClient | None = None
    router_pid: int | None = None
    router_stats: RouterStats | None = None
    last_observed: bytes = b""
    last_observed_at: float = 0.0
    pending_observed: ObservedState | None = None
    router_error: str = ""  # why the last configure failed; reported until one succeeds
    # Failed slots remembered from the state file (no process): so that a restarted agent does
    # not retry a generation that already failed.
    idle: dict[str, SlotView] = field(default_factory=dict)

    def view(self) -> ServiceView:
        slots = {s: v for s, v in self.idle.items() if s not in self.runners}
        for s, r in self.runners.items():
            slots[s] = SlotView(
                slot=s,
                status=r.status,
                digest=r.spec.digest,
                version=r.spec.manifest.version,
                since=r.since,
                restarts=r.restarts,
                reason=r.reason,
                generation=r.spec.generation,
                last_exit=r.last_exit,
            )
        return ServiceView(
            service=self.name,
            slots=slots,
            releases={d: rel.info for d, rel in self.releases.items()},
            fetching=frozenset(self.fetching),
            fetch_errors=dict(self.fetch_errors),
            applied_weights=dict(self.applied_weights),
            applied_mirror=self.applied_mirror,
            observed_generation=self.observed_generation,
        )


# Slot statuses with a reconciler timer running (start timeout, drain time) or an end to await.
_MOVING = frozenset({"starting", "draining", "stopping", "fetching"})


def settled(view: ServiceView) -> bool:
    """Whether no timer of ``reconcile`` can fire for this view: nothing fetching or waiting to
    retry a fetch, no slot starting, draining or stopping. A settled service changes only through
    a wake (desired state, slot event, router stats), so the loop may sleep for ``IDLE_TICK``."""
    return (not view.fetching and not view.fetch_errors
            and not any(v.status in _MOVING for v in view.slots.values()))


def router_socket(data_dir: Path, service: str) -> Path:
    """``<data_dir>/run/router-<service>.sock``; when that path is too long for a unix socket
    (about 100 bytes), a short one in the temp dir derived from the data dir, so that a restarted
    agent finds the same router again."""
    path = data_dir / "run" / f"router-{service}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    tag = hashlib.sha256(os.fsencode(data_dir.resolve())).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fleetwave-{tag}" / f"router-{service}.sock"


def _private_dir(path: Path) -> None:
    """Create ``path`` 0700 if needed and refuse it unless it is ours and a real directory (a
    shared temp dir is where another user could have planted a symlink)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RouterUnavailable(
            f"{path} is not a private directory of this user; remove it or use a shorter --data-dir"
        )


class ServiceManager:
    """Runs this node's services as its desired states say; see the module docstring."""

    def __init__(
        self,
        *,
        bus: Bus,
        fleet: str,
        node: str,
        data_dir: Path,
        bind_host: str,
        trusted_keys: Collection[str],
        tick: float = TICK,
        idle_tick: float = IDLE_TICK,
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        self.node = node
        self.data_dir = Path(data_dir)
        self.bind_host = bind_host
        self.trusted_keys = frozenset(trusted_keys)
        self.tick = tick
        self.idle_tick = idle_tick
        self.state_path = self.data_dir / "state.json"
        self.cache = ReleaseCache(self.data_dir / "releases")
        self.services: dict[str, Service] = {}
        self.refused = 0
        self._refused_values: dict[str, bytes] = {}
        self._wake = asyncio.Event()
        self._observed_dirty = asyncio.Event()
        self._pruned_at = 0.0
        self._events: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
        self._tg: asyncio.TaskGroup | None = None
        self._saved = b""
        self._bus_failing = False

    # -- daemon interface -------------------------------------------------------------------------

    async def run(self) -> None:
        """Adopt what the state file remembers, then converge for ever (until cancelled)."""
        adopted = await self._restore()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for runner in adopted:
                    tg.create_task(
                        runner.run(), name=f"slot-{runner.spec.service}-{runner.spec.slot}"
                    )
                tg.create_task(self._watch_loop(), name="desired-watch")
                tg.create_task(self._reread_loop(), name="desired-reread")
                tg.create_task(self._events_loop(), name="events")
                tg.create_task(self._stats_loop(), name="router-stats")
                tg.create_task(self._observed_loop(), name="observed")
                await self._reconcile_loop()
        finally:
            self._tg = None
            with contextlib.suppress(OSError):
                self._save_now()

    def summary(self) -> tuple[list[ServiceSummary], list[SlotProcess]]:
        """Services and slot processes for the next heartbeat."""
        services: list[ServiceSummary] = []
        procs: list[SlotProcess] = []
        for svc in self.services.values():
            healthy = [r for r in svc.runners.values() if r.status == "healthy"]
            serving = sorted(healthy, key=lambda r: -svc.applied_weights.get(r.spec.slot, 0))
            services.append(
                ServiceSummary(
                    service=svc.name,
                    version=serving[0].spec.manifest.version if serving else "",
                    healthy=bool(serving),
                    generation=svc.desired.generation if svc.desired else 0,
                    observed_generation=svc.observed_generation,
                )
            )
            for r in svc.runners.values():
                if r.status in ("stopped", "failed") and not r.alive:
                    continue
                rss, cpu = r.figures()
                procs.append(
                    SlotProcess(
                        service=svc.name,
                        slot=r.spec.slot,
                        version=r.spec.manifest.version,
                        pid=r.pid,
                        rss=rss,
                        cpu_percent=cpu,
                        restarts=r.restarts,
                    )
                )
        return services, procs

    # -- desired states ---------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        bucket = subjects.desired_bucket(self.fleet)
        attempt = 0
        while True:
            try:
                async for entry in self.bus.watch(bucket, subjects.node_keys(self.node)):
                    attempt = 0
                    if entry is None or entry.value is None:
                        continue  # end of the initial contents, or a deletion: nothing to accept
                    await self._offer(entry.key, entry.value)
            except BusError as exc:
                # Typically: no coordinator has created the fleet's buckets yet. Wait for it.
                if attempt == 0:
                    log.warning("cannot watch desired states yet (%s); retrying", exc)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
                attempt += 1

    async def _reread_loop(self) -> None:
        bucket = subjects.desired_bucket(self.fleet)
        while True:
            await asyncio.sleep(REREAD)
            try:
                async with asyncio.timeout(BUS_TIMEOUT):
                    entries = await self.bus.kv_entries(bucket, subjects.node_keys(self.node))
            except (BusError, TimeoutError) as exc:
                log.warning("cannot re-read desired states: %s", exc or "timed out")
                continue
            for e in entries:
                if e.value is not None:
                    await self._offer(e.key, e.value)

    async def _offer(self, key: str, value: bytes) -> None:
        """Accept a desired state if it is genuine, meant for us and newer; else refuse it."""
        service = key.split(".", 1)[1] if "." in key else key
        if self._refused_values.get(key) == value:
            return  # refused already (the re-read sees it again): one event is enough
        svc = self.services.get(service)
        try:
            env = decode(SignedEnvelope, value)
        except ProtocolError as exc:
            self._refused_values[key] = value
            await self._refuse(service, f"malformed desired state at {key}: {exc}")
            return
        if svc is not None and svc.envelope is not None and env == svc.envelope:
            return  # the one we already run (a re-read or a restarted watch): not a replay
        current = 0
        if svc is not None:
            current = max(svc.floor, svc.desired.generation if svc.desired else 0)
        try:
            desired = verify(
                env,
                self.trusted_keys,
                fleet=self.fleet,
                node=self.node,
                service=service,
                min_generation=current,
            )
        except ProtocolError as exc:
            self._refused_values[key] = value
            await self._refuse(service, str(exc), generation=env.generation)
            return
        if svc is None:
            svc = self.services[service] = Service(name=service)
        svc.envelope, svc.desired = env, desired
        log.info("accepted desired state of %s generation %d", service, desired.generation)
        self._wake.set()

    async def _refuse(self, service: str, reason: str, generation: int = 0) -> None:
        self.refused += 1
        log.warning("refused desired state for %s: %s", service, reason)
        self._event("agent.refused", service, reason, generation=generation)

    # -- the loop ---------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        busy = True
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick if busy else self.idle_tick)
            self._wake.clear()
            busy = False
            for svc in list(self.services.values()):
                try:
                    view = svc.view()
                    actions = reconcile(svc.desired, view, time.time())
                    busy = busy or bool(actions) or not settled(view)
                    for action in actions:
                        await self._do(svc, action)
                    await self._observe(svc)
                except Exception:
                    # A bug in one service's pass must not stop the others (nor the agent);
                    # the next pass tries again from the view, which is level-triggered.
                    busy = True
                    log.exception("reconciling %s failed; retrying on the next pass", svc.name)
            try:
                await self._save()
            except OSError as exc:
                log.error("cannot write the agent state %s: %s", self.state_path, exc)
            self._prune()

    def _prune(self) -> None:
        """Drop unpacked releases nobody runs or wants, keeping the cache's recent few."""
        now = time.time()
        if now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        in_use: set[str] = set()
        for svc in self.services.values():
            in_use |= {r.spec.digest for r in svc.runners.values()}
            in_use |= set(svc.fetching)
            if svc.desired is not None:
                in_use |= {ref.digest for ref in svc.desired.slots.values()}
        try:
            self.cache.prune(in_use)
        except OSError as exc:
            log.warning("cannot prune the release cache: %s", exc)

    async def _do(self, svc: Service, action: Action) -> None:
        tg = self._tg
        assert tg is not None  # only called from inside run()
        match action:
            case Fetch(release=ref):
                svc.fetching.add(ref.digest)
                tg.create_task(self._fetch(svc, ref), name=f"fetch-{ref.digest[:16]}")
            case Start(slot=slot, release=ref, generation=gen):
                self._start(svc, slot, ref, gen)
            case Fail(slot=slot, reason=reason):
                runner = svc.runners[slot]
                tg.create_task(runner.fail(reason), name=f"fail-{svc.name}-{slot}")
            case Route(weights=weights, mirror=mirror):
                await self._route(svc, dict(weights), mirror)
            case Drain(slot=slot):
                svc.runners[slot].drain()
                self._event("slot.draining", svc.name, f"slot {slot} drains", slot=slot)
            case Resume(slot=slot):
                svc.runners[slot].resume()
            case Stop(slot=slot, timeout=timeout):
                runner = svc.runners[slot]
                runner.status = "stopping"  # at once, so the next pass waits for it
                tg.create_task(runner.stop(timeout), name=f"stop-{svc.name}-{slot}")

    async def _fetch(self, svc: Service, ref: ReleaseRef) -> None:
        try:
            path = await self.cache.ensure(self.bus, self.fleet, ref)
            manifest = await asyncio.to_thread(load_manifest, path / MANIFEST_NAME)
            if manifest.name != svc.name:
                raise ReleaseError(f"bundle is for service {manifest.name!r}, not {svc.name!r}")
        except (ReleaseError, ProtocolError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            svc.fetch_errors[ref.digest] = FetchError(reason, time.time())
            log.warning("cannot fetch %s %s: %s", ref.service, ref.version, reason)
            self._event("release.failed", svc.name, reason, version=ref.version)
        else:
            svc.fetch_errors.pop(ref.digest, None)
            info = ReleaseInfo(
                ref.digest,
                port=manifest.port,
                start_timeout=manifest.health.start_timeout,
                drain=manifest.stop.drain,
                stop_timeout=manifest.stop.timeout,
            )
            svc.releases[ref.digest] = Release(path, manifest, info, ref)
        finally:
            svc.fetching.discard(ref.digest)
            self._wake.set()

    def _start(self, svc: Service, slot: str, ref: ReleaseRef, generation: int) -> None:
        rel = svc.releases[ref.digest]
        used = frozenset(
            r.spec.port for r in svc.runners.values() if r.spec.port is not None and r.alive
        )
        port = free_port("127.0.0.1", used) if rel.manifest.port is not None else None
        spec = SlotSpec(
            service=svc.name,
            slot=slot,
            node=self.node,
            release_dir=rel.path,
            manifest=rel.manifest,
            digest=ref.digest,
            port=port,
            log_dir=self.data_dir / "logs",
            generation=generation,
        )
        runner = SlotRunner(spec, self._on_slot)
        svc.runners[slot] = runner
        svc.idle.pop(slot, None)
        assert self._tg is not None
        self._tg.create_task(runner.run(), name=f"slot-{svc.name}-{slot}")
        log.info("starting %s %s in slot %s on port %s", svc.name, ref.version, slot, port)

    def _on_slot(self, runner: SlotRunner, kind: str, message: str) -> None:
        spec = runner.spec
        self._event(
            kind,
            spec.service,
            message,
            slot=spec.slot,
            version=spec.manifest.version,
            pid=runner.pid,
            last_exit=runner.last_exit,
            restarts=runner.restarts,
        )
        if kind == "slot.started":
            # Record the new pid at once: a kill before the end of this pass must not leave a
            # process the restarted agent knows nothing of (find_orphans is the last resort).
            try:
                self._save_now()
            except OSError as exc:
                log.warning("cannot save the state file after starting a slot: %s", exc)
        self._wake.set()

    # -- the router -------------------------------------------------------------------------------

    def _socket(self, service: str) -> Path:
        return router_socket(self.data_dir, service)

    async def _route(
        self, svc: Service, weights: dict[str, int], mirror: MirrorSpec | None
    ) -> None:
        port = self._public_port(svc)
        if port is None:
            return
        upstreams = [
            Upstream(
                slot=s,
                host="127.0.0.1",
                port=r.spec.port,
                weight=weights.get(s, 0),
                healthy=r.status in ("healthy", "draining"),
            )
            for s, r in sorted(svc.runners.items())
            if r.spec.port is not None
            and r.status in ("starting", "healthy", "unhealthy", "draining")
        ]
        drain = max((r.spec.manifest.stop.drain for r in svc.runners.values()), default=2.0)
        cfg = RouterConfig(
            service=svc.name,
            listen_host=self.bind_host,
            listen_port=port,
            upstreams=upstreams,
            mirror=mirror,
            drain_timeout=max(drain, 1.0),
        )
        try:
            client = await self._router(svc)
            svc.router_stats = await client.configure(cfg)
            svc.router_stats.time = time.time()
        except RouterUnavailable as exc:
            if svc.router_error != str(exc):
                log.warning("router of %s: %s", svc.name, exc)
            svc.router, svc.router_error = None, str(exc)
            return
        svc.router_error = ""
        svc.applied_weights = {s: w for s, w in weights.items() if w > 0}
        svc.applied_mirror = mirror
        log.info(
            "router of %s: weights %s mirror %s",
            svc.name,
            svc.applied_weights,
            mirror.slot if mirror else None,
        )

    def _public_port(self, svc: Service) -> int | None:
        refs = list(svc.desired.slots.values()) if svc.desired else []
        for ref in refs:
            rel = svc.releases.get(ref.digest)
            if rel is not None and rel.manifest.port is not None:
                return rel.manifest.port
        for r in svc.runners.values():
            if r.spec.manifest.port is not None:
                return r.spec.manifest.port
        return None

    async def _router(self, svc: Service) -> RouterClient:
        if svc.router is not None:
            return svc.router
        sock = self._socket(svc.name)
        if not sock.is_relative_to(self.data_dir):
            _private_dir(sock.parent)
        try:
            pid = await start_router(sock, self.data_dir / "logs" / f"router-{svc.name}.log")
        except RouterRunning as running:
            pid = running.pid
        svc.router, svc.router_pid = RouterClient(sock), pid
        return svc.router

    async def _stats_loop(self) -> None:
        """Router stats for observed states; a router that went away is noticed and restarted."""
        while True:
            await asyncio.sleep(STATS_EVERY)
            for svc in list(self.services.values()):
                if svc.router is None:
                    continue
                try:
                    stats = await svc.router.stats()
                    stats.time = time.time()  # the gates measure their window with it
                    svc.router_stats = stats
                    self._wake.set()  # fresh figures go out in the observed state at once
                except RouterUnavailable as exc:
                    log.warning(
                        "router of %s is gone (%s); it will be started again", svc.name, exc
                    )
                    svc.router, svc.router_stats = None, None
                    svc.applied_weights, svc.applied_mirror = {}, None
                    self._wake.set()

    # -- reporting --------------------------------------------------------------------------------

    async def _observe(self, svc: Service) -> None:
        view = svc.view()
        a = assess(svc.desired, view)
        svc.observed_generation = a.observed_generation
        slots = {
            s: SlotStatus(
                slot=s,
                status=v.status,
                version=v.version,
                digest=v.digest,
                pid=svc.runners[s].pid if s in svc.runners else None,
                port=svc.runners[s].spec.port if s in svc.runners else None,
                restarts=v.restarts,
                reason=v.reason,
                since=v.since,
                last_exit=v.last_exit,
            )
            for s, v in view.slots.items()
        }
        if svc.desired is not None:
            for s, ref in svc.desired.slots.items():
                if s not in slots and ref.digest in svc.fetching:
                    slots[s] = SlotStatus(
                        slot=s, status="fetching", version=ref.version, digest=ref.digest
                    )
        obs = ObservedState(
            node=self.node,
            service=svc.name,
            generation=svc.desired.generation if svc.desired else 0,
            observed_generation=a.observed_generation,
            slots=slots,
            weights=dict(svc.applied_weights),
            router=svc.router_stats,
            phase=a.phase,
            error=a.error or (f"router: {svc.router_error}" if svc.router_error else ""),
        )
        body = encode(obs)
        now = time.time()
        if body == svc.last_observed and now - svc.last_observed_at < OBSERVE_EVERY:
            return
        obs.time = now
        svc.last_observed, svc.last_observed_at = body, now
        svc.pending_observed = obs
        self._observed_dirty.set()

    async def _observed_loop(self) -> None:
        """Write the newest observed state of each service; a slow bus never holds the loop."""
        while True:
            await self._observed_dirty.wait()
            self._observed_dirty.clear()
            for svc in list(self.services.values()):
                obs, svc.pending_observed = svc.pending_observed, None
                if obs is None:
                    continue
                try:
                    async with asyncio.timeout(BUS_TIMEOUT):
                        await self.bus.kv_put(
                            subjects.observed_bucket(self.fleet),
                            subjects.node_service_key(self.node, svc.name),
                            encode(obs),
                        )
                except (BusError, TimeoutError) as exc:
                    if not self._bus_failing:
                        log.warning(
                            "cannot write observed state of %s: %s", svc.name, exc or "timeout"
                        )
                    self._bus_failing = True
                    svc.last_observed = b""  # written again on the next pass
                    continue
                self._bus_failing = False

    def _event(self, kind: str, service: str, message: str, **data: Any) -> None:
        ev = Event(
            id=uuid.uuid4().hex,
            time=time.time(),
            fleet=self.fleet,
            kind=kind,
            message=message,
            node=self.node,
            service=service,
            data={k: v for k, v in data.items() if v is not None},
        )
        try:
            self._events.put_nowait(ev)
        except asyncio.QueueFull:
            log.warning("event queue full; dropped %s %s", kind, message)

    async def _events_loop(self) -> None:
        while True:
            ev = await self._events.get()
            for attempt in range(3):
                try:
                    async with asyncio.timeout(BUS_TIMEOUT):
                        await self.bus.js_publish(subjects.event(self.fleet, ev.kind), encode(ev))
                    break
                except (BusError, TimeoutError) as exc:
                    log.warning(
                        "cannot publish event %s (%s); attempt %d", ev.kind, exc, attempt + 1
                    )
                    await asyncio.sleep(0.5 * (attempt + 1))

    # -- state ------------------------------------------------------------------------------------

    def _snapshot(self) -> AgentState:
        services = {}
        for svc in self.services.values():
            slots = {
                s: SlotRecord(
                    slot=s,
                    status=r.status,
                    digest=r.spec.digest,
                    version=r.spec.manifest.version,
                    pid=r.pid if r.alive else None,
                    create_time=r.create_time if r.alive else None,
                    port=r.spec.port,
                    since=r.since,
                    restarts=r.restarts,
                    reason=r.reason,
                    generation=r.spec.generation,
                    last_exit=r.last_exit,
                )
                for s, r in svc.runners.items()
            }
            for s, v in svc.idle.items():
                if s not in slots:
                    slots[s] = SlotRecord(
                        slot=s,
                        status=v.status,
                        digest=v.digest,
                        version=v.version,
                        since=v.since,
                        restarts=v.restarts,
                        reason=v.reason,
                        generation=v.generation,
                        last_exit=v.last_exit,
                    )
            services[svc.name] = ServiceRecord(
                service=svc.name,
                envelope=svc.envelope,
                generation=max(svc.floor, svc.desired.generation if svc.desired else 0),
                observed_generation=svc.observed_generation,
                slots=slots,
                router_pid=svc.router_pid,
                router_socket=str(self._socket(svc.name)),
                router_weights=dict(svc.applied_weights),
            )
        return AgentState(node=self.node, services=services)

    async def _save(self) -> None:
        state = self._snapshot()
        body = msgspec.json.encode(state)
        if body == self._saved:
            return
        await asyncio.to_thread(save_state, self.state_path, state)
        self._saved = body

    def _save_now(self) -> None:
        save_state(self.state_path, self._snapshot())

    async def _restore(self) -> list[SlotRunner]:
        """Load the state file: accepted envelopes, slot processes to adopt, routers to find."""
        state = await asyncio.to_thread(load_state, self.state_path)
        adopted: list[SlotRunner] = []
        for name, rec in state.services.items():
            svc = Service(name=name, observed_generation=rec.observed_generation)
            svc.floor = max(rec.generation, rec.envelope.generation if rec.envelope else 0)
            if rec.envelope is not None:
                try:
                    svc.desired = verify(
                        rec.envelope,
                        self.trusted_keys,
                        fleet=self.fleet,
                        node=self.node,
                        service=name,
                        min_generation=rec.envelope.generation - 1,
                    )
                    svc.envelope = rec.envelope
                except ProtocolError as exc:
                    log.error("remembered desired state of %s is refused: %s", name, exc)
            self.services[name] = svc
            for slot, srec in rec.slots.items():
                runner = self._adopt(svc, slot, srec)
                if runner is not None:
                    adopted.append(runner)
            sock = self._socket(name)
            if sock.exists():
                client = RouterClient(sock)
                try:
                    svc.router_pid = await client.ping()
                    stats = await client.stats()
                except RouterUnavailable as exc:
                    log.warning("router of %s not found again (%s); starting a new one", name, exc)
                else:
                    stats.time = time.time()
                    svc.router, svc.router_stats = client, stats
                    svc.applied_weights = {s: w for s, w in stats.weights.items() if w > 0}
                    log.info("adopted router of %s (pid %s)", name, svc.router_pid)
        keep = {r.pid for r in adopted if r.pid is not None}
        orphans = await asyncio.to_thread(find_orphans, self.cache.root, self.node, keep)
        if orphans:
            # Started by our previous life after its last state save: nothing watches them and
            # the reconciler will start what is wanted again, so they must go.
            log.warning("stopping %d slot process(es) no state record accounts for: pids %s",
                        len(orphans), ", ".join(str(o.pid) for o in orphans))
            await asyncio.to_thread(stop_orphans, orphans)
        return adopted

    def _adopt(self, svc: Service, slot: str, rec: SlotRecord) -> SlotRunner | None:
        if slot in SLOTS and rec.status == "failed" and rec.digest:
            svc.idle[slot] = SlotView(
                slot=slot,
                status="failed",
                digest=rec.digest,
                version=rec.version,
                since=rec.since,
                restarts=rec.restarts,
                reason=rec.reason,
                generation=rec.generation,
                last_exit=rec.last_exit,
            )
            return None
        if slot not in SLOTS or rec.pid is None or rec.create_time is None or not rec.digest:
            return None
        ref = ReleaseRef(service=svc.name, version=rec.version, digest=rec.digest)
        path = self.cache.path_for(ref)
        if path is None:
            return None
        try:
            manifest = load_manifest(path / MANIFEST_NAME)
        except ProtocolError:
            return None
        info = ReleaseInfo(
            rec.digest,
            port=manifest.port,
            start_timeout=manifest.health.start_timeout,
            drain=manifest.stop.drain,
            stop_timeout=manifest.stop.timeout,
        )
        svc.releases[rec.digest] = Release(path, manifest, info, ref)
        spec = SlotSpec(
            service=svc.name,
            slot=slot,
            node=self.node,
            release_dir=path,
            manifest=manifest,
            digest=rec.digest,
            port=rec.port,
            log_dir=self.data_dir / "logs",
            generation=rec.generation,
        )
        runner = SlotRunner.adopt(
            spec,
            rec.pid,
            rec.create_time,
            self._on_slot,
            status=rec.status,
            since=rec.since,
            restarts=rec.restarts,
        )
        if runner is None:
            log.info(
                "slot %s/%s (pid %s) is gone; it will be started again", svc.name, slot, rec.pid
            )
            return None
        svc.runners[slot] = runner
        log.info("adopted slot %s/%s pid %s", svc.name, slot, rec.pid)
        return runner
