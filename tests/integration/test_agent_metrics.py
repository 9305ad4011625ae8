"""End to end: ``fleetwave-agent --metrics`` on a dev fleet of 2 real agents (127.0.65.i, metrics
on 127.0.65.i:9464) running the example ``hello`` behind their routers, under real HTTP traffic.

A canary of 2.2.0 (every other answer a 500) at weight 25 against 2.0.0 fails its error-rate gate
and pauses (``--on-failure pause``: the canary keeps serving its share). Every agent is scraped
all along (every 0.15 s; the agents read their routers every 0.5 s while a canary splits traffic):

- the two versions are one label apart: 2.2.0 answers about half its requests with 5xx and about
  a quarter of the node's traffic, 2.0.0 no 5xx at all;
- a scrape and the observed state the agent wrote from the same router read (the same ``time``)
  hold the very same counters, slot by slot: exact, no tolerance;
- the gate's figures in ``fleetwave status -o json`` (requests, errors, old requests over its
  bake) are what the scrapes show between the wave's baseline read (in the rollout record, which
  a scrape of the same read must equal exactly) and the read the coordinator judged on. That read
  is one of the reads each agent made in the ``JUDGE_LAG`` seconds before the gate.failed event:
  when the scraper saw all of them, some choice of them must give the gate's figures exactly;
  else (a read missed on a loaded machine, maybe the judged one) the figures must lie between
  what the reads seen just before and just after that window show (counters only grow):
  "within one scrape", said as counts.

Also: every agent metric the Grafana board names is in a real scrape; a taken address is one line
and exit 2 before anything is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from coordinator.dev.devfleet import DevFleet
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode
from protocol.messages import ObservedState, RouterStats
from tests import board
from tests.integration.e2e_support import (
    deploy_detached,
    events_of,
    install,
    loaded,
    push,
    record_of,
    status,
)
from tests.integration.procs import wait_until

SUBNET = "127.0.65"
AGENTS = 2
METRICS_PORT = 9464
SCRAPE_EVERY = 0.15
# The coordinator judges on the newest observed state it has: written by the agent right after
# a router read (every 0.5 s here), then carried by the bus. 2 s holds that with room to spare
# on a shared machine; the exact match below does not depend on it, only the bracket.
JUDGE_LAG = 2.0
OLD, NEW = "2.0.0", "2.2.0"

Key = tuple[str, frozenset[tuple[str, str]]]


def fleet_of(tmp_path: Path) -> DevFleet:
    fleet = DevFleet(tmp_path / "fleet", agents=AGENTS, subnet=SUBNET, heartbeat_interval=0.5)
    for i in range(1, AGENTS + 1):
        fleet.agent(i).argv += ["--metrics", f"{fleet.host(i)}:{METRICS_PORT}"]
    return fleet


async def http_get(host: str, port: int, path: str = "/metrics") -> tuple[int, str]:
    """(status, body) of one GET; the agent closes the connection after its answer."""
    async with asyncio.timeout(5.0):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@dataclass(frozen=True)
class Scrape:
    """One scrape of one agent (OpenMetrics), parsed with prometheus_client's own parser."""

    node: str
    samples: dict[Key, float]
    names: frozenset[str]  # every sample name its families declare (with or without samples)

    @classmethod
    def parse(cls, node: str, text: str) -> Scrape:
        families = list(text_string_to_metric_families(text))
        samples = {(s.name, frozenset(s.labels.items())): s.value
                   for f in families for s in f.samples}
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names = {f.name + x for f in families for x in suffixes.get(f.type, ("",))}
        return cls(node, samples, frozenset(names))

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    @property
    def read_time(self) -> float | None:
        """When the agent read the router counters this scrape shows."""
        return self.samples.get(("fleetwave_router_stats_timestamp_seconds",
                                 frozenset({("service", "hello")})))

    def slots(self) -> dict[str, str]:
        """Slot -> the version it runs, as the scrape labels it."""
        return {dict(ls)["slot"]: dict(ls)["version"]
                for (n, ls), _ in self.samples.items() if n == "fleetwave_slot_healthy"}

    def requests(self, version: str) -> int:
        return int(self.total("fleetwave_router_requests_total", service="hello",
                              version=version))

    def errors(self, version: str) -> int:
        return int(self.total("fleetwave_router_requests_total", service="hello",
                              version=version, code="5xx"))


