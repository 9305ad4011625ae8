"""The coordinator's /metrics end to end: a dev fleet of 3 real agents running the example
``hello`` behind their routers (127.0.66.i:8080) under real HTTP traffic, rolled with the real
CLI, its coordinator serving ``--http`` on 127.0.66.250; scraped over HTTP and read with
Prometheus' own parser. What the metrics say is checked against ``fleetwave status -o json``.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.api.rollouts import status_dict
from coordinator.dev.broker import free_port
from coordinator.dev.devfleet import DevFleet
from coordinator.runtime import notify_doc as doc
from protocol.bus import Bus
from tests import board
from tests.integration.e2e_support import (
    DEPLOY_TIMEOUT,
    Receiver,
    deploy_detached,
    install,
    loaded,
    push,
    receivers,
    record_of,
    status,
)
from tests.integration.procs import fleetwave, reaping, spawn_coordinator, wait_until

SUBNET = "127.0.66"
HTTP_HOST = f"{SUBNET}.250"
STANDBY_HOST = f"{SUBNET}.251"
SECRET = "per-target-secret"
# Gates as the canary e2e test sets them (its comments say why p99 is this generous).
GATES = ("--max-error-rate", "1%", "--max-p99-ratio", "20", "--min-requests", "10")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5.0) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return str(resp.read().decode())


async def scrape(base: str) -> Samples:
    """One scrape of ``base``/metrics: (name, sorted labels) -> value."""
    text = await asyncio.to_thread(_get, f"{base}/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(m: Samples, name: str, **labels: str) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


def series(m: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name`` whose labels include ``labels``."""
    return {lab: v for (n, lab), v in m.items()
            if n == name and set(labels.items()) <= set(lab)}


def latest_gates(st: dict[str, Any]) -> dict[str, Any] | None:
    """The figures of the latest evaluated wave of a ``status -o json``."""
    evaluated = [w["gates"] for w in st["waves"] if "requests" in w["gates"]]
    return evaluated[-1] if evaluated else None


def assert_figures_match(m: Samples, rid: str, gates: dict[str, Any]) -> None:
    """The gate gauges of rollout ``rid`` are the figures its record holds."""
    r = {"rollout": rid, "service": "hello"}
    assert get(m, "fleetwave_gate_requests", side="new", **r) == gates["requests"]
    assert get(m, "fleetwave_gate_requests", side="old", **r) == gates["old_requests"]
    assert get(m, "fleetwave_gate_error_ratio", side="new", **r) == gates["error_rate"]
    assert get(m, "fleetwave_gate_error_ratio", side="old", **r) == gates["old_error_rate"]
    assert get(m, "fleetwave_gate_p99_ratio", **r) == gates["p99_ratio"]


def fleet_serving_http(tmp_path: Path, *extra: str) -> tuple[DevFleet, str]:
    port = free_port(HTTP_HOST)
    fleet = DevFleet(tmp_path / "fleet", agents=3, subnet=SUBNET, heartbeat_interval=0.5)
    fleet.coordinator.argv += ["--http", f"{HTTP_HOST}:{port}", *extra]
    return fleet, f"http://{HTTP_HOST}:{port}"


