"""The manager's side of each service's router: start or find it, configure it, read its stats.

Theory of operation: every service with a public port has one router process (``agent.router``),
reached on a unix socket at ``router_socket`` (stable across agent restarts, so a restarted agent
finds the same router again). ``route`` carries out the reconciler's ``Route`` action: it starts
the router if none is known (one already running on the socket is adopted), then sends the whole
configuration (upstream slots, weights, mirror); only on success are the weights and mirror
recorded as applied, else the error is reported in the observed state until a configure succeeds.
``stats_loop`` reads every router's counters every ``STATS_EVERY`` seconds for the observed
states (faster while a wave is judged: ``stats_period``); a router that does not answer is
forgotten, so the next pass starts it again. ``close`` carries out ``CloseRouter`` (a
removal): the router is asked to stop accepting, finish what is in flight and exit, and is
waited for (bounded) before the slots behind it are drained.
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
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

from agent.cadence import next_tick
from agent.errors import RouterRunning, RouterUnavailable
from agent.host.identity import RunAs
from agent.host.slots import cap_log
from agent.manager.service import (
    STATS_EVERY,
    STATS_EVERY_MIN,
    STATS_EVERY_SPLIT,
    NodeConfig,
    Service,
    Services,
)
from agent.router.control import (
    MAX_SOCKET_PATH,
    RouterClient,
    RouterConfig,
    Upstream,
    router_pid,
    start_router,
)
from protocol.loop import bounded
from protocol.messages import CohortSpec, DrainSpec, MirrorSpec

log = logging.getLogger("fleetwave.agent.services")

# How long a closing router may take beyond its drain timeout to exit before it is killed.
CLOSE_GRACE = 5.0


def router_socket(data_dir: Path, service: str) -> Path:
    """Where ``service``'s router listens, the same for every agent of ``data_dir`` (a restarted
    agent finds its router again): ``<data_dir>/run/router-<service>.sock``; when that is too
    long for a unix socket (about 100 bytes: a long service name, a deep data dir), the same
    with a hash of the name; only when that is too long too, in the temp dir, under a hash of
    the data dir. The data dir first: the agent's unit has ``PrivateTmp=yes``, and systemd
    empties that temp dir when the agent stops, while its routers run on (a restarted agent
    would not find them, nor bind their ports again). A router an older agent started in the
    temp dir under the service's own name is used while its socket is there."""
    def fits(path: Path) -> bool:
        return len(os.fsencode(path)) <= MAX_SOCKET_PATH

    readable = data_dir / "run" / f"router-{service}.sock"
    if fits(readable):
        return readable
    tag = hashlib.sha256(os.fsencode(data_dir.resolve())).hexdigest()[:16]
    temp = Path(tempfile.gettempdir()) / f"fleetwave-{tag}"
    older = temp / f"router-{service}.sock"
    if fits(older) and older.exists():
        return older
    hashed = f"router-{hashlib.sha256(service.encode()).hexdigest()[:16]}.sock"
    here = data_dir / "run" / hashed
    return here if fits(here) else temp / hashed