async def scrape(fleet: DevFleet, i: int) -> Scrape:
    code, text = await http_get(fleet.host(i), METRICS_PORT)
    assert code == 200, text
    return Scrape.parse(f"node-{i}", text)


@contextlib.asynccontextmanager
async def scraping(fleet: DevFleet) -> AsyncIterator[dict[str, dict[float, Scrape]]]:
    """Scrape every agent every SCRAPE_EVERY s while the block runs: per node, one scrape per
    router read it showed (by the read's time)."""
    seen: dict[str, dict[float, Scrape]] = {f"node-{i}": {} for i in range(1, AGENTS + 1)}

    async def loop() -> None:
        while True:
            for i in range(1, AGENTS + 1):
                with contextlib.suppress(OSError, TimeoutError):
                    s = await scrape(fleet, i)
                    if s.read_time is not None:
                        seen[s.node].setdefault(s.read_time, s)
            await asyncio.sleep(SCRAPE_EVERY)  # the scrape interval itself, not a race

    task = asyncio.create_task(loop())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def observed(bus: Bus, node: str) -> ObservedState:
    entry = await bus.kv_get(subjects.observed_bucket(bus.fleet), f"{node}.hello")
    assert entry is not None and entry.value, f"no observed state of {node}"
    return decode(ObservedState, entry.value)


def assert_same_counters(s: Scrape, stats: RouterStats) -> None:
    """Every slot's counters in the scrape are the router stats' own, exactly."""
    versions = s.slots()
    for slot, t in stats.slots.items():
        if slot not in versions and slot != "router":
            continue
        labels = {"service": "hello", "slot": slot, "version": versions.get(slot, "")}
        assert s.total("fleetwave_router_requests_total", **labels) == t.requests, (slot, t)
        assert s.total("fleetwave_router_requests_total", **labels, code="5xx") == t.errors
        for code, n in t.codes.items():
            assert s.total("fleetwave_router_requests_total", **labels, code=code) == n
        assert s.total("fleetwave_router_upstream_failures_total", **labels) == t.failures
        name = "fleetwave_router_request_duration_seconds"
        assert s.total(f"{name}_count", **labels) == sum(t.latency)
        assert abs(s.total(f"{name}_sum", **labels) - t.latency_sum_ms / 1000) < 1e-9
        assert s.total(f"{name}_bucket", **labels, le="+Inf") == sum(t.latency)


def window(s: Scrape, base: RouterStats, version: str) -> tuple[int, int]:
    """(requests, errors) of ``version`` between the baseline read and scrape ``s``."""
    slots = [slot for slot, v in s.slots().items() if v == version]
    before = [base.slots[slot] for slot in slots if slot in base.slots]
    return (s.requests(version) - sum(t.requests for t in before),
            s.errors(version) - sum(t.errors for t in before))