@pytest.mark.timeout(240)
async def test_a_canary_under_load_moves_the_metrics_and_matches_its_gates(
        tmp_path: Path) -> None:
    """A canary of 2.0.0 at 25% of node-1's traffic, then node-1, then every node, each step
    gated over a 2 s bake under load: scraped all along, the rollout's wave and set weight move
    forward step by step, and the gate gauges equal the record's figures (status -o json read
    right before and after the scrape); after it, one gate decision per gate and step, the
    durations, and the bus latency are there. A standby coordinator serves what it reads, and
    says it does not lead. A killed agent shows down."""
    fleet, base = fleet_serving_http(tmp_path)
    async with fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        m = await scrape(base)
        assert get(m, "fleetwave_coordinator_leader") == 1
        assert get(m, "fleetwave_nodes", state="online") == 3
        assert get(m, "fleetwave_nodes", state="offline") == 0
        assert all(get(m, "fleetwave_node_up", node=f"node-{i}") == 1 for i in (1, 2, 3))
        assert get(m, "fleetwave_node_label_info", node="node-1", label="zone", value="a") == 1
        assert get(m, "fleetwave_node_label_info", node="node-2", label="zone", value="b") == 1
        [(info, one)] = series(m, "fleetwave_coordinator_info").items()
        assert dict(info)["fleet"] == "default" and one == 1

        moves: list[tuple[float, float]] = []  # (wave, weight) as scraped, in order
        compared_running = 0
        bus = await Bus.connect(url, fleet.fleet, name="fleetwave-test")
        try:
            async with loaded(fleet) as traffic:
                rid = await deploy_detached(url, "2.0.0", "--strategy", "canary", "--steps",
                                            "1,100%", "--weights", "25,100", "--bake", "3s",
                                            *GATES)
                key = {"rollout": rid, "service": "hello"}
                deadline = time.monotonic() + DEPLOY_TIMEOUT
                while True:
                    # What `status -o json` shows (the same function over the same record), read
                    # right before and after the scrape: a tight poll the CLI is too slow for.
                    before = status_dict(await record_of(bus, rid))
                    m = await scrape(base)
                    after = status_dict(await record_of(bus, rid))
                    wave = get(m, "fleetwave_rollout_wave", **key)
                    weight = get(m, "fleetwave_rollout_weight", **key)
                    if wave is not None and weight is not None:
                        moves.append((wave, weight))
                    gates = latest_gates(before)
                    if gates is not None and gates == latest_gates(after):
                        assert_figures_match(m, rid, gates)  # within one scrape
                        compared_running += after["state"] == "running"
                    if after["state"] != "running" or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
        finally:
            await bus.close()
        assert traffic.report.failed == 0 and traffic.report.requests > 0, traffic.report.failures
        st = await status(url, rid)
        assert st["state"] == "succeeded", st["reason"]
        assert compared_running >= 1, "never compared the figures while the canary ran"
        # Forward only: wave 1 (node-1 at 25 of 100, the others at 0: 8.3), wave 2 (node-1 all
        # in: 33.3), wave 3 (everyone: 100).
        assert moves == sorted(moves), moves
        assert {round(w) for _, w in moves} >= {8, 33, 100}, moves
        assert {int(w) for w, _ in moves} == {1, 2, 3}, moves

        m = await scrape(base)
        assert get(m, "fleetwave_rollout_info", rollout=rid, service="hello",
                   strategy="canary", version="2.0.0", state="succeeded") == 1
        assert get(m, "fleetwave_rollout_wave", **key) == get(
            m, "fleetwave_rollout_waves", **key) == 3
        assert get(m, "fleetwave_rollout_weight", **key) == 100
        assert get(m, "fleetwave_rollout_nodes", state="done", **key) == 3
        gates = latest_gates(st)
        assert gates is not None
        assert_figures_match(m, rid, gates)
        for gate in ("error_rate", "p99_ratio", "min_requests"):
            assert get(m, "fleetwave_gate_decisions_total", service="hello", gate=gate,
                       result="pass") == 3, gate
        assert not series(m, "fleetwave_gate_decisions_total", result="fail")
        # The install (rolling) and the canary each ended once.
        assert get(m, "fleetwave_rollout_duration_seconds_count", strategy="canary",
                   result="succeeded") == 1
        assert get(m, "fleetwave_rollout_duration_seconds_count", strategy="rolling",
                   result="succeeded") == 1
        took = get(m, "fleetwave_rollout_duration_seconds_sum", strategy="canary",
                   result="succeeded")
        assert took == pytest.approx(st["finished"] - st["created"], abs=0.5), took
        assert (get(m, "fleetwave_bus_request_duration_seconds_count", op="kv_fenced_all")
                or 0) > 0
        assert (get(m, "fleetwave_bus_request_duration_seconds_count", op="kv_entries")
                or 0) > 0
        assert get(m, "fleetwave_rollouts", service="hello", strategy="canary",
                   state="succeeded") == 1
        # Every coordinator metric the Grafana board queries is in this real scrape.
        used = {n for n in board.names(board.load()) if board.coordinator_name(n)}
        assert used and used <= {name for name, _ in m}, used - {name for name, _ in m}

        # A standby (same key, same fleet) serves what it can read, and does not lead.
        port = free_port(STANDBY_HOST)
        standby = spawn_coordinator(url, tmp_path / "standby", extra=[
            "coordinator", "--key-file", str(fleet.key_file),
            "--http", f"{STANDBY_HOST}:{port}"])
        async with reaping(standby):
            sb = f"http://{STANDBY_HOST}:{port}"
            m = await wait_until(lambda: scrape(sb), lambda m: get(
                m, "fleetwave_nodes", state="online") == 3, timeout=30, what="standby's nodes")
            assert get(m, "fleetwave_coordinator_leader") == 0
            assert get(m, "fleetwave_rollout_info", rollout=rid, service="hello",
                       strategy="canary", version="2.0.0", state="succeeded") == 1
            assert_figures_match(m, rid, gates)
            assert not series(m, "fleetwave_gate_decisions_total")  # it decided nothing

        # A killed agent: its node goes down within a few missed heartbeats.
        await fleet.agent(3).kill()
        m = await wait_until(lambda: scrape(base),
                             lambda m: get(m, "fleetwave_node_up", node="node-3") == 0,
                             timeout=15, what="node-3 down in /metrics")
        assert get(m, "fleetwave_nodes", state="offline") == 1
        assert get(m, "fleetwave_nodes", state="online") == 2
        assert get(m, "fleetwave_node_up", node="node-1") == 1


