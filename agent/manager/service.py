"""What the service manager knows: its node's settings, its per-service records, its timings.

Theory of operation: a ``Service`` is everything mutable the manager holds for one service: the
accepted signed envelope and desired state, the replay floor, the slot runners, the fetched
releases, what the router was last told, and what was last reported. The manager's parts share one
``Services`` map of them (each part reads and writes only its own fields: see each part's module).
``view`` turns a record into the reconciler's pure ``ServiceView``; ``settled`` says when no timer
of the reconciler can fire, so the loop may idle. ``NodeConfig`` is what the agent was started
with, the same for every part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.edge import Edge
from agent.host.identity import RunAs
from agent.host.slots import SlotRunner
from agent.reconcile import (
    FetchError,
    ReleaseInfo,
    ServiceView,
    SlotView,
)
from agent.router.control import RouterClient
from protocol.manifest import Manifest
from protocol.messages import (
    CohortSpec,
    DesiredState,
    DrainPhase,
    DrainSpec,
    MirrorSpec,
    ObservedState,
    ReleaseRef,
    RouterStats,
    SignedEnvelope,
)

TICK = 0.2
IDLE_TICK = 2.0  # all settled: wakes bring every change; this only guards against a missed one
# The full re-read of a node's desired states under its watch: every REREAD seconds, or less
# often in a large fleet, so that the fleet's re-reads come to REREAD_RATE a second at most
# (``desired.reread_every``). Each is a snapshot through a consumer made and dropped on the
# server: ~1.05 ms of nats-server's CPU at 50,000 keys (``tests/perf/bench_reread.py``), so
# 50,000 agents every 30 s would keep 1.75 of the broker's cores busy for ever. At 100 a second
# that is ~0.1 core; the watch (heartbeats, re-created after a gap or a reconnect) is what
# delivers, the re-read only catches what it might miss. Capped at MAX_REREAD: a pace comes
# over core NATS, where on a bus without credentials anyone may publish a forged one.
REREAD = 30.0
REREAD_RATE = 100.0
MAX_REREAD = 600.0
# The idle heartbeat an agent's watch of its desired states asks the broker for: 1 s
# (``protocol.bus.WATCH_HEARTBEAT``: a watch whose server died is re-created within about two),
# or in a large fleet as long as keeps the broker at WATCH_HEARTBEAT_RATE of them a second, at
# most MAX_WATCH_HEARTBEAT (nats-py's own default). Measured (``tests/perf/bench_reread.py``):
# ~20 us of nats-server CPU a heartbeat, so 50,000 agents at 1 s kept a whole broker core busy
# at rest. Taken at the watch's start; a re-read renews a watch whose heartbeat the
# fleet's size no longer calls for (``desired.DesiredWatch.reread``).
WATCH_HEARTBEAT_RATE = 10_000.0
MAX_WATCH_HEARTBEAT = 5.0
# After a reconnect the watch of desired states starts again within the fleet's size / 500 a
# second, at most 120 s (``protocol.bus.restart_spread``, shared with the leader's deadlines).
# At its start, an agent that remembers a fleet whose spread is over CROWD_SPREAD (over 1,000
# nodes: a fleet's size is remembered rounded up to 1,000 times a power of two, so a fleet of 3
# is remembered as 1,000 and its agents never wait) waits up to FIRST_PACE_WAIT for the
# leader's pace before its first watch: if the pace says many agents are registering at once
# (``Pace.burst``), that watch starts within the spread too (``desired.DesiredWatch.watch``).
# The leader says its pace within about 1.5 s of a registration (``core.pace.SETTLE`` + the
# daemon's PACE_TICK); a lone restart waits that long.
CROWD_SPREAD = 2.0
FIRST_PACE_WAIT = 3.0
OBSERVE_EVERY = 5.0
# Reports that carry nothing new but the router's counters (read every STATS_EVERY seconds and
# stamped with the read's time, so every read changes them) go out at most once a paced
# heartbeat interval (the leader's pace: ``--max-heartbeats-per-second``), and so does the
# periodic report of an unchanged state when that is longer than OBSERVE_EVERY
# (``observed.report_gaps``): at rest the coordinator takes as many reports a second as
# heartbeats, whatever the fleet's size; a service a running rollout reads (``Pace.reading``)
# reports every read.
# Measured (``tests/perf/bench_rest.py``): the coordinator spends ~3 % of a core per 1,000
# reports a second, and 50,000 agents at rest, one service each, sent 25,000 a second.
# A router that cannot be configured (its public port is taken, ...) for this long fails the
# service's desired state: the rollout learns why at once instead of at its progress deadline,
# while a router being restarted (a few seconds at most) fails nothing.
ROUTER_FAILS_AFTER = 10.0
STATS_EVERY = 2.0
# While a router splits traffic between slots (a canary's weights) or mirrors it (a shadow), its
# counters are what the rollout's gates judge: read them this often. Only the few nodes of a
# baking wave split, so the fleet's observed-state writes barely grow.
STATS_EVERY_SPLIT = 0.5
# A wave judged by sequential analysis asks for faster reads in its desired states
# (``stats_every``), and for this long after a router's weights change too: a canary switched at
# weight 100, or a blue-green switch, splits nothing, yet its first seconds are when a sequential
# gate catches a gross regression. Other waves' switches cost no extra reads.
STATS_FAST_AFTER_SWITCH = 10.0
STATS_EVERY_MIN = 0.1  # whatever a desired state asks, no faster
BUS_TIMEOUT = 10.0
PRUNE_EVERY = 60.0


@dataclass(frozen=True)
class NodeConfig:
    """What the agent was started with, as every part of the manager needs it."""

    fleet: str
    node: str
    data_dir: Path
    bind_host: str  # the routers' public ports listen here
    trusted_keys: frozenset[str]  # coordinators whose desired states are accepted
    run_as: RunAs | None = None  # services, hooks, probes (and routers) run as this user
    router_as: RunAs | None = None  # routers run as this user instead (--router-user)
    # Services that run as a user of their own instead (--service-user SERVICE=USER).
    service_users: Mapping[str, RunAs] = field(default_factory=dict)
    edge: Edge = field(default_factory=Edge)  # the routers' public-port limits
    # Where slots' ports are claimed host-wide (``agent.host.ports``); None: not claimed.
    port_claims: Path | None = None

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.json"

    def run_as_for(self, service: str) -> RunAs | None:
        """Who ``service``'s processes, hooks and probes run as."""
        return self.service_users.get(service, self.run_as)

    @property
    def routers_as(self) -> RunAs | None:
        """Who the routers run as: their own user, else the services'."""
        return self.router_as if self.router_as is not None else self.run_as

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"


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
    # The release fetched ahead of its deploy (``prefetch``), kept from the cache's pruning
    # until a newer one replaces it (its digest; "" for none).
    prefetched: str = ""
    fetching: set[str] = field(default_factory=set)
    fetch_errors: dict[str, FetchError] = field(default_factory=dict)
    applied_weights: dict[str, int] = field(default_factory=dict)
    applied_mirror: MirrorSpec | None = None
    applied_drain: DrainSpec | None = None  # the drain the router has taken
    applied_cohort: CohortSpec | None = None  # the cohort rule the router has taken
    weights_changed: float = 0.0  # when the router last took other weights (the agent's clock)
    observed_generation: int = 0
    router: RouterClient | None = None
    router_pid: int | None = None
    router_stats: RouterStats | None = None
    router_closing: bool = False  # asked to drain and exit (a removal), not gone yet
    last_observed: bytes = b""
    last_observed_state: bytes = b""  # the same without the router's counters
    last_observed_at: float = 0.0
    observed_epoch: int = 0  # the bus's reconnect count when it was last queued
    pending_observed: ObservedState | None = None
    router_error: str = ""  # why the last configure failed; reported until one succeeds
    router_error_since: float = 0.0  # the clock at the first failure of this run of them
    # Failed slots remembered from the state file (no process): so that a restarted agent does
    # not retry a generation that already failed.
    idle: dict[str, SlotView] = field(default_factory=dict)
    # Self-healing, by (slot, digest): when the slot was restarted for staying unhealthy with
    # that release (the reconciler's back-off and budget read them: another release starts with
    # a whole budget), and the restart count its next runner of that release takes over.
    heals: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    carried_restarts: dict[tuple[str, str], int] = field(default_factory=dict)

    def view(self, now: float | None = None) -> ServiceView:
        """The reconciler's view; given ``now``, a router failing for ROUTER_FAILS_AFTER is in
        it (``router_failure``)."""
        slots = {
            s: replace(v, heals=tuple(self.heals.get((s, v.digest), ())))
            for s, v in self.idle.items() if s not in self.runners
        }
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
                heals=tuple(self.heals.get((s, r.spec.digest), ())),
            )
        return ServiceView(
            service=self.name,
            slots=slots,
            releases={d: rel.info for d, rel in self.releases.items()},
            fetching=frozenset(self.fetching),
            fetch_errors=dict(self.fetch_errors),
            applied_weights=dict(self.applied_weights),
            applied_mirror=self.applied_mirror,
            applied_drain=self.applied_drain,
            applied_cohort=self.applied_cohort,
            observed_generation=self.observed_generation,
            router_failure=self.router_error if (
                self.router_error and now is not None
                and now - self.router_error_since >= ROUTER_FAILS_AFTER) else "",
            router="up" if self.router is not None else "closing" if self.router_closing
            else "none",
        )

    def forget_unwanted_fetch_errors(self) -> None:
        """Drop the fetch errors of releases its desired state no longer names (rolled back or
        on, removed): nothing retries those, and kept they would hold the service unsettled
        (``settled``), its loop passing every TICK instead of IDLE_TICK for the agent's life."""
        wanted = {ref.digest for ref in self.desired.slots.values()} if self.desired else set()
        for digest in [d for d in self.fetch_errors if d not in wanted]:
            del self.fetch_errors[digest]

    @property
    def splits(self) -> bool:
        """Whether its router mirrors traffic or splits it between slots (a canary, a shadow)."""
        return (self.applied_mirror is not None
                or sum(w > 0 for w in self.applied_weights.values()) > 1)

    def judged(self, now: float) -> bool:
        """Whether this node's own state says a rollout reads its counters now: its desired
        state asks for them (``stats_every``: a wave sequential analysis judges), its router
        splits or mirrors traffic, or its weights changed within ``STATS_FAST_AFTER_SWITCH``.
        Such a service reports every read of its router, however large the fleet, as does one
        the leader's pace names (``Pace.reading``: every node of a rollout that reads counters,
        the old slots' traffic too)."""
        asked = self.desired.stats_every if self.desired is not None else 0.0
        return asked > 0.0 or self.splits or self.switched(now)

    def switched(self, now: float) -> bool:
        """Whether its router took other weights within ``STATS_FAST_AFTER_SWITCH``."""
        return bool(self.weights_changed) and \
            0.0 <= now - self.weights_changed < STATS_FAST_AFTER_SWITCH

    @property
    def removed(self) -> bool:
        """Its desired state says "nothing here" and nothing of it runs any more: the node no
        longer lists it (its observed state stays, for the rollout that removed it)."""
        return (self.desired is not None and not self.desired.slots and self.router is None
                and not self.router_closing and not any(r.alive for r in self.runners.values()))


