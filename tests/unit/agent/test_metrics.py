"""agent.metrics (the families of one scrape, from a picture of the agent) and the pure parts of
agent.metrics_http (one answer per request head); the router's per-class counting behind them.
A real agent's scrape: tests/integration/test_agent_metrics.py."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import (
    BUCKETS_S,
    AgentFigures,
    ServiceFigures,
    SlotFigures,
    by_class,
    cumulative,
    families,
)
from agent.metrics_http import MetricsServer, registry_renderer
from agent.router.stats import SlotCounters
from protocol.messages import LATENCY_BOUNDS_MS, MirrorTraffic, RouterStats, SlotTraffic

N = len(LATENCY_BOUNDS_MS) + 1  # buckets of a router histogram, with the overflow one


def hist(**at: int) -> list[int]:
    """A router histogram with ``count`` requests in bucket ``i`` for each ``b<i>=count``."""
    h = [0] * N
    for k, v in at.items():
        h[int(k[1:])] = v
    return h


class Fixed:
    def __init__(self, fig: AgentFigures) -> None:
        self.fig = fig

    def collect(self) -> list[Metric]:
        return families(self.fig)


def scrape(fig: AgentFigures) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of one scrape, rendered and parsed back with prometheus_client's own parser."""
    registry = CollectorRegistry()
    registry.register(Fixed(fig))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


CANARY = AgentFigures(
    node="node-1", labels={"zone": "a", "role": "web"}, connected=True,
    started_at=900.0, rss=27 * 2**20, cpu_seconds=1.5, prefetched=3, prefetch_failed=1,
    services=(ServiceFigures(
        name="hello",
        slots=(SlotFigures("a", "2.0.0", "healthy", restarts=1, rss=9 * 2**20, weight=75),
               SlotFigures("b", "2.2.0", "healthy", rss=8 * 2**20, weight=25)),
        router=RouterStats(epoch=900.0, time=1009.5, slots={
            "a": SlotTraffic(requests=300, errors=0, failures=2, latency=hist(b3=290, b10=10),
                             codes={"2xx": 299, "4xx": 1}, latency_sum_ms=450.0),
            "b": SlotTraffic(requests=100, errors=50, latency=hist(b4=100),
                             codes={"2xx": 50, "5xx": 50}, latency_sum_ms=80.0),
            "c": SlotTraffic(requests=7, latency=hist(b1=7), codes={"2xx": 7}),
            "router": SlotTraffic(requests=3, errors=3, latency=hist(b0=3), codes={"5xx": 3},
                                  latency_sum_ms=0.1),
        }),
        router_up=True, generation=7, observed_generation=7,
    ),),
)


def test_canary_and_stable_are_one_label_apart() -> None:
    """Requests by status class, failures and weights carry each slot's version: the canary's
    errors and share are told apart from the stable's by the version label alone."""
    s = scrape(CANARY)
    stable = {"service": "hello", "slot": "a", "version": "2.0.0"}
    canary = {"service": "hello", "slot": "b", "version": "2.2.0"}
    assert sample(s, "fleetwave_router_requests_total", **stable, code="2xx") == 299
    assert sample(s, "fleetwave_router_requests_total", **stable, code="4xx") == 1
    assert sample(s, "fleetwave_router_requests_total", **canary, code="5xx") == 50
    assert sample(s, "fleetwave_router_requests_total", **canary, code="2xx") == 50
    assert ("fleetwave_router_requests_total",
            tuple(sorted({**stable, "code": "5xx"}.items()))) not in s  # none: no series
    assert sample(s, "fleetwave_router_upstream_failures_total", **stable) == 2
    assert sample(s, "fleetwave_router_weight", **stable) == 75
    assert sample(s, "fleetwave_router_weight", **canary) == 25
    assert sample(s, "fleetwave_slot_healthy", **canary) == 1
    assert sample(s, "fleetwave_slot_status", **canary, status="healthy") == 1
    assert sample(s, "fleetwave_slot_restarts_total", **stable) == 1
    assert sample(s, "fleetwave_slot_resident_memory_bytes", **canary) == 8 * 2**20
    # The router's own 503s (no slot could serve) are slot "router", of no version.
    assert sample(s, "fleetwave_router_requests_total", service="hello", slot="router",
                  version="", code="5xx") == 3
    # Slot c runs nothing now: its counters have no version to carry, so its series ends.
    assert not [k for k in s if ("slot", "c") in k[1]]