@pytest.mark.timeout(240)
async def test_a_rollback_and_refused_deploys_are_counted_and_notified(tmp_path: Path) -> None:
    """The coordinator configured by a --config file ([[notify]] with its own secret, http):
    a deploy no node matches and one of a release never pushed are refused (exit 2) and each
    is notified once, signed with that target's secret, with who and why, and counted; then
    2.2.0 (every other answer a 500) is caught at its first step: the failed gate is counted
    with its figures, and the rollback is timed."""
    hook = Receiver(f"{SUBNET}.101")
    await hook.start()
    port = free_port(HTTP_HOST)
    config = tmp_path / "coordinator.toml"
    config.write_text(f'http = "{HTTP_HOST}:{port}"\n\n[[notify]]\nurl = "{hook.url}"\n'
                      f'secret = "{SECRET}"\n')
    base = f"http://{HTTP_HOST}:{port}"
    fleet = DevFleet(tmp_path / "fleet", agents=3, subnet=SUBNET, heartbeat_interval=0.5)
    fleet.coordinator.argv += ["--config", str(config)]
    async with receivers(hook), fleet:
        url = fleet.nats_url
        await push(url, "2.0.0", "2.2.0")
        await install(fleet, "2.0.0")

        code, _, err = await fleetwave("deploy", "hello", "2.2.0", "--selector", "zone=nowhere",
                                       nats_url=url)
        assert code == 2 and "no node matches" in err, err
        code, _, err = await fleetwave("deploy", "hello", "9.9.9", nats_url=url)
        assert code == 2 and "9.9.9" in err, err
        refused = await wait_until(
            lambda: asyncio.sleep(0, [d for d in hook.documents() if d["what"] == "refused"]),
            lambda docs: len(docs) == 2, timeout=15, what="2 refusals notified")
        nowhere, missing = sorted(refused, key=lambda d: d["to_version"])
        assert nowhere["reason"].startswith("no node matches") and nowhere["who"]
        assert (nowhere["rollout"], nowhere["service"], nowhere["severity"]) == (
            "", "hello", "warning")
        assert missing["to_version"] == "9.9.9" and "9.9.9" in missing["reason"]
        for _, headers, body in hook.accepted:
            assert doc.verify(SECRET.encode(), body, headers, now=time.time())
        m = await scrape(base)
        assert get(m, "fleetwave_rollouts_refused_total", service="hello", code="usage") == 2

        async with loaded(fleet):
            code, out, err = await fleetwave(
                "deploy", "hello", "2.2.0", "--strategy", "canary", "--steps", "1,100%",
                "--bake", "3s", "--max-error-rate", "5%", "--min-requests", "10",
                nats_url=url, timeout=DEPLOY_TIMEOUT)
        assert code == 3, f"2.2.0 should roll back, got {code}: {out}{err}"
        st = await status(url)
        rid = st["id"]
        assert st["state"] == "rolled_back"
        m = await scrape(base)
        assert get(m, "fleetwave_rollout_info", rollout=rid, service="hello", strategy="canary",
                   version="2.2.0", state="rolled_back") == 1
        assert get(m, "fleetwave_rollout_weight", rollout=rid, service="hello") == 0
        assert get(m, "fleetwave_gate_decisions_total", service="hello", gate="error_rate",
                   result="fail") == 1
        gates = latest_gates(st)
        assert gates is not None and gates["error_rate"] > 0.05
        assert_figures_match(m, rid, gates)
        assert get(m, "fleetwave_rollback_duration_seconds_count") == 1
        rollback = get(m, "fleetwave_rollback_duration_seconds_sum")
        assert rollback is not None and 0 < rollback < 30
        assert get(m, "fleetwave_rollout_duration_seconds_count", strategy="canary",
                   result="rolled_back") == 1
        print(f"\nrollback took {rollback:.3f}s; notified: "
              f"{json.dumps(sorted(d['what'] for d in hook.documents()))}")