async def test_canary_and_stable_are_one_label_apart_and_match_the_gate(tmp_path: Path) -> None:
    """Scrapes of every agent tell 2.2.0 (half its answers 5xx, a quarter of the traffic) from
    2.0.0 (no 5xx) by the version label, equal the observed state of the same router read, and
    give the gate's figures (see the module docstring for the tolerance)."""
    async with fleet_of(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, OLD, NEW)
        await install(fleet, OLD)
        bus = await Bus.connect(url, fleet.fleet, name="test-agent-metrics")
        try:
            async with loaded(fleet, rate=15.0), scraping(fleet) as seen:
                rid = await deploy_detached(
                    url, NEW, "--strategy", "canary", "--weights", "25,100", "--bake", "4s",
                    "--max-unavailable", "100%", "--max-error-rate", "5%",
                    "--min-requests", "20", "--on-failure", "pause")
                st = await wait_until(lambda: status(url, rid), lambda s: s["state"] != "running",
                                      timeout=90, what="the canary's gate to decide")
                assert st["state"] == "paused", st["reason"]

                # Exact: a scrape of the read the observed state reports holds its counters.
                for i in range(1, AGENTS + 1):
                    node = f"node-{i}"

                    async def pair(i: int = i, node: str = node) -> tuple[Scrape, ObservedState]:
                        return await scrape(fleet, i), await observed(bus, node)

                    s, obs = await wait_until(
                        pair, lambda p: p[1].router is not None
                        and p[0].read_time == p[1].router.time,
                        timeout=20, interval=0.05, what=f"a scrape of {node}'s reported read")
                    assert obs.router is not None
                    assert_same_counters(s, obs.router)
                    assert s.slots() == {"a": OLD, "b": NEW} or s.slots() == {"a": NEW, "b": OLD}
                    # The paused canary still serves its share: weights as the rollout set them.
                    weights = {v: s.total("fleetwave_router_weight", version=v)
                               for v in (OLD, NEW)}
                    assert weights[NEW] / (weights[NEW] + weights[OLD]) == 0.25, weights
                evs = await events_of(url, rid)
                judged_at = min(float(e["time"]) for e in evs if e["kind"] == "gate.failed")
                # Every node's first read after the judgement, the bracket's upper end: on a
                # loaded machine the scraper could stop before it saw one (a CI run's failure:
                # the bracket then ended at a read before the judged one).
                await wait_until(
                    lambda: asyncio.sleep(0, seen),
                    lambda got: all(any(t > judged_at for t in reads) for reads in got.values()),
                    timeout=20, what="a read of every node after the gate's judgement")
                last = {node: await scrape(fleet, int(node[-1])) for node in seen}
            record = await record_of(bus, rid)
        finally:
            await bus.close()

        g = st["waves"][0]["gates"]
        assert g["outcome"] == "fail" and g["requests"] >= 20, g
        wave = record.waves[0]
        assert set(wave.baseline) == set(seen), wave.baseline.keys()

        # Versions apart, over the gate's window as the scrapes show it.
        exact = True
        choices = []
        brackets = []  # per node: the reads seen just outside the window, else its first/last
        for node, reads in seen.items():
            base = wave.baseline[node]
            at_base = reads.get(base.time)
            if at_base is not None:  # the scraper saw the baseline read: the same counters
                assert_same_counters(at_base, base)
            near = [reads[t] for t in sorted(reads) if judged_at - JUDGE_LAG <= t <= judged_at]
            assert near, f"no read of {node} seen in the {JUDGE_LAG}s before the gate"
            choices.append([(window(s, base, NEW), window(s, base, OLD)[0]) for s in near])
            before = [reads[t] for t in sorted(reads) if t < judged_at - JUDGE_LAG][-1:]
            after = [reads[t] for t in sorted(reads) if t > judged_at][:1]
            brackets.append([(window(s, base, NEW), window(s, base, OLD)[0])
                             for s in (before or near[:1]) + (after or near[-1:])])
            (new_req, new_err), old_req = choices[-1][-1]
            assert new_req >= 10 and 0.4 <= new_err / new_req <= 0.6, (node, new_req, new_err)
            assert window(near[-1], base, OLD)[1] == 0, f"{OLD} answered a 5xx on {node}"
            assert 0.15 <= new_req / (new_req + old_req) <= 0.35, (node, new_req, old_req)

        # The gate's figures: exactly one choice of the judged reads, else between them.
        wanted = (g["requests"], g["errors"], g["old_requests"])
        sums = {tuple(map(sum, zip(*((r, e, o) for (r, e), o in combo), strict=True)))
                for combo in itertools.product(*choices)}
        if wanted not in sums:
            exact = False
            low = tuple(map(sum, zip(*((r, e, o) for (r, e), o in (c[0] for c in brackets)),
                                     strict=True)))
            high = tuple(map(sum, zip(*((r, e, o) for (r, e), o in (c[-1] for c in brackets)),
                                      strict=True)))
            assert all(lo <= w <= hi for lo, w, hi in zip(low, wanted, high, strict=True)), (
                low, wanted, high)
        how = "exactly those of one choice of the reads" if exact else "between the reads"
        print(f"\ngate figures (requests, errors, old requests) {wanted}: {how} scraped; "
              f"reads scraped per node {[len(r) for r in seen.values()]}")

        # Every agent metric the Grafana board names is in a real scrape (declared: the mirror's
        # families have no series without a shadow).
        served = {n for s in last.values() for n in s.names}
        assert {n for s in last.values() for n, _ in s.samples} <= served
        agent_names = {n for n in board.names(board.load()) if not board.coordinator_name(n)}
        assert agent_names <= served, agent_names - served