def release_info(digest: str, manifest: Manifest) -> ReleaseInfo:
    """What the reconciler needs of a fetched release's manifest."""
    return ReleaseInfo(
        digest,
        port=manifest.port,
        start_timeout=manifest.health.start_timeout,
        drain=manifest.stop.drain,
        stop_timeout=manifest.stop.timeout,
        restart_after=manifest.health.restart_after,
    )


# Slot statuses with a reconciler timer running (start timeout, drain time) or an end to await.
_MOVING = frozenset({"starting", "draining", "stopping", "fetching"})


Services = dict[str, Service]  # by name; shared by the manager's parts


def drain_phase(svc: Service) -> DrainPhase:
    """Where a drain of ``svc`` stands, for the heartbeat: "" when not drained; else what its
    router last said ("draining" until it neither accepts nor holds a connection). Without a
    router (none started yet, or it went away and is being started again drained) nothing can
    accept: "drained"."""
    drained = svc.desired.drained if svc.desired is not None else None
    if drained is None:
        return ""
    stats = svc.router_stats
    if svc.router is None or stats is None:
        return "drained"
    return stats.drain if stats.drain else "draining"  # (UNSET: not applied drained yet)


def settled(view: ServiceView) -> bool:
    """Whether no timer of ``reconcile`` can fire for this view: nothing fetching or waiting to
    retry a fetch, no router closing, no slot starting, draining or stopping, none unhealthy
    with a restart_after running. A settled service changes only through a wake (desired state,
    slot event, router stats), so the loop may sleep for ``IDLE_TICK``."""
    return (not view.fetching and not view.fetch_errors and view.router != "closing"
            and not any(v.status in _MOVING or _healing(view, v) for v in view.slots.values()))


def _healing(view: ServiceView, v: SlotView) -> bool:
    info = view.releases.get(v.digest)
    return v.status == "unhealthy" and info is not None and info.restart_after > 0
