"""``/metrics`` on the coordinator's ``--http`` address: Prometheus' text format.

Theory of operation: one ``CollectorRegistry`` per coordinator (never the process-wide default,
so that several coordinators in one process, as in tests, do not share series). Two kinds of
series live in it:

- *gauges computed at scrape time* (``StateCollector``) from what the coordinator knows: its
  node table, its role, and the rollout records. Before each scrape the handler reads the
  persisted records (a record is decoded again only when its revision moved) with the leader's
  live ones over them, bounded by ``READ_TIMEOUT``; when the bus does not answer in time the
  scrape still answers, with the rollouts this coordinator drives in memory, and counts the
  failure (``fleetwave_coordinator_scrape_errors_total``). The mapping itself is pure
  (``coordinator.http.metrics_map``);
- *counters and histograms fed where things happen*: gate decisions, rollout and rollback
  durations and refused deploys from the rollout events, on the one path every event of a
  decision takes (``Executor.publish``, through ``Coordinator.on_event``); bus latency from the
  one seam to NATS (``protocol.bus.Bus.observer``, through ``Coordinator.on_bus``).

Counters live in this process: they start at zero when it starts, and count what happens while
it leads (a standby decides nothing). After a takeover the new leader's counters go on from
its own zero; Prometheus' ``rate()`` and ``increase()`` treat that as a counter reset.
A rollback's duration (decision → every node back) is measured by the leader that saw both
ends; one interrupted by a takeover is not observed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from coordinator.core import pace
from coordinator.http import metrics_map as mm
from protocol import subjects
from protocol.errors import BusError, ProtocolError
from protocol.messages import Event, RolloutRecord

if TYPE_CHECKING:
    from coordinator.runtime.daemon import Coordinator

log = logging.getLogger("fleetwave.coordinator.http")

READ_TIMEOUT = 3.0  # reading the records for one scrape (Prometheus' default timeout is 10 s)
BUS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROLLOUT_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0)
ROLLBACK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROLLBACKS_KEPT = 1024  # rollbacks under way whose start is remembered
REFUSED_SERVICES = 100  # distinct service names of refused deploys labelled as such; then "(other)"


class CoordinatorMetrics:
    """The registry of one coordinator and the observers that feed it; see the module."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.gate_decisions = Counter(
            "fleetwave_gate_decisions", "Gate results each time a wave's gates concluded",
            ["service", "gate", "result"], registry=r)
        self.refused = Counter(
            "fleetwave_rollouts_refused", "Deploys and rollbacks refused before any wave ran",
            ["service", "code"], registry=r)
        self.bus_seconds = Histogram(
            "fleetwave_bus_request_duration_seconds",
            "Duration of the coordinator's request-shaped calls to NATS (KV, JetStream, requests)",
            ["op"], buckets=BUS_BUCKETS, registry=r)
        self.bus_errors = Counter(
            "fleetwave_bus_errors", "The coordinator's calls to NATS that failed", ["op"],
            registry=r)
        self.rollout_seconds = Histogram(
            "fleetwave_rollout_duration_seconds", "Rollouts from creation to their end",
            ["strategy", "result"], buckets=ROLLOUT_BUCKETS, registry=r)
        self.rollback_seconds = Histogram(
            "fleetwave_rollback_duration_seconds",
            "Rollbacks from the decision to every touched node back", buckets=ROLLBACK_BUCKETS,
            registry=r)
        self.scrape_errors = Counter(
            "fleetwave_coordinator_scrape_errors",
            "Scrapes that could not read the rollout records in time", registry=r)
        self.state = StateCollector(coordinator)
        r.register(self.state)
        self._rollback_from: dict[str, float] = {}
        self._refused_services: set[str] = set()  # labelled so far (``REFUSED_SERVICES``)
        self._decoded: dict[str, tuple[int, RolloutRecord]] = {}  # key -> (revision, record)

    # -- observers -------------------------------------------------------------------------------

    def on_bus(self, op: str, seconds: float, failed: bool) -> None:
        self.bus_seconds.labels(op).observe(seconds)
        if failed:
            self.bus_errors.labels(op).inc()

    def on_event(self, event: Event, record: RolloutRecord | None) -> None:
        for gate, result in mm.gate_decisions(event):
            self.gate_decisions.labels(event.service, gate, result).inc()
        if event.kind == "rollout.refused":
            # The name came from a refused request: a malformed one is not a new series each.
            service = event.service if _valid("service", event.service) else "(invalid)"
            # Every name a caller typed (deploy typo1, typo2, ...) was a series for the
            # process's life: the first REFUSED_SERVICES names, then "(other)".
            if service not in self._refused_services:
                if len(self._refused_services) >= REFUSED_SERVICES:
                    service = "(other)"
                else:
                    self._refused_services.add(service)
            code = str(event.data.get("code") or "")
            self.refused.labels(service, code if code in ("usage", "conflict") else "other").inc()
        elif event.kind == "rollout.rolling_back":
            if len(self._rollback_from) >= ROLLBACKS_KEPT:
                del self._rollback_from[next(iter(self._rollback_from))]
            self._rollback_from.setdefault(event.rollout, event.time)
        elif event.kind == "rollout.rolled_back":
            began = self._rollback_from.pop(event.rollout, None)
            if began is not None:
                self.rollback_seconds.observe(max(0.0, event.time - began))
        if (done := mm.finished(event, record)) is not None:
            strategy, result, seconds = done
            self.rollout_seconds.labels(strategy, result).observe(seconds)
            self._rollback_from.pop(event.rollout, None)

    # -- scraping --------------------------------------------------------------------------------

    async def scrape(self, accept: str = "") -> tuple[bytes, str]:
        """One scrape's body and content type, in the format ``accept`` asks for (Prometheus'
        text format by default, OpenMetrics when asked); reads the records first."""
        encode, content_type = choose_encoder(accept)
        records = await self._records()
        self.state.records = records  # no await between this and the encoding: one snapshot
        return encode(self.registry), content_type

    async def _records(self) -> list[RolloutRecord]:
        """Every rollout record: as persisted (decoded again only when its revision moved),
        with the live ones of this leader's runner over them."""
        c = self._c
        runner = c.runner
        live = {d.id: d.rollout.record for d in runner.drivers.values()} if runner else {}
        if c.store is None:  # not set up yet
            return list(live.values())
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                entries = await c.store.entries()
        except (BusError, TimeoutError) as exc:
            self.scrape_errors.inc()
            log.warning("/metrics: cannot read the rollout records (%s); showing the live ones",
                        exc or "timed out")
            return list(live.values())
        decoded: dict[str, tuple[int, RolloutRecord]] = {}
        for e in entries:
            kept = self._decoded.get(e.key)
            if kept is None or kept[0] != e.revision:
                record = c.store.decode(e)
                if record is None:
                    continue
                try:  # a split record's node table is in its pages
                    async with asyncio.timeout(READ_TIMEOUT):
                        record = await c.store.complete(record)
                except (BusError, TimeoutError) as exc:
                    log.warning("/metrics: cannot read rollout %s (%s)", e.key, exc or "timed out")
                    continue
                kept = (e.revision, record)
            decoded[e.key] = kept
        self._decoded = decoded  # deleted records leave the cache with their entries
        return list(({k: r for k, (_, r) in decoded.items()} | live).values())