def test_a_taken_metrics_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """--metrics on an address another process holds: one line naming it, exit 2, nothing done
    (no data dir made, no broker asked: none runs here)."""
    holder = socket.create_server((f"{SUBNET}.9", 0))
    port = holder.getsockname()[1]
    data = tmp_path / "agent"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent.main", "--node-id", "n1", "--data-dir", str(data),
             "--nats", f"nats://{SUBNET}.9:1", "--metrics", f"{SUBNET}.9:{port}"],
            capture_output=True, text=True, timeout=30)
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot listen on {SUBNET}.9:{port}" in lines[0] and "already in use" in lines[0]
    assert not data.exists()


async def test_metrics_are_served_while_the_agent_waits_for_nats(tmp_path: Path) -> None:
    """Before any broker answers, /metrics already says who the agent is and that it is not
    connected; other paths and methods get 404 and 405; SIGTERM stops it (exit 0)."""
    port = _free_port(f"{SUBNET}.8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.main", "--node-id", "n8", "--label", "zone=z",
        "--data-dir", str(tmp_path / "agent"), "--nats", f"nats://{SUBNET}.8:1",
        "--metrics", f"{SUBNET}.8:{port}", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, text = await wait_until(lambda: http_get(f"{SUBNET}.8", port), lambda r: r[0] == 200,
                                   timeout=20, what="the agent's /metrics")
        s = Scrape.parse("n8", text)
        assert s.total("fleetwave_agent_info", node="n8") == 1
        assert s.total("fleetwave_node_label_info", label="zone", value="z") == 1
        assert s.total("fleetwave_agent_connected") == 0
        assert 0 < s.total("fleetwave_agent_resident_memory_bytes") < 64 * 2**20
        assert (await http_get(f"{SUBNET}.8", port, "/nope"))[0] == 404
        async with asyncio.timeout(5.0):
            reader, writer = await asyncio.open_connection(f"{SUBNET}.8", port)
            writer.write(b"POST /metrics HTTP/1.1\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 405 ")
            writer.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(15.0):
            rc = await proc.wait()
    assert rc == 0, (await proc.stderr.read()).decode() if proc.stderr else rc


def _free_port(host: str) -> int:
    with socket.create_server((host, 0)) as s:
        port: int = s.getsockname()[1]
    return port


async def test_slow_or_too_many_clients_cannot_hold_the_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that sends no request head is cut at HEAD_TIMEOUT; beyond MAX_CLIENTS at once a
    connection is closed unanswered; a real scrape is answered all the while or right after; the
    server's end closes every connection it holds."""
    from agent import metrics_http

    monkeypatch.setattr(metrics_http, "HEAD_TIMEOUT", 0.5)
    sock = metrics_http.bind(f"{SUBNET}.7", 0)
    host, port = sock.getsockname()[:2]
    server = metrics_http.MetricsServer(sock, lambda: (b"x 1\n", "text/plain"))
    serving = asyncio.create_task(server.serve())
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await wait_until(lambda: http_get(host, port), lambda r: r[0] == 200, timeout=10,
                         what="the endpoint")
        for _ in range(metrics_http.MAX_CLIENTS):
            idle.append(await asyncio.open_connection(host, port))
        await wait_until(lambda: _count(server), lambda n: n == metrics_http.MAX_CLIENTS,
                         timeout=5, what="every idle client held")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # closed with the request unread
            async with asyncio.timeout(2.0):
                assert await reader.read() == b"", "a client over MAX_CLIENTS was served"
        writer.close()
        # The idle ones are cut at HEAD_TIMEOUT (closed without an answer), then scrapes work.
        async with asyncio.timeout(5.0):
            for r, _ in idle:
                assert await r.read() == b""
        assert (await http_get(host, port)) == (200, "x 1\n")
        # A client in the middle of its head when the server stops is closed with it.
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET /metrics HTTP/1.1\r\n")
        await wait_until(lambda: _count(server), lambda n: n == 1, timeout=5,
                         what="the half-sent request held")
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        for _, w in idle:
            w.close()
    with contextlib.suppress(ConnectionResetError):  # aborted: a reset is a close too
        async with asyncio.timeout(2.0):
            assert await r.read() == b""
    w.close()


async def _count(server: object) -> int:
    return len(server._clients)  # type: ignore[attr-defined]  # the test looks inside