def test_the_latency_histogram_is_the_routers_own_in_seconds() -> None:
    """Buckets are the router's bounds in seconds, cumulative, +Inf = _count = requests; _sum is
    the router's true sum in seconds."""
    s = scrape(CANARY)
    stable = {"service": "hello", "slot": "a", "version": "2.0.0"}
    name = "fleetwave_router_request_duration_seconds"
    le3, le10 = repr(BUCKETS_S[3]), repr(BUCKETS_S[10])
    assert float(le3) == LATENCY_BOUNDS_MS[3] / 1000
    assert sample(s, f"{name}_bucket", **stable, le=repr(BUCKETS_S[2])) == 0
    assert sample(s, f"{name}_bucket", **stable, le=le3) == 290
    assert sample(s, f"{name}_bucket", **stable, le=le10) == 300
    assert sample(s, f"{name}_bucket", **stable, le="+Inf") == 300
    assert sample(s, f"{name}_count", **stable) == 300
    assert sample(s, f"{name}_sum", **stable) == pytest.approx(0.45)


def test_the_agent_and_its_node() -> None:
    """Agent info, node labels, connection, memory, CPU, generations and the read time."""
    s = scrape(CANARY)
    assert sample(s, "fleetwave_agent_info", node="node-1", agent_version="0.1.0") == 1
    assert sample(s, "fleetwave_node_label_info", node="node-1", label="zone", value="a") == 1
    assert sample(s, "fleetwave_agent_connected") == 1
    assert sample(s, "fleetwave_agent_resident_memory_bytes") == 27 * 2**20
    assert sample(s, "fleetwave_agent_cpu_seconds_total") == 1.5
    assert sample(s, "fleetwave_agent_prefetches_total", outcome="fetched") == 3
    assert sample(s, "fleetwave_agent_prefetches_total", outcome="failed") == 1
    assert sample(s, "fleetwave_agent_start_time_seconds") == 900.0
    assert sample(s, "fleetwave_service_observed_generation", service="hello") == 7
    assert sample(s, "fleetwave_router_up", service="hello") == 1
    assert sample(s, "fleetwave_router_stats_timestamp_seconds", service="hello") == 1009.5


def test_mirror_counts_carry_the_shadows_version() -> None:
    """Shadow copies, comparisons, mismatches and drops are labelled with the shadow's version."""
    svc = CANARY.services[0]
    shadowed = ServiceFigures(
        name="hello", slots=svc.slots, mirror_slot="b", router_up=True,
        router=RouterStats(epoch=1.0, slots={}, mirror=MirrorTraffic(
            mirrored=40, compared=38, mismatched=4, dropped=2)))
    s = scrape(AgentFigures(node="n", services=(shadowed,)))
    key = {"service": "hello", "version": "2.2.0"}
    assert sample(s, "fleetwave_router_mirror_copies_total", **key) == 40
    assert sample(s, "fleetwave_router_mirror_compared_total", **key) == 38
    assert sample(s, "fleetwave_router_mirror_mismatches_total", **key) == 4
    assert sample(s, "fleetwave_router_mirror_dropped_total", **key) == 2


def test_every_family_is_there_with_no_service_at_all() -> None:
    """An agent still waiting for NATS shows every family (HELP and TYPE), its own figures
    filled in: names a dashboard reads always exist."""
    registry = CollectorRegistry()
    registry.register(Fixed(AgentFigures(node="n")))
    names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {"fleetwave_router_requests", "fleetwave_router_request_duration_seconds",
            "fleetwave_router_mirror_copies", "fleetwave_slot_healthy", "fleetwave_router_weight",
            "fleetwave_agent_cpu_seconds", "fleetwave_node_label_info",
            "fleetwave_agent_prefetches"} <= names
    assert scrape(AgentFigures(node="n"))[("fleetwave_agent_connected", ())] == 0


@pytest.mark.parametrize(
    ("traffic", "expected"),
    [
        pytest.param(SlotTraffic(requests=10, errors=4, codes={"2xx": 6, "5xx": 4}),
                     {"2xx": 6, "5xx": 4}, id="by-class"),
        pytest.param(SlotTraffic(requests=10, errors=4), {"5xx": 4, "unknown": 6},
                     id="older-router"),
        pytest.param(SlotTraffic(), {}, id="nothing-yet"),
    ],
)
def test_status_classes(traffic: SlotTraffic, expected: dict[str, int]) -> None:
    """Classes as counted; a router without per-class counters: its 5xx and the rest unknown."""
    assert by_class(traffic) == expected


