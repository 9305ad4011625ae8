"""The agent's Prometheus metrics (``--metrics``): what the node serves, per service, slot and
version, read at scrape time from what the agent already knows.

Theory of operation: ``families(figures)`` is the pure core: one ``AgentFigures`` (a frozen
picture of the agent now) in, Prometheus metric families out (``prometheus_client``'s own
families, so names, types, escaping and the OpenMetrics exposition are the library's).
``LiveAgent.snapshot`` is the shell that takes that picture from the live agent: its service
manager's records (slot runners, applied weights, the router counters it last read) and psutil.
``AgentCollector`` joins them for a ``CollectorRegistry``: every scrape builds the families
afresh, nothing is kept.

Vocabulary and contract (the Grafana board ``deploy/grafana/fleetwave.json`` and the README use
these names; base units, ``_total`` counters; labels ``service``, ``slot``, ``version``, so a
canary and its stable are one label apart):

- ``fleetwave_router_*``: the router's counters as the agent last read them. The agent reads
  each router every 2 s, every 0.5 s while it splits or mirrors traffic (``agent.manager
  .routing``); a scrape serves that read rather than asking the router itself, so that a scrape
  never waits on or adds work to the process that carries user traffic, and shows exactly the
  figures the observed state reports and the coordinator's gates judge (the same ``time``).
  ``fleetwave_router_stats_timestamp_seconds`` says when they were read: ``time() - it`` is
  their age (0.5-2 s, plus a read that is late when the router does not answer).
- Router counters count from the router's start (``RouterStats.epoch``) and drop to zero when it
  restarts: Prometheus's ``rate``/``increase`` take a drop of a counter as a reset, so that is all
  a reset needs. A slot's counters are the slot's, whatever release it runs: the series carries
  the version the slot runs now, so a slot that takes another release begins a new series (its
  first sample holds the earlier release's count, which ``rate`` never counts as an increase).
- ``code`` is the status class (2xx..5xx). A router older than the per-class counters reports
  only its 5xx (``errors``): the rest is then ``code="unknown"``, and its histogram has no sum.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import psutil
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from agent import __version__
from agent.manager.service import Service
from agent.router.stats import ROUTER_SLOT  # the router's own answers (503: no slot may serve)
from protocol.messages import LATENCY_BOUNDS_MS, RouterStats, SlotTraffic

SVC = ("service",)
SLOT = ("service", "slot", "version")
# The router's latency buckets in seconds, as ``le`` labels (the last, overflow one is +Inf).
BUCKETS_S = tuple(b / 1000.0 for b in LATENCY_BOUNDS_MS)


@dataclass(frozen=True)
class SlotFigures:
    """One slot process as the agent supervises it."""

    slot: str
    version: str
    status: str  # SlotStatusName: starting, healthy, unhealthy, draining, ...
    restarts: int = 0
    rss: int = 0  # bytes; 0 without a process
    weight: int = 0  # the share of live traffic its router gives it now


@dataclass(frozen=True)
class ServiceFigures:
    """One service on this node: its slots, and its router's counters as last read."""

    name: str
    slots: tuple[SlotFigures, ...] = ()
    router: RouterStats | None = None  # None: no router (a worker) or not read yet
    router_up: bool = False  # the agent reaches its router now
    mirror_slot: str | None = None  # the slot shadow copies go to
    generation: int = 0  # the newest desired generation seen
    observed_generation: int = 0  # the generation the node has converged on


@dataclass(frozen=True)
class AgentFigures:
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    connected: bool = False
    started_at: float = 0.0
    rss: int = 0
    cpu_seconds: float = 0.0
    services: tuple[ServiceFigures, ...] = ()
    prefetched: int = 0  # releases fetched when pushed, ahead of their deploy
    prefetch_failed: int = 0


# -- the pure core ---------------------------------------------------------------------------------


def families(fig: AgentFigures) -> list[Metric]:
    """Every metric family of one scrape (the same set of families every time: a family with no
    series stays, with HELP and TYPE, so that the names are always there to be found)."""
    out = _agent_families(fig)
    out += _slot_families(fig.services)
    out += _router_families(fig.services)
    return out