def _private_dir(path: Path, run_as: RunAs | None = None) -> None:
    """Create ``path`` 0700 if needed and refuse it unless it is ours (or the routers' user's) and
    a real directory (a shared temp dir is where another user could have planted a symlink)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    owners = {os.getuid()} | ({run_as.uid} if run_as is not None else set())
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o077:
        raise RouterUnavailable(
            f"{path} is not a private directory of this user; remove it or use a shorter --data-dir"
        )



def stats_period(services: Iterable[Service], now: float = 0.0) -> float:
    """How long until the next read of the routers' counters: the shortest period any service
    needs. A router whose wave a sequential gate judges (its desired state asks for
    ``stats_every``) is read that often while it splits or mirrors traffic and for
    ``STATS_FAST_AFTER_SWITCH`` seconds after its weights change (a canary at weight 100 or a
    blue-green switch splits nothing, yet its first seconds carry the evidence); any other router
    that splits or mirrors (whatever its desired state asks: a threshold gate's wave asks for
    the usual period), every ``STATS_EVERY_SPLIT``; else the usual ``STATS_EVERY``."""
    period = STATS_EVERY
    for svc in services:
        split = svc.splits
        asked = svc.desired.stats_every if svc.desired is not None else 0.0
        if asked > 0.0 and (split or svc.switched(now)):
            period = min(period, max(asked, STATS_EVERY_MIN))
        if split:
            period = min(period, STATS_EVERY_SPLIT)
    return period


def _process(pid: int | None, sock: Path | None = None) -> psutil.Process | None:
    """The router's process, pinned by its create time (psutil refuses to signal a reused pid),
    or None if it is gone already; with ``sock``, None too when ``pid`` is no longer a router on
    that socket (it exited since it was adopted and the pid went to another process)."""
    if pid is None:
        return None
    if sock is not None:
        try:
            router_pid(pid, sock)
        except RouterUnavailable:
            return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def check_user(service: str, pid: int, run_as: RunAs | None) -> None:
    """Say so when a running router this agent adopts runs as another user than it starts
    routers as (its --service-user or --router-user changed since): it serves on as it is."""
    proc = _process(pid)
    want = run_as.uid if run_as is not None else os.geteuid()
    try:
        uid = proc.uids().real if proc is not None else want
    except psutil.Error:
        return
    if uid != want:
        who = run_as.name if run_as is not None else f"uid {want}"
        log.warning("the router of %s (pid %d) runs as uid %d, not as %s: it serves on as it is; "
                    "to move it, stop it (kill %d) and the agent starts it again as %s (its "
                    "port refuses connections for that moment)", service, pid, uid, who, pid, who)


class RouterLink:
    """Each service's router as the manager drives it: started, configured, its stats read."""

    def __init__(
        self, config: NodeConfig, services: Services, wake: asyncio.Event, *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = config.data_dir
        self.bind_host = config.bind_host
        self.run_as = config.routers_as
        self.edge = config.edge
        self.services = services
        self.wake = wake
        self.clock = clock
        self.switched = asyncio.Event()  # a router took other weights (``stats_loop``)

    def socket(self, service: str) -> Path:
        """The control socket of ``service``'s router."""
        return router_socket(self.data_dir, service)

    def log(self, service: str) -> Path:
        """The log of ``service``'s router (its output, appended to: O_APPEND)."""
        return self.data_dir / "logs" / f"router-{service}.log"

    async def route(
        self, svc: Service, weights: dict[str, int], mirror: MirrorSpec | None,
        drained: DrainSpec | None = None, cohort: CohortSpec | None = None,
    ) -> None:
        """Configure ``svc``'s router (starting it if needed) with these weights and mirror,
        ``drained`` (out of service for maintenance) or not."""
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
            max_connections=self.edge.max_connections,
            body_timeout=self.edge.body_timeout,
            trusted_proxies=list(self.edge.trusted_proxies),
            drained=drained is not None,
            drain_grace=drained.grace if drained is not None else 0.0,
            cohort=cohort,
        )
        try:
            client = await self._router(svc)
            svc.router_stats = await client.configure(cfg)
            svc.router_stats.time = self.clock()
        except RouterUnavailable as exc:
            if svc.router_error != str(exc):
                log.warning("router of %s: %s", svc.name, exc)
            if not svc.router_error:
                svc.router_error_since = self.clock()
            svc.router, svc.router_error = None, str(exc)
            return
        svc.router_error = ""
        applied = {s: w for s, w in weights.items() if w > 0}
        if applied != svc.applied_weights:
            svc.weights_changed = self.clock()
            self.switched.set()  # the stats loop may be asleep on the usual period: re-plan
        svc.applied_weights = applied
        svc.applied_mirror = mirror
        if drained != svc.applied_drain:
            log.info("router of %s: %s", svc.name, "drained" if drained else "serves again")
        svc.applied_drain = drained
        svc.applied_cohort = cohort
        log.info(
            "router of %s: weights %s mirror %s",
            svc.name,
            svc.applied_weights,
            mirror.slot if mirror else None,
        )

    async def close(self, svc: Service) -> None:
        """Retire ``svc``'s router (``CloseRouter``): it stops accepting, lets in-flight requests
        finish for up to its drain timeout and exits; waited for up to ``CLOSE_GRACE`` more, then
        killed. Whatever happens, it is forgotten at the end and the manager woken."""
        client, pid = svc.router, svc.router_pid
        drain = max((r.spec.manifest.stop.drain for r in svc.runners.values()), default=2.0)
        svc.router, svc.router_closing = None, True  # the stats loop leaves it alone now
        try:
            proc = _process(pid, self.socket(svc.name))
            if client is not None:
                try:
                    await client.shutdown()  # it answers before draining
                except RouterUnavailable as exc:
                    log.info("router of %s did not take the shutdown (%s)", svc.name, exc)
            if proc is not None:
                try:
                    await asyncio.to_thread(proc.wait, max(drain, 1.0) + CLOSE_GRACE)
                except psutil.TimeoutExpired:
                    log.warning("router of %s (pid %s) did not exit after draining; killing it",
                                svc.name, pid)
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                        await asyncio.to_thread(proc.wait, CLOSE_GRACE)
            log.info("router of %s closed", svc.name)
        finally:
            svc.router_closing, svc.router_pid, svc.router_stats = False, None, None
            svc.applied_weights, svc.applied_mirror = {}, None
            self.wake.set()

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
        sock = self.socket(svc.name)
        if not sock.is_relative_to(self.data_dir):
            _private_dir(sock.parent, self.run_as)
        try:
            pid = await start_router(sock, self.log(svc.name),
                                     run_as=self.run_as)
        except RouterRunning as running:
            pid = running.pid
            check_user(svc.name, pid, self.run_as)
        svc.router, svc.router_pid = RouterClient(sock), pid
        return svc.router

    async def next_read(self) -> None:
        """Sleep to the next read's tick, on the heartbeat's and the probes' grid
        (agent.cadence; 0.5 divides 2); a switch meanwhile re-plans it on the faster period."""
        loop = asyncio.get_running_loop()
        while True:
            period = stats_period(self.services.values(), self.clock())
            self.switched.clear()
            try:
                await bounded(self.switched.wait(), next_tick(loop.time(), period) - loop.time())
            except TimeoutError:
                return

    async def stats_loop(self) -> None:
        """Router stats for observed states; a router that went away is noticed and restarted."""
        while True:
            await self.next_read()
            for svc in list(self.services.values()):
                if svc.router is None:
                    continue
                # Its log is capped as a slot's is (the tail kept in ``.1``): a router logs each
                # request that meets a bug of its own, with a traceback, and a request that
                # did so could fill the disk of the agent's state file at the router's pace.
                cap_log(self.log(svc.name))
                try:
                    stats = await svc.router.stats()
                    stats.time = self.clock()  # the gates measure their window with it
                    svc.router_stats = stats
                    self.wake.set()  # fresh figures go out in the observed state at once
                except RouterUnavailable as exc:
                    log.warning(
                        "router of %s is gone (%s); it will be started again", svc.name, exc
                    )
                    svc.router, svc.router_stats = None, None
                    svc.applied_weights, svc.applied_mirror = {}, None
                    svc.applied_drain = svc.applied_cohort = None
                    self.wake.set()
