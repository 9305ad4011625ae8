"""The coordinator's /metrics registry fed by a real runner on an in-memory bus: gauges
computed at scrape time, counters and histograms from the one event path, refusals counted."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.api.rollouts import RolloutsApi
from coordinator.core import pace
from coordinator.core.fleet import Fleet
from coordinator.errors import UsageError
from coordinator.http.metrics import CoordinatorMetrics
from coordinator.runtime.store import RolloutStore
from protocol import subjects
from protocol.messages import DeployRequest, Event, NodeInfo
from protocol.testing import FLEET, NEW, FakeClock, spec
from tests.unit.coordinator.runtime.test_runner import drive, fleet_bus, runner


def parsed(scraped: tuple[bytes, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    text, content_type = scraped
    assert content_type.startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def value(out: dict[Any, float], name: str, **labels: str) -> float | None:
    return out.get((name, tuple(sorted(labels.items()))))


def coordinator(table: Fleet, run: Any = None) -> Any:
    """What the metrics read of ``coordinator.runtime.daemon.Coordinator``."""
    return SimpleNamespace(table=table, id="c1", fleet_name=FLEET, version="0.1.0",
                           runner=run, store=None, on_bus=None, on_event=None,
                           pacer=pace.Pacer(2.0), heartbeats=7)


async def test_a_rollout_driven_to_its_end_shows_in_every_series() -> None:
    """A rolling rollout of 3 nodes: while it runs and once it succeeded, the gauges follow the
    record, the duration is observed once, and the registry is this coordinator's own."""
    bus, clock = fleet_bus(), FakeClock()
    table = Fleet()
    for i in (1, 2, 3):
        table.register(NodeInfo(id=f"node-{i}", labels={"zone": "a"}), clock())
    c = coordinator(table)
    c.store = RolloutStore(bus)  # the daemon's reader: every coordinator has one once set up
    m = CoordinatorMetrics(c)
    r = runner(bus, clock)
    r._executor.observe = m.on_event  # as the daemon wires it (Runner(observe=...))
    c.runner = r
    rec = await r.deploy(spec(strategy="rolling", batch="1"), NEW, "alice")
    during = parsed(await m.scrape())
    assert value(during, "fleetwave_rollout_info", rollout=rec.id, service="hello",
                 strategy="rolling", version="2.0.0", state="running") == 1
    assert value(during, "fleetwave_rollout_waves", rollout=rec.id, service="hello") == 3
    assert value(during, "fleetwave_rollout_wave", rollout=rec.id, service="hello") == 1
    assert value(during, "fleetwave_coordinator_leader") == 1
    assert value(during, "fleetwave_nodes", state="online") == 3
    assert value(during, "fleetwave_node_label_info", node="node-2", label="zone",
                 value="a") == 1

    assert await drive(r, bus, clock, rec.id) == "succeeded"
    after = parsed(await m.scrape())
    assert value(after, "fleetwave_rollout_info", rollout=rec.id, service="hello",
                 strategy="rolling", version="2.0.0", state="succeeded") == 1
    assert value(after, "fleetwave_rollout_wave", rollout=rec.id, service="hello") == 3
    assert value(after, "fleetwave_rollout_weight", rollout=rec.id, service="hello") == 100
    assert value(after, "fleetwave_rollout_nodes", rollout=rec.id, service="hello",
                 state="done") == 3
    assert value(after, "fleetwave_rollouts", service="hello", strategy="rolling",
                 state="succeeded") == 1
    assert value(after, "fleetwave_rollout_duration_seconds_count", strategy="rolling",
                 result="succeeded") == 1
    # The default registry has none of it: several coordinators in one process never mix.
    from prometheus_client import REGISTRY
    assert REGISTRY.get_sample_value("fleetwave_rollout_duration_seconds_count",
                                     {"strategy": "rolling", "result": "succeeded"}) is None


