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

The manager is built in layers: its state, per-service records and events in ``service_state``,
the desired-state watch in ``desired``, the router in ``routing``, the observed states in
``observed``, the state file and adoption in ``restore``; here are the tasks and the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from agent.desired import DesiredWatch
from agent.errors import ReleaseError
from agent.observed import Observing
from agent.reconcile import (
    Action,
    Drain,
    Fail,
    Fetch,
    FetchError,
    ReleaseInfo,
    Resume,
    Route,
    Start,
    Stop,
    reconcile,
)
from agent.restore import Restoring
from agent.routing import router_socket
from agent.service_state import (
    BUS_TIMEOUT,
    IDLE_TICK,
    OBSERVE_EVERY,
    PRUNE_EVERY,
    REREAD,
    STATS_EVERY,
    TICK,
    Release,
    Service,
    settled,
)
from agent.slots import SlotRunner, SlotSpec, free_port
from protocol.errors import ProtocolError
from protocol.manifest import MANIFEST_NAME, load_manifest
from protocol.messages import (
    ReleaseRef,
    ServiceSummary,
    SlotProcess,
)

log = logging.getLogger("fleetwave.agent.services")

# Every public name this module had before it was split, wherever it is defined now.
__all__ = [
    "BUS_TIMEOUT", "IDLE_TICK", "OBSERVE_EVERY", "PRUNE_EVERY", "REREAD", "STATS_EVERY", "TICK",
    "Release", "Service", "ServiceManager", "router_socket", "settled",
]


class ServiceManager(DesiredWatch, Observing, Restoring):
    """Runs this node's services as its desired states say; see the module docstring."""

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
            transient = isinstance(exc, ReleaseError) and exc.transient
            svc.fetch_errors[ref.digest] = FetchError(reason, time.time(), transient)
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
            run_as=self.run_as,
            generation=generation,
        )
        runner = SlotRunner(spec, self._on_slot)
        svc.runners[slot] = runner
        svc.idle.pop(slot, None)
        assert self._tg is not None
        self._tg.create_task(runner.run(), name=f"slot-{svc.name}-{slot}")
        log.info("starting %s %s in slot %s on port %s", svc.name, ref.version, slot, port)