def _valid(kind: str, name: str) -> bool:
    try:
        subjects.check_name(kind, name)
    except ProtocolError:
        return False
    return True


class StateCollector(Collector):
    """The gauges of ``metrics_map.GAUGES``, computed at collection time."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator
        self.records: list[RolloutRecord] = []  # set by the scrape right before collecting

    def collect(self) -> Iterator[Metric]:
        c = self._c
        # What the leader told the agents last; a standby, what it would tell them now.
        sent = c.pacer.sent
        paced = (sent.interval if sent is not None
                 else pace.interval(c.table.beating(time.time()), c.pacer.rate))
        samples = (mm.rollout_samples(self.records) + mm.node_samples(c.table.view())
                   + mm.coordinator_samples(c.id, c.fleet_name, c.version, c.runner is not None,
                                            paced))
        families = {name: GaugeMetricFamily(name, doc, labels=list(labels))
                    for name, (doc, labels) in mm.GAUGES.items()}
        for s in samples:
            families[s.name].add_metric(list(s.labels), s.value)
        yield from families.values()
        yield CounterMetricFamily(
            "fleetwave_heartbeats_received",
            "Heartbeats this coordinator received and took (every coordinator hears them all; "
            "their rate is what --max-heartbeats-per-second bounds)", value=c.heartbeats)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = await request.app[METRICS].scrape(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


METRICS: web.AppKey[CoordinatorMetrics] = web.AppKey("metrics", CoordinatorMetrics)


def add_routes(app: web.Application, coordinator: Coordinator) -> None:
    """Serve ``/metrics`` for ``coordinator`` and hook its observers (before it runs)."""
    m = CoordinatorMetrics(coordinator)
    coordinator.on_bus = m.on_bus
    coordinator.on_event = m.on_event
    app[METRICS] = m
    app.router.add_get("/metrics", metrics)