async def test_a_standby_shows_no_leadership_and_what_it_knows() -> None:
    """Without a runner and a store: leader 0, its node table, no rollout series."""
    table = Fleet()
    table.register(NodeInfo(id="node-1"), 1000.0)
    out = parsed(await CoordinatorMetrics(coordinator(table)).scrape())
    assert value(out, "fleetwave_coordinator_leader") == 0
    assert value(out, "fleetwave_coordinator_info", id="c1", fleet=FLEET, version="0.1.0") == 1
    assert value(out, "fleetwave_node_up", node="node-1") is not None
    # The heartbeat pace of its table (1 node at 2 a second) and the heartbeats it took.
    assert value(out, "fleetwave_heartbeat_pace_seconds") == 0.5
    assert value(out, "fleetwave_heartbeats_received_total") == 7
    assert not [k for k in out if k[0] == "fleetwave_rollout_info"]


def test_rollback_duration_runs_from_the_decision_to_every_node_back() -> None:
    """rolling_back at 10 s, rolled_back at 10.4 s: one rollback of 0.4 s; a rolled_back whose
    start this leader never saw (a takeover) is not observed."""
    m = CoordinatorMetrics(coordinator(Fleet()))

    def ev(kind: str, t: float, rollout: str = "r") -> Event:
        return Event(id=kind, time=t, fleet=FLEET, kind=kind, service="hello", rollout=rollout)

    m.on_event(ev("rollout.rolling_back", 10.0), None)
    m.on_event(ev("rollout.rolled_back", 10.4), None)
    m.on_event(ev("rollout.rolled_back", 12.0, rollout="other"), None)
    r = m.registry
    assert r.get_sample_value("fleetwave_rollback_duration_seconds_count") == 1
    assert r.get_sample_value("fleetwave_rollback_duration_seconds_sum") == pytest.approx(0.4)


def test_bus_calls_are_timed_by_op_and_failures_counted() -> None:
    """The Bus observer's calls become the latency histogram and the error counter."""
    m = CoordinatorMetrics(coordinator(Fleet()))
    m.on_bus("kv_get", 0.003, False)
    m.on_bus("kv_get", 0.2, True)
    r = m.registry
    assert r.get_sample_value("fleetwave_bus_request_duration_seconds_count",
                              {"op": "kv_get"}) == 2
    assert r.get_sample_value("fleetwave_bus_errors_total", {"op": "kv_get"}) == 1


async def test_a_deploy_refused_before_any_wave_is_an_event_and_a_count() -> None:
    """No node matches the selector: the caller gets the usage error, and a rollout.refused event
    naming who and why is queued on the runner's publisher (and counted); the service stays
    unlocked and no record is made."""
    bus, clock = fleet_bus(), FakeClock()
    m = CoordinatorMetrics(coordinator(Fleet()))
    r = runner(bus, clock, observe=m.on_event)  # type: ignore[arg-type]

    async def resolve(service: str, version: str) -> Any:
        return NEW

    api = RolloutsApi(r, resolve=resolve, public_key="k")
    with pytest.raises(UsageError, match="no node matches"):
        await api.deploy(DeployRequest(spec=spec(selector={"zone": "nowhere"})), "alice")
    [event] = [e for e in r.events.pending() if e.kind == "rollout.refused"]
    assert event.who == "alice" and event.service == "hello" and event.rollout == ""
    assert "no node matches" in event.data["reason"] and event.data["code"] == "usage"
    assert event.data["version"] == "2.0.0" and event.data["verb"] == "deploy"
    assert m.registry.get_sample_value("fleetwave_rollouts_refused_total",
                                       {"service": "hello", "code": "usage"}) == 1
    assert await r.records() == []
    assert bus.live(subjects.locks_bucket(FLEET), "hello") is None