def _agent_families(fig: AgentFigures) -> list[Metric]:
    info = GaugeMetricFamily("fleetwave_agent_info", "The agent of this node (always 1).",
                             labels=("node", "agent_version"))
    info.add_metric((fig.node, __version__), 1)
    node_labels = GaugeMetricFamily("fleetwave_node_label_info",
                                    "A label of this node, for selectors (always 1).",
                                    labels=("node", "label", "value"))
    for k, v in sorted(fig.labels.items()):
        node_labels.add_metric((fig.node, k, v), 1)
    prefetches = CounterMetricFamily(
        "fleetwave_agent_prefetches", "Releases this agent fetched when they were pushed, ahead "
        "of their deploy (--prefetch), by outcome: fetched or failed.", labels=("outcome",))
    prefetches.add_metric(("fetched",), fig.prefetched)
    prefetches.add_metric(("failed",), fig.prefetch_failed)
    return [
        info, node_labels,
        GaugeMetricFamily("fleetwave_agent_connected",
                          "1 while the agent is connected to NATS, else 0.",
                          value=int(fig.connected)),
        GaugeMetricFamily("fleetwave_agent_start_time_seconds",
                          "When the agent started, seconds since the epoch.",
                          value=fig.started_at),
        GaugeMetricFamily("fleetwave_agent_resident_memory_bytes",
                          "Resident memory of the agent process (not its services or routers).",
                          value=fig.rss),
        CounterMetricFamily("fleetwave_agent_cpu_seconds",
                            "CPU time (user + system) the agent process used.",
                            value=fig.cpu_seconds),
        prefetches,
    ]


def _slot_families(services: Iterable[ServiceFigures]) -> list[Metric]:
    healthy = GaugeMetricFamily("fleetwave_slot_healthy",
                                "1 while the slot's health probes pass, else 0.", labels=SLOT)
    status = GaugeMetricFamily("fleetwave_slot_status",
                               "The slot's status (1 for the status it is in).",
                               labels=(*SLOT, "status"))
    restarts = CounterMetricFamily("fleetwave_slot_restarts",
                                   "Times the agent restarted the slot's process.", labels=SLOT)
    rss = GaugeMetricFamily("fleetwave_slot_resident_memory_bytes",
                            "Resident memory of the slot's process.", labels=SLOT)
    weight = GaugeMetricFamily("fleetwave_router_weight",
                               "The share of live traffic the router gives the slot (weights of "
                               "one service need not sum to 100).", labels=SLOT)
    desired = GaugeMetricFamily("fleetwave_service_desired_generation",
                                "The newest desired generation the agent has seen.", labels=SVC)
    observed = GaugeMetricFamily("fleetwave_service_observed_generation",
                                 "The generation the node has converged on (below desired: "
                                 "converging or failed).", labels=SVC)
    for svc in services:
        desired.add_metric((svc.name,), svc.generation)
        observed.add_metric((svc.name,), svc.observed_generation)
        for s in svc.slots:
            key = (svc.name, s.slot, s.version)
            healthy.add_metric(key, int(s.status == "healthy"))
            status.add_metric((*key, s.status), 1)
            restarts.add_metric(key, s.restarts)
            rss.add_metric(key, s.rss)
            weight.add_metric(key, s.weight)
    return [healthy, status, restarts, rss, weight, desired, observed]


def _router_families(services: Iterable[ServiceFigures]) -> list[Metric]:
    up = GaugeMetricFamily("fleetwave_router_up",
                           "1 while the agent reaches the service's router, else 0.", labels=SVC)
    read = GaugeMetricFamily("fleetwave_router_stats_timestamp_seconds",
                             "When the agent read the router counters served here, seconds "
                             "since the epoch (the observed state's router time).", labels=SVC)
    requests = CounterMetricFamily("fleetwave_router_requests",
                                   "Requests the router answered, by slot and status class.",
                                   labels=(*SLOT, "code"))
    failures = CounterMetricFamily("fleetwave_router_upstream_failures",
                                   "Upstream connections to the slot that failed (retried "
                                   "elsewhere when possible).", labels=SLOT)
    duration = HistogramMetricFamily("fleetwave_router_request_duration_seconds",
                                     "Time from a request's head to its answer's end, through the "
                                     "router (the router's own buckets).", labels=SLOT)
    copies = CounterMetricFamily("fleetwave_router_mirror_copies",
                                 "Shadow copies sent, by the shadow's version.",
                                 labels=("service", "version"))
    compared = CounterMetricFamily("fleetwave_router_mirror_compared",
                                   "Shadow answers compared with the live ones.",
                                   labels=("service", "version"))
    mismatches = CounterMetricFamily("fleetwave_router_mirror_mismatches",
                                     "Shadow answers that differed from the live ones.",
                                     labels=("service", "version"))
    dropped = CounterMetricFamily("fleetwave_router_mirror_dropped",
                                  "Shadow copies not sent because the shadow fell behind.",
                                  labels=("service", "version"))
    for svc in services:
        up.add_metric((svc.name,), int(svc.router_up))
        stats = svc.router
        if stats is None:
            continue
        if stats.time:
            read.add_metric((svc.name,), stats.time)
        versions = {s.slot: s.version for s in svc.slots}
        for slot, traffic in sorted(stats.slots.items()):
            if slot not in versions and slot != ROUTER_SLOT:
                continue  # a stopped slot: its release is unknown, its series has ended
            key = (svc.name, slot, versions.get(slot, ""))
            for code, n in by_class(traffic).items():
                requests.add_metric((*key, code), n)
            failures.add_metric(key, traffic.failures)
            duration.add_metric(key, cumulative(traffic.latency), sum_value=(
                traffic.latency_sum_ms / 1000.0 if traffic.codes else None))
        m = stats.mirror
        if m is not None and svc.mirror_slot is not None:
            mkey = (svc.name, versions.get(svc.mirror_slot, ""))
            copies.add_metric(mkey, m.mirrored)
            compared.add_metric(mkey, m.compared)
            mismatches.add_metric(mkey, m.mismatched)
            dropped.add_metric(mkey, m.dropped)
    return [up, read, requests, failures, duration, copies, compared, mismatches, dropped]