def test_an_older_routers_histogram_has_no_sum() -> None:
    """Without a true sum (an older router) the histogram has buckets only: no made-up _sum."""
    old = ServiceFigures(name="hello", slots=(SlotFigures("a", "1.0.0", "healthy"),),
                         router=RouterStats(slots={"a": SlotTraffic(requests=2,
                                                                    latency=hist(b5=2))}))
    s = scrape(AgentFigures(node="n", services=(old,)))
    assert not [k for k in s if k[0].endswith("_sum")]
    assert sample(s, "fleetwave_router_requests_total", service="hello", slot="a",
                  version="1.0.0", code="unknown") == 2


def test_histograms_of_another_length_are_fitted() -> None:
    """Missing buckets count as zero, extra ones as overflow (as the gates read them)."""
    short = cumulative([1, 2])
    assert short[0] == (repr(BUCKETS_S[0]), 1) and short[-1] == ("+Inf", 3)
    long = cumulative([0] * (N - 1) + [4, 5])
    assert long[-2][1] == 0 and long[-1] == ("+Inf", 9)


def test_the_router_counts_status_classes_and_a_latency_sum() -> None:
    """SlotCounters.observe: classes 2xx..5xx (600+ as 5xx), errors = 5xx, the sum in ms."""
    c = SlotCounters()
    for status, ms in ((200, 1.0), (204, 2.0), (301, 0.5), (404, 0.5), (503, 4.0), (599, 1.0),
                       (600, 1.0)):
        c.observe(status, ms)
    snap = c.snapshot()
    assert snap.codes == {"2xx": 2, "3xx": 1, "4xx": 1, "5xx": 3}
    assert snap.requests == 7 and snap.errors == 3 and sum(snap.latency) == 7
    assert snap.latency_sum_ms == pytest.approx(10.0)


# -- one answer per request head (agent.metrics_http) ---------------------------------------------


def server() -> MetricsServer:
    return MetricsServer(sock=None, render=registry_renderer(Fixed(CANARY)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200, id="metrics"),
        pytest.param(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", 200, id="query"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", 200, id="index"),
        pytest.param(b"GET /other HTTP/1.1\r\n\r\n", 404, id="not-found"),
        pytest.param(b"POST /metrics HTTP/1.1\r\n\r\n", 405, id="post"),
        pytest.param(b"GET /metrics\r\n\r\n", 400, id="http-0.9"),
        pytest.param(b"\x16\x03\x01 TLS hello\r\n\r\n", 400, id="tls"),
    ],
)
def test_answers(head: bytes, status: int) -> None:
    """Each request head gets one whole answer with its length, and the connection closes."""
    answer = server().answer(head)
    top, _, body = answer.partition(b"\r\n\r\n")
    assert top.startswith(f"HTTP/1.1 {status} ".encode())
    assert f"Content-Length: {len(body)}".encode() in top and b"Connection: close" in top


def test_head_has_no_body_and_the_format_is_openmetrics() -> None:
    """HEAD answers the head alone; GET is OpenMetrics 1.0 text (whatever the Accept header),
    which prometheus_client's OpenMetrics parser reads back to the same samples."""
    s = server()
    top, _, body = s.answer(b"HEAD /metrics HTTP/1.1\r\n\r\n").partition(b"\r\n\r\n")
    assert body == b"" and b"Content-Type: application/openmetrics-text; version=1.0.0" in top
    om = s.answer(b"GET /metrics HTTP/1.1\r\nAccept: text/plain\r\n\r\n")
    top, _, body = om.partition(b"\r\n\r\n")
    assert b"application/openmetrics-text" in top and body.endswith(b"# EOF\n")
    parsed = {(x.name, tuple(sorted(x.labels.items()))): x.value
              for f in openmetrics_families(body.decode()) for x in f.samples}
    assert parsed == scrape(CANARY)


def test_a_collector_bug_costs_one_scrape() -> None:
    """A collector that raises is a 500 for that scrape, logged, never an agent crash."""

    def broken() -> tuple[bytes, str]:
        raise RuntimeError("bug")

    answer = MetricsServer(sock=None, render=broken).answer(  # type: ignore[arg-type]
        b"GET /metrics HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500 ")