async def test_an_unavailable_coordinator_refuses_without_an_event() -> None:
    """A refusal the CLI retries by itself (no leader yet) is no rollout event."""
    from coordinator.errors import RemoteError

    class Away:
        fleet = FLEET
        told: list[str] = []

        async def deploy(self, *a: Any) -> Any:
            raise RemoteError("no coordinator leads", "unavailable")

        def refused(self, verb: str, *a: Any) -> None:
            self.told.append(verb)

    async def resolve(service: str, version: str) -> Any:
        return NEW

    away = Away()
    with pytest.raises(RemoteError):
        await RolloutsApi(away, resolve=resolve, public_key="k").deploy(  # type: ignore[arg-type]
            DeployRequest(spec=spec()), "alice")
    assert away.told == []


def test_a_refused_malformed_name_is_not_a_series_of_its_own() -> None:
    """Refusals of requests naming services that cannot exist count under one label value."""
    m = CoordinatorMetrics(coordinator(Fleet()))
    for name in ("../x", "a b", "é"):
        m.on_event(Event(id=name, time=1.0, fleet=FLEET, kind="rollout.refused", service=name,
                         data={"code": "usage"}), None)
    assert m.registry.get_sample_value("fleetwave_rollouts_refused_total",
                                       {"service": "(invalid)", "code": "usage"}) == 3


async def test_records_unread_in_time_leave_the_live_ones_and_a_count() -> None:
    """The rollouts bucket failing a scrape: the live rollout is still shown, the failure is
    counted; unchanged records are not decoded again on the next scrape."""
    from protocol.errors import BusError

    bus, clock = fleet_bus(), FakeClock()
    c = coordinator(Fleet())
    c.store = RolloutStore(bus)
    m = CoordinatorMetrics(c)
    r = runner(bus, clock)
    c.runner = r
    rec = await r.deploy(spec(strategy="rolling", batch="1"), NEW, "alice")
    bucket = subjects.rollouts_bucket(FLEET)
    bus.faults[("entries", bucket)] = BusError("stream away")
    out = parsed(await m.scrape())
    assert value(out, "fleetwave_coordinator_scrape_errors_total") == 1
    assert value(out, "fleetwave_rollout_waves", rollout=rec.id, service="hello") == 3

    c.runner = None  # as a standby: persisted records only
    await m.scrape()
    kept = dict(m._decoded)
    await m.scrape()
    assert m._decoded[rec.id][1] is kept[rec.id][1]  # same revision: the same decoded record


async def test_openmetrics_when_asked() -> None:
    """A scraper that asks for OpenMetrics gets it, and Prometheus' OpenMetrics parser reads
    every family with its type."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om

    table = Fleet()
    table.register(NodeInfo(id="node-1"), 1000.0)
    body, content_type = await CoordinatorMetrics(coordinator(table)).scrape(
        "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    types = {f.name: f.type for f in om(body.decode())}
    assert types["fleetwave_node_up"] == "gauge"
    assert types["fleetwave_gate_decisions"] == "counter"
    assert types["fleetwave_rollback_duration_seconds"] == "histogram"


def test_refused_deploys_of_many_names_are_a_bounded_set_of_series(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name a caller typed (deploy typo1, typo2, ...) became a series for the process's
    life: the first REFUSED_SERVICES names are labelled, the rest count as "(other)"."""
    from coordinator.http import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "REFUSED_SERVICES", 3)
    m = CoordinatorMetrics(coordinator(Fleet()))
    for i in range(10):
        m.on_event(Event(id=f"e{i}", time=1.0, fleet=FLEET, kind="rollout.refused",
                         service=f"typo{i}", data={"code": "usage"}), None)
    m.on_event(Event(id="again", time=1.0, fleet=FLEET, kind="rollout.refused",
                     service="typo1", data={"code": "usage"}), None)
    get = m.registry.get_sample_value
    assert [get("fleetwave_rollouts_refused_total", {"service": f"typo{i}", "code": "usage"})
            for i in range(4)] == [1, 2, 1, None]
    assert get("fleetwave_rollouts_refused_total", {"service": "(other)", "code": "usage"}) == 7