def by_class(t: SlotTraffic) -> dict[str, int]:
    """Requests by status class; from an older router (no ``codes``), 5xx and "unknown"."""
    if t.codes or not t.requests:
        return dict(sorted(t.codes.items()))
    return {"5xx": t.errors, "unknown": t.requests - t.errors}


def cumulative(latency: list[int]) -> list[tuple[str, float]]:
    """The ``le`` buckets, cumulative, ending with +Inf, of a router histogram.

    A histogram of another length (another router version) is read against our bounds: missing
    buckets count as zero, extra ones as overflow, as the gates read it."""
    n = len(BUCKETS_S)
    running = 0
    out: list[tuple[str, float]] = []
    for i, bound in enumerate(BUCKETS_S):
        running += latency[i] if i < len(latency) else 0
        out.append((repr(bound), running))
    running += sum(latency[n:])
    out.append(("+Inf", running))
    return out


# -- the shell -------------------------------------------------------------------------------------


def slot_figures(svc: Service) -> tuple[SlotFigures, ...]:
    """The slots of one service record, as ``families`` takes them."""
    return tuple(
        SlotFigures(
            slot=s, version=r.spec.manifest.version, status=r.status, restarts=r.restarts,
            rss=r.rss(), weight=svc.applied_weights.get(s, 0),
        )
        for s, r in sorted(svc.runners.items())
        if r.alive or r.status not in ("stopped", "failed")
    )


def service_figures(svc: Service) -> ServiceFigures:
    return ServiceFigures(
        name=svc.name,
        slots=slot_figures(svc),
        router=svc.router_stats,
        router_up=svc.router is not None and not svc.router_error,
        mirror_slot=svc.applied_mirror.slot if svc.applied_mirror is not None else None,
        generation=svc.desired.generation if svc.desired is not None else 0,
        observed_generation=svc.observed_generation,
    )


class LiveAgent:
    """What a scrape reads of the running agent; the daemon fills in ``services`` and
    ``connected`` once it has them (until then a scrape shows the agent alone)."""

    def __init__(self, node: str, labels: Mapping[str, str]) -> None:
        self.node = node
        self.labels = dict(labels)
        self.started_at = time.time()
        self.services: Mapping[str, Service] = {}
        self.connected: Callable[[], bool] = lambda: False
        # (fetched, failed) ahead of their deploy so far (``agent.manager.prefetch``)
        self.prefetches: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._me = psutil.Process()

    def snapshot(self) -> AgentFigures:
        with self._me.oneshot():
            rss = int(self._me.memory_info().rss)
            cpu = self._me.cpu_times()
        prefetched, prefetch_failed = self.prefetches()
        return AgentFigures(
            node=self.node, labels=self.labels, connected=self.connected(),
            started_at=self.started_at, rss=rss, cpu_seconds=cpu.user + cpu.system,
            services=tuple(service_figures(s) for _, s in sorted(self.services.items())),
            prefetched=prefetched, prefetch_failed=prefetch_failed,
        )


class AgentCollector:
    """A ``prometheus_client`` collector: the live agent's families, built at every scrape."""

    def __init__(self, live: LiveAgent) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        yield from families(self.live.snapshot())

    def describe(self) -> list[Metric]:
        return []  # no describe at registration: collect() is only run by a scrape
