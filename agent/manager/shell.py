"""The service manager: the async shell around the pure reconciler.

Theory of operation. The manager runs in two parts, each owning its tasks in one TaskGroup:
``run_local`` needs no bus (restore, runners, reconcile, router stats), ``run_bus`` needs the
connected bus (watch, events, observed). The daemon starts ``run_local`` at once and ``run_bus``
once NATS answers: a restarted agent adopts, probes, restarts and routes its services from the
state file while the broker is away (after a site-wide power cut, say), and does not wait for it.
Until the bus is attached (``attach``) what would go out waits: events in their bounded queue,
observed states as pending (the first pass after the attach reports every service again), and a
release not in the cache cannot be fetched (a transient failure, retried every ``FETCH_RETRY``).

- *watch* (``run_bus``, once the state file is restored): ``bus.watch(desired, "<node>.*")``
  (it survives reconnects); each value is a signed envelope, verified against the trusted keys,
  the node and the service, and accepted only if its generation is newer than the accepted one.
  Anything else is refused with an ``agent.refused`` event saying why, and changes nothing. A
  full re-read every ``REREAD`` seconds (less often in a large fleet: ``paced``) is a safety net.
- *reconcile* (``run_local``): on every change (a wake: new desired state, slot event, fetch
  done, fresh router stats) and, as a safety net, every ``tick`` seconds while something is in
  motion or every ``IDLE_TICK`` seconds once every service is settled (``settled``: no timer of
  the reconciler can fire), per service, build the local view, call ``reconcile`` and carry out
  its actions; then write the state file if it changed and the ObservedState if it changed (and
  every ``OBSERVE_EVERY`` seconds, with the router's stats), and flush the state file to the
  disk when the generations accepted changed (``Restorer.flush``: after the report). An idle
  agent thus passes once per stats fetch instead of five times a second.
  Actions that take long (fetch, stop, fail) run as their own tasks so that one slow service never
  holds the others; the view says "fetching"/"stopping" meanwhile, so the reconciler waits.
- *runners* (``run_local``): one ``SlotRunner.run`` task per slot process; cancelling them leaves
  the processes alive (they outlive the agent by design).
- *prefetch* (``run_bus``; not with ``--prefetch off``): a release pushed of a service run here is
  fetched into the cache before its deploy needs it (``agent.manager.prefetch``).
- *events* (``run_bus``): slot and refusal events are queued and published to the events stream
  in order, in batches, under the one retry policy of ``protocol.events``.

On start the state file is loaded: accepted envelopes are verified again, slot processes are
adopted by pid + create_time, and each router is found again on its control socket. Then the loop
converges from there: nothing is started twice.

Every await on the bus or a router is bounded (the bus and RouterClient have timeouts; the rest
uses ``asyncio.timeout``). Bus errors are weather: logged once and retried on the next pass.

The manager is composed of one object per concern, sharing the ``services`` map and a ``wake``
event: ``DesiredWatch`` (``desired``: what is accepted), ``RouterLink`` (``routing``: each
service's router), ``ObservedWriter`` (``observed``: what is reported), ``Restorer``
(``restore``: the state file and adoption) and ``NodeEvents`` (``events``). Here are the tasks,
the loop and the actions the reconciler asks for. The clock (``clock``, seconds since the epoch)
is an argument, for tests in virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from agent.edge import Edge
from agent.errors import ReleaseError
from agent.host.identity import RunAs
from agent.host.ports import claim, drop_claim, free_port, sweep
from agent.host.releases import ReleaseCache, keep_to_group
from agent.host.slots import SlotRunner, SlotSpec
from agent.manager.desired import DesiredWatch, reread_every
from agent.manager.events import NodeEvents
from agent.manager.observed import ObservedWriter
from agent.manager.prefetch import Prefetcher
from agent.manager.restore import Restorer
from agent.manager.routing import RouterLink
from agent.manager.service import (
    IDLE_TICK,
    PRUNE_EVERY,
    REREAD_RATE,
    TICK,
    NodeConfig,
    Release,
    Service,
    Services,
    drain_phase,
    release_info,
    settled,
)
from agent.reconcile import (
    HEAL_WINDOW,
    Action,
    CloseRouter,
    Drain,
    Fail,
    Fetch,
    FetchError,
    Report,
    Restart,
    Resume,
    Route,
    Start,
    Stop,
    reconcile,
)
from protocol.bus import Bus
from protocol.errors import BusError, ProtocolError
from protocol.loop import bounded
from protocol.manifest import MANIFEST_NAME, load_manifest
from protocol.messages import (
    Pace,
    ReleaseRef,
    ServiceSummary,
    SlotProcess,
)

log = logging.getLogger("fleetwave.agent.services")


class _Unattached:
    """The release store before the bus is attached: nothing can be fetched yet (a transient
    failure, ``ReleaseCache`` says so), while a release already in the cache is at hand."""

    async def obj_get_into(
        self, store: str, name: str, write: Callable[[bytes], object]
    ) -> bool:
        raise BusError("not connected to NATS yet")


class ServiceManager:
    """Runs this node's services as its desired states say; see the module docstring."""

    def __init__(
        self,
        *,
        fleet: str,
        node: str,
        data_dir: Path,
        bind_host: str,
        trusted_keys: Collection[str],
        tick: float = TICK,
        idle_tick: float = IDLE_TICK,
        run_as: RunAs | None = None,
        router_as: RunAs | None = None,
        service_users: Mapping[str, RunAs] | None = None,
        edge: Edge | None = None,
        port_claims: Path | None = None,
        clock: Callable[[], float] = time.time,
        prefetch: bool = True,
    ) -> None:
        self.config = NodeConfig(
            fleet=fleet, node=node, data_dir=Path(data_dir), bind_host=bind_host,
            trusted_keys=frozenset(trusted_keys), run_as=run_as, router_as=router_as,
            service_users=dict(service_users or {}),
            edge=edge or Edge(),
            port_claims=port_claims,
        )
        self.bus: Bus | None = None  # until ``attach``
        self.tick = tick
        self.idle_tick = idle_tick
        self.clock = clock
        self.cache = ReleaseCache(self.config.data_dir / "releases")
        self.services: Services = {}
        self.wake = asyncio.Event()  # something changed: reconcile now
        self.events = NodeEvents(None, fleet, node, clock=clock)
        self.desired = DesiredWatch(None, self.config, self.services, self.events, self.wake)
        self.routers = RouterLink(self.config, self.services, self.wake, clock=clock)
        self.observed = ObservedWriter(None, self.config, self.services, clock=clock)
        self.restorer = Restorer(self.config, self.services, self.cache, self.routers,
                                 clock=clock, fleet_nodes=self.desired.remembered_size,
                                 halted=self.halted)
        # Releases fetched when pushed (``prefetch``); None: when deployed only (--prefetch off).
        self.prefetcher = Prefetcher(
            fleet, self.services, self._prefetch, lambda: self.desired.fleet_nodes,
            max_bytes=self.cache.limits.max_bytes) if prefetch else None
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()  # the agent's stop (``run_local``): start nothing then
        self._pruned_at = 0.0
        self._restored = asyncio.Event()  # the state file is restored: desired states may come

    # -- daemon interface -------------------------------------------------------------------------

    async def run_local(self, stop: asyncio.Event | None = None) -> None:
        """Adopt what the state file remembers, then converge for ever (until cancelled); no
        bus needed. The state is saved a last time when cancelled.

        Once ``stop`` (the agent's) is set, nothing is started any more, at once and until the
        daemon cancels this: no slot, no router, no restart of a crashed slot (``halted``). A
        stop that signals the agent together with its routers and slots (``systemctl kill
        --kill-whom=all``, a test's reap) would otherwise see the agent start again what it just
        lost, after the stop, outliving it."""
        if stop is not None:
            self._stop = stop
        adopted = await self._restore()
        sweep(self.config.port_claims)  # gone agents' claims (this one's before a restart too)
        for runner in adopted:  # their claims named this agent's previous process
            claim(self.config.port_claims, runner.spec.port)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for runner in adopted:
                    tg.create_task(
                        runner.run(), name=f"slot-{runner.spec.service}-{runner.spec.slot}"
                    )
                tg.create_task(self.routers.stats_loop(), name="router-stats")
                self._restored.set()
                await self._reconcile_loop()
        finally:
            self._tg = None
            with contextlib.suppress(OSError):
                self.restorer.save_now(flush=True)

    async def run_bus(self, bus: Bus) -> None:
        """Attach ``bus``, then watch desired states, publish events and write observed states
        for ever (until cancelled). The watch starts once ``run_local`` has restored the state
        file: a desired state accepted before would be overwritten by the remembered one."""
        self.attach(bus)
        await self._restored.wait()  # run_local's restore: bounded (files, router timeouts)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.desired.watch(), name="desired-watch")
            tg.create_task(self.desired.reread(), name="desired-reread")
            tg.create_task(self.events.run(), name="events")
            tg.create_task(self.observed.run(), name="observed")
            if self.prefetcher is not None:
                tg.create_task(self.prefetcher.run(bus), name="prefetch")

    def attach(self, bus: Bus) -> None:
        """The connected bus, for every part that talks to the fleet. The next pass reports
        every service again (``ObservedWriter``'s epoch changed), and fetches that failed for
        want of it are tried again at once."""
        self.bus = self.desired.bus = self.observed.bus = bus
        self.events.bus = bus
        for svc in self.services.values():
            for digest in [d for d, e in svc.fetch_errors.items() if e.transient]:
                del svc.fetch_errors[digest]
        self.wake.set()

    async def _restore(self) -> list[SlotRunner]:
        """What the state file remembers (``Restorer.restore``), and the fleet's size it last
        heard, until a pace says it again: the first watch's heartbeat and backoff follow it."""
        adopted = await self.restorer.restore(self._on_slot)
        if not self.desired.fleet_nodes:
            self.desired.fleet_nodes = self.restorer.restored_fleet_nodes
        return adopted

    def paced(self, pace: Pace) -> None:
        """The leader's pace: the fleet's size spaces the re-reads of desired states (said in
        the log when their mean interval changes), its interval the reports of counters alone
        (``observed.report_gaps``)."""
        before = reread_every(self.desired.fleet_nodes)
        self.desired.fleet_nodes = pace.nodes
        self.desired.heard(pace.burst)
        self.observed.paced = pace.interval
        if pace.reading is not None:  # None: not known (a leader resuming): as it was
            reading = frozenset(pace.reading)
            for name in reading - self.observed.reading:
                if (svc := self.services.get(name)) is not None:
                    svc.last_observed_state = b""  # a rollout reads it now: counters at once
                    self.wake.set()
            self.observed.reading = reading
        if (every := reread_every(pace.nodes)) != before:
            log.info("desired states re-read every %.0fs on average: the coordinator paces %d "
                     "nodes, re-reading at most %g a second in all", every, pace.nodes,
                     REREAD_RATE)

    def summary(self) -> tuple[list[ServiceSummary], list[SlotProcess]]:
        """Services and slot processes for the next heartbeat."""
        services: list[ServiceSummary] = []
        procs: list[SlotProcess] = []
        for svc in self.services.values():
            if svc.removed:
                continue
            healthy = [r for r in svc.runners.values() if r.status == "healthy"]
            serving = sorted(healthy, key=lambda r: -svc.applied_weights.get(r.spec.slot, 0))
            services.append(
                ServiceSummary(
                    service=svc.name,
                    version=serving[0].spec.manifest.version if serving else "",
                    healthy=bool(serving),
                    generation=svc.desired.generation if svc.desired else 0,
                    observed_generation=svc.observed_generation,
                    drain=drain_phase(svc),
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


    # -- the loop ---------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        busy = True
        while True:
            with contextlib.suppress(TimeoutError):
                await bounded(self.wake.wait(), self.tick if busy else self.idle_tick)
            self.wake.clear()
            busy = False
            for svc in list(self.services.values()):
                try:
                    svc.forget_unwanted_fetch_errors()  # level-triggered: whatever changed it
                    view = svc.view()
                    actions = reconcile(svc.desired, view, self.clock())
                    busy = busy or bool(actions) or not settled(view)
                    for action in actions:
                        await self._do(svc, action)
                    self.observed.observe(svc)
                except Exception:
                    # A bug in one service's pass must not stop the others (nor the agent);
                    # the next pass tries again from the view, which is level-triggered.
                    busy = True
                    log.exception("reconciling %s failed; retrying on the next pass", svc.name)
            try:
                self.restorer.save()
            except OSError as exc:
                log.error("cannot write the agent state %s: %s", self.restorer.state_path, exc)
            self.observed.release()  # only now: what we report, a restart remembers
            try:
                await self.restorer.flush()  # on the disk, if that matters (Restorer.flush)
            except OSError as exc:
                log.error("cannot flush the agent state %s: %s", self.restorer.state_path, exc)
            self._prune()

    def _prune(self) -> None:
        """Drop unpacked releases nobody runs or wants, keeping the cache's recent few."""
        now = self.clock()
        if now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        in_use: set[str] = set()
        for svc in self.services.values():
            in_use |= {r.spec.digest for r in svc.runners.values()}
            in_use |= set(svc.fetching)
            if svc.desired is not None:
                in_use |= {ref.digest for ref in svc.desired.slots.values()}
            if svc.prefetched:
                in_use.add(svc.prefetched)
        try:
            self.cache.prune(in_use)
        except OSError as exc:
            log.warning("cannot prune the release cache: %s", exc)
        # A release pruned from the cache is no longer at hand: the next pass that wants it
        # fetches it again (a review found a rollback to a pruned release starting its slot in
        # a directory that no longer existed, failing until the agent restarted).
        for svc in self.services.values():
            for digest in [d for d, rel in svc.releases.items() if not rel.path.is_dir()]:
                del svc.releases[digest]

    def halted(self) -> bool:
        """Whether the agent stops (``run_local``): nothing is started any more."""
        return self._stop.is_set()

    async def _do(self, svc: Service, action: Action) -> None:
        tg = self._tg
        assert tg is not None  # only called from inside run_local()
        if self.halted() and isinstance(action, Start | Restart | Route):
            return  # the agent stops: it starts nothing (a slot, a router) the next one adopts
        match action:
            case Fetch(release=ref):
                svc.fetching.add(ref.digest)
                tg.create_task(self._fetch(svc, ref), name=f"fetch-{ref.digest[:16]}")
            case Start(slot=slot, release=ref, generation=gen):
                self._start(svc, slot, ref, gen)
            case Fail(slot=slot, reason=reason):
                runner = svc.runners[slot]
                tg.create_task(runner.fail(reason), name=f"fail-{svc.name}-{slot}")
            case Route(weights=weights, mirror=mirror, drain=drain, cohort=cohort):
                await self.routers.route(svc, dict(weights), mirror, drain, cohort)
            case CloseRouter():
                svc.router_closing = True  # at once, so the next pass waits for it
                tg.create_task(self.routers.close(svc), name=f"close-router-{svc.name}")
                self.events.emit("router.closing", svc.name, "the router stops taking "
                                 "connections, finishes those in flight and exits (removed)")
            case Drain(slot=slot):
                svc.runners[slot].drain()
                self.events.emit("slot.draining", svc.name, f"slot {slot} drains", slot=slot)
            case Resume(slot=slot):
                svc.runners[slot].resume()
            case Stop(slot=slot, timeout=timeout):
                runner = svc.runners[slot]
                runner.status = "stopping"  # at once, so the next pass waits for it
                tg.create_task(runner.stop(timeout), name=f"stop-{svc.name}-{slot}")
            case Restart(slot=slot, timeout=timeout, reason=reason):
                self._restart(svc, slot, timeout, reason)
            case Report(slot=slot, reason=reason):
                runner = svc.runners[slot]
                runner.reason = reason  # level-triggered: the reconciler reports it only once
                log.warning("%s slot %s: %s", svc.name, slot, reason)
                self.events.emit("slot.restart_loop", svc.name, reason, slot=slot,
                                 version=runner.spec.manifest.version, restarts=runner.restarts)

    def _restart(self, svc: Service, slot: str, timeout: float, reason: str) -> None:
        """Self-healing: stop a slot that stayed unhealthy (its replacement serves already or
        cannot); the reconciler starts it again as any stopped slot, counted as a restart."""
        runner = svc.runners[slot]
        now = self.clock()
        key = (slot, runner.spec.digest)
        svc.heals = {k: kept for k, times in svc.heals.items()
                     if (kept := [t for t in times if now - t < HEAL_WINDOW])}
        svc.heals[key] = [*svc.heals.get(key, []), now]
        svc.carried_restarts[key] = runner.restarts + 1
        log.warning("%s slot %s restarts: %s", svc.name, slot, reason)
        self.events.emit("slot.restarting", svc.name, reason, slot=slot,
                         version=runner.spec.manifest.version, pid=runner.pid,
                         restarts=runner.restarts + 1)
        runner.status = "stopping"  # at once, so the next pass waits for it
        assert self._tg is not None
        self._tg.create_task(runner.stop(timeout), name=f"restart-{svc.name}-{slot}")

    async def _ready(self, svc: Service, ref: ReleaseRef, *, recent: bool = True) -> Release:
        """``ref`` at hand: from the cache, or fetched into it (``recent``: ``ensure``'s);
        raises ReleaseError, ProtocolError (its manifest) or OSError."""
        source = self.bus if self.bus is not None else _Unattached()
        path = await self.cache.ensure(source, self.config.fleet, ref, recent=recent)
        manifest = await asyncio.to_thread(load_manifest, path / MANIFEST_NAME)
        # Checked at every use, the cache's too (it checks on a fresh fetch only): the
        # bundle of this digest must be the release the signed desired state names.
        if manifest.name != svc.name:
            raise ReleaseError(f"bundle is for service {manifest.name!r}, not {svc.name!r}")
        if manifest.version != ref.version:
            raise ReleaseError(f"release {ref.service} {ref.version}: the bundle's manifest "
                               f"says {manifest.name} {manifest.version}; refused")
        # A service of its own user keeps its release from the other services' users (the
        # release readable by its group alone); any other, as unpacked (a no-op then).
        own = self.config.service_users.get(svc.name)
        await asyncio.to_thread(keep_to_group, path, own.gid if own is not None else None)
        return Release(path, manifest, release_info(ref.digest, manifest), ref)

    async def _prefetch(self, svc: Service, ref: ReleaseRef) -> None:
        """A release pushed, fetched ahead of its deploy (``prefetch``): at hand from now on."""
        svc.releases[ref.digest] = await self._ready(svc, ref, recent=False)
        svc.prefetched = ref.digest  # kept from pruning; not counted as recently used

    async def _fetch(self, svc: Service, ref: ReleaseRef) -> None:
        try:
            release = await self._ready(svc, ref)
        except (ReleaseError, ProtocolError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            transient = isinstance(exc, ReleaseError) and exc.transient
            svc.fetch_errors[ref.digest] = FetchError(reason, self.clock(), transient)
            log.warning("cannot fetch %s %s: %s", ref.service, ref.version, reason)
            self.events.emit("release.failed", svc.name, reason, version=ref.version)
        else:
            svc.fetch_errors.pop(ref.digest, None)
            svc.releases[ref.digest] = release
        finally:
            svc.fetching.discard(ref.digest)
            self.wake.set()

    def _start(self, svc: Service, slot: str, ref: ReleaseRef, generation: int) -> None:
        rel = svc.releases[ref.digest]
        self.cache.touch(rel.path)  # recently used: a rollback's target later on
        if svc.prefetched == ref.digest:
            svc.prefetched = ""  # deployed: kept as any release in use or recently used
        used = frozenset(
            r.spec.port for r in svc.runners.values() if r.spec.port is not None and r.alive
        )
        port = (free_port("127.0.0.1", used, claims=self.config.port_claims)
                if rel.manifest.port is not None else None)
        spec = SlotSpec(
            service=svc.name,
            slot=slot,
            node=self.config.node,
            release_dir=rel.path,
            manifest=rel.manifest,
            digest=ref.digest,
            port=port,
            log_dir=self.config.log_dir,
            run_as=self.config.run_as_for(svc.name),
            generation=generation,
        )
        runner = SlotRunner(spec, self._on_slot, now=self.clock, halted=self.halted)
        runner.restarts = svc.carried_restarts.pop((slot, ref.digest), 0)
        svc.runners[slot] = runner
        svc.idle.pop(slot, None)
        assert self._tg is not None
        self._tg.create_task(runner.run(), name=f"slot-{svc.name}-{slot}")
        log.info("starting %s %s in slot %s on port %s", svc.name, ref.version, slot, port)

    def _on_slot(self, runner: SlotRunner, kind: str, message: str) -> None:
        """Every slot runner's events: published, and the state saved at once on a start."""
        spec = runner.spec
        self.events.emit(
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
                self.restorer.save_now()
            except OSError as exc:
                log.warning("cannot save the state file after starting a slot: %s", exc)
        elif kind in ("slot.stopped", "slot.failed"):
            drop_claim(self.config.port_claims, spec.port)  # free for any agent at once
        self.wake.set()
