"""End to end: the canary strategy on a dev fleet of 4 real agents running the example ``hello``
service behind their routers (127.0.9.i:8080), driven with the real CLI under real HTTP traffic.

Traffic is one ``coordinator.dev.traffic.Traffic`` per node, so that every failed request is counted
on the node that answered it: a canary that is caught at its first step can only have hurt the
users of that step's nodes, and only with the new slot's share of their traffic.

Prints (run with -s) for the 50% error-rate release: the time from the canary's first step
starting to the rollback finishing, and the number and share of failed user requests.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.dev.devfleet import DevFleet
from coordinator.dev.traffic import Traffic, TrafficReport, probe_version
from tests.integration.procs import fleetwave, hello_bundle, wait_until

SUBNET = "127.0.9"
AGENTS = 4
PORT = 8080
DEPLOY_TIMEOUT = 90.0
RATE = 25.0  # requests per second per worker; 2 workers per node
# Bounds of the share of failed requests leave room for rounding, not for a leak: 2.2.0 fails
# exactly every other request it answers, and the routers split by smooth weighted round-robin.
SLACK = 0.02


def fleet_of(tmp_path: Path) -> DevFleet:
    return DevFleet(tmp_path / "fleet", agents=AGENTS, subnet=SUBNET, heartbeat_interval=0.5)


async def push(url: str, *versions: str) -> None:
    for v in versions:
        code, _, err = await fleetwave("release", "push", str(hello_bundle(v)), nats_url=url)
        assert code == 0, err


async def install(fleet: DevFleet, version: str) -> None:
    """Every node on ``version`` (all at once: nothing serves yet), checked through the routers."""
    code, out, err = await fleetwave("deploy", "hello", version, "--batch", "100%",
                                     "--max-unavailable", "100%", nats_url=fleet.nats_url,
                                     timeout=DEPLOY_TIMEOUT)
    assert code == 0, f"installing {version} failed ({code}): {out}{err}"
    await wait_until(lambda: versions(fleet), lambda v: set(v.values()) == {version},
                     timeout=30, what=f"every node serving {version}")


async def versions(fleet: DevFleet) -> dict[str, str]:
    """What each node's router answers now (a reason in <> if not a version)."""
    return {f"node-{i}": await probe_version(fleet.host(i), PORT)
            for i in range(1, AGENTS + 1)}


async def status(url: str, rid: str = "") -> dict[str, Any]:
    code, out, err = await fleetwave("status", *([rid] if rid else []), "-o", "json",
                                     nats_url=url)
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


async def events_of(url: str, rid: str) -> list[dict[str, Any]]:
    code, out, err = await fleetwave("events", "--rollout", rid, "-o", "json", nats_url=url)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    assert "Traceback" not in text
    return lines[0]


@dataclass
class Load:
    """One Traffic per node; reports per node once stopped."""

    per_node: dict[str, TrafficReport]

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.per_node.values())

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.per_node.values())

    @property
    def share(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def failures(self) -> list[str]:
        return [f for r in self.per_node.values() for f in r.failures][:10]


@contextlib.asynccontextmanager
async def load_on(fleet: DevFleet) -> AsyncIterator[Load]:
    """Steady traffic through every node's router while the block runs."""
    traffic = {f"node-{i}": Traffic([(fleet.host(i), PORT)], rate=RATE)
               for i in range(1, AGENTS + 1)}
    load = Load({})
    for t in traffic.values():
        t.start()
    try:
        yield load
    finally:
        for node, t in traffic.items():
            load.per_node[node] = await t.stop()


async def deploy(url: str, *args: str) -> tuple[int, str, str, str]:
    """``fleetwave deploy hello ARGS`` followed to its end: (exit code, out, err, rollout id)."""
    code, out, err = await fleetwave("deploy", "hello", *args, nats_url=url,
                                     timeout=DEPLOY_TIMEOUT)
    rid = (await status(url))["id"]
    return code, out, err, rid


def event_time(evs: list[dict[str, Any]], kind: str, **match: Any) -> float:
    times = [float(e["time"]) for e in evs
             if e["kind"] == kind and all(e.get("data", {}).get(k) == v for k, v in match.items())]
    assert times, f"no {kind} event {match or ''} in {[e['kind'] for e in evs]}"
    return min(times)


# -- the tests -------------------------------------------------------------------------------------


async def test_healthy_canary_passes_every_step_without_a_failed_request(tmp_path: Path) -> None:
    """Steps 1,50%,100% with weights 25,100 on the first step, gated on error rate, p99 ratio and
    min-requests: every step passes with figures next to thresholds, no request fails."""
    async with fleet_of(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        async with load_on(fleet) as load:
            code, out, err, rid = await deploy(
                url, "2.0.0", "--strategy", "canary", "--steps", "1,50%,100%",
                "--weights", "25,100", "--bake", "2s", "--max-error-rate", "1%",
                # Generous: with ~40 requests a window, p99 is about the slowest answer, and on
                # a shared machine one scheduling hiccup (seen: 5.7 ms against a 0.76 ms
                # baseline, x7.5, while fuzzers loaded both cores) is not a regression. The gate
                # itself is tested on 2.3.0's +200 ms below.
                "--max-p99-ratio", "20", "--min-requests", "10")
            assert code == 0, f"healthy canary failed ({code}): {out}{err}"
        assert load.failed == 0, load.failures()
        assert load.per_node["node-1"].versions.keys() >= {"1.0.0", "2.0.0"}
        assert set((await versions(fleet)).values()) == {"2.0.0"}

        st = await status(url, rid)
        assert st["state"] == "succeeded"
        assert [(w["weight"], w["nodes"]) for w in st["waves"]] == [
            (25, ["node-1"]), (100, ["node-1"]), (100, ["node-2"]), (100, ["node-3", "node-4"])]
        for w in st["waves"]:
            g = w["gates"]
            assert w["state"] == "passed" and g["outcome"] == "pass", w
            assert g["requests"] >= 10 and g["errors"] == 0, g
            assert g["thresholds"]["max_error_rate"] == 0.01
            assert g["thresholds"]["max_p99_ratio"] == 20.0
            assert g["thresholds"]["min_requests"] == 10
        # The weighted wave sent about a quarter of node-1's traffic to the new slot.
        first = st["waves"][0]["gates"]
        assert 0 < first["requests"] < first["old_requests"]

        code, out, err = await fleetwave("status", rid, nats_url=url)
        assert code == 0, err
        assert "max 1.00%" in out and "max x20" in out and "min 10" in out, out


async def test_error_rate_is_caught_at_the_first_step_and_rolled_back(tmp_path: Path) -> None:
    """2.2.0 (every other answer a 500) is caught at the first step, by steps and by weights, and
    rolled back (exit 3); only the first step's share of users saw an error."""
    async with fleet_of(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "2.0.0", "2.2.0")
        await install(fleet, "2.0.0")

        # Steps: one of the 4 nodes gets 2.2.0, so at most 1/4 x 50% of requests fail.
        async with load_on(fleet) as load:
            code, out, err, rid = await deploy(
                url, "2.2.0", "--strategy", "canary", "--steps", "1,50%,100%", "--bake", "3s",
                "--max-error-rate", "5%", "--min-requests", "20")
        assert code == 3, f"2.2.0 should roll back, got {code}: {out}{err}"
        assert set((await versions(fleet)).values()) == {"2.0.0"}
        st = await status(url, rid)
        assert st["state"] == "rolled_back" and "max-error-rate" in st["reason"], st["reason"]
        assert [w["state"] for w in st["waves"]] == ["failed", "waiting", "waiting"]
        g = st["waves"][0]["gates"]
        assert g["outcome"] == "fail" and g["error_rate"] > 0.05, g
        assert g["thresholds"]["max_error_rate"] == 0.05
        assert all(p["state"] == "waiting" for n, p in st["nodes"].items() if n != "node-1")
        assert load.failed > 0, "the canary node's users never saw 2.2.0's errors"
        assert all(load.per_node[n].failed == 0 for n in ("node-2", "node-3", "node-4")), \
            load.failures()
        canary = load.per_node["node-1"]
        assert canary.failed <= canary.requests * (0.5 + SLACK), canary.as_dict()
        assert load.share <= 1 / AGENTS * 0.5 + SLACK, (load.failed, load.requests)
        evs = await events_of(url, rid)
        step_s = event_time(evs, "rollout.rolled_back") - event_time(evs, "wave.started", wave=0)
        steps_load = load

        # Weights on every node: 10% of all traffic goes to 2.2.0, so at most 10% x 50% fails.
        async with load_on(fleet) as load:
            code, out, err, rid = await deploy(
                url, "2.2.0", "--strategy", "canary", "--weights", "10,50,100", "--bake", "3s",
                "--max-unavailable", "2", "--max-error-rate", "5%", "--min-requests", "20")
        assert code == 3, f"2.2.0 should roll back, got {code}: {out}{err}"
        assert set((await versions(fleet)).values()) == {"2.0.0"}
        st = await status(url, rid)
        assert [w["state"] for w in st["waves"]] == ["failed", "waiting", "waiting"]
        assert st["waves"][0]["weight"] == 10 and len(st["waves"][0]["nodes"]) == AGENTS
        assert load.failed > 0
        assert load.share <= 0.10 * 0.5 + SLACK, (load.failed, load.requests)
        evs = await events_of(url, rid)
        weights_s = event_time(evs, "rollout.rolled_back") - event_time(evs, "wave.started",
                                                                         wave=0)

    print(f"\ncanary 2.2.0 (50% errors), --steps 1,50%,100% on {AGENTS} nodes: first step start "
          f"-> rollback finished {step_s:.2f}s; failed user requests {steps_load.failed} of "
          f"{steps_load.requests} ({steps_load.share:.2%}; bound {0.5 / AGENTS:.1%}), all on "
          f"node-1 ({steps_load.per_node['node-1'].failed} of "
          f"{steps_load.per_node['node-1'].requests})")
    print(f"canary 2.2.0 (50% errors), --weights 10,50,100 on {AGENTS} nodes: first step start "
          f"-> rollback finished {weights_s:.2f}s; failed user requests {load.failed} of "
          f"{load.requests} ({load.share:.2%}; bound 5.0%)")


async def test_sequential_analysis_stops_a_bad_canary_before_its_bake_ends(tmp_path: Path) -> None:
    """2.2.0 (every other answer a 500) under --analysis sequential, with the same steps, bake
    and gates as above: the wave fails on the first router report that carries the evidence
    (counted from the wave's start: often before it bakes, else before its bake ends), and is
    rolled back (exit 3); only node-1's users saw an error, and
    status and the events say the evidence in words (counts, versions, e-value, 1/alpha)."""
    async with fleet_of(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "2.0.0", "2.2.0")
        await install(fleet, "2.0.0")
        async with load_on(fleet) as load:
            code, out, err, rid = await deploy(
                url, "2.2.0", "--strategy", "canary", "--steps", "1,50%,100%", "--bake", "3s",
                "--max-error-rate", "5%", "--min-requests", "20", "--analysis", "sequential")
        assert code == 3, f"2.2.0 should roll back, got {code}: {out}{err}"
        assert set((await versions(fleet)).values()) == {"2.0.0"}
        st = await status(url, rid)
        assert st["state"] == "rolled_back", st["reason"]
        assert "on 2.2.0 vs" in st["reason"] and "on 2.0.0: e-value" in st["reason"], st["reason"]
        assert ">= 1/alpha = 100: fail" in st["reason"], st["reason"]
        assert [w["state"] for w in st["waves"]] == ["failed", "waiting", "waiting"]
        g = st["waves"][0]["gates"]
        assert g["outcome"] == "fail" and g["e_error"] >= 100, g
        assert g["thresholds"]["analysis"] == "sequential" and g["thresholds"]["alpha"] == 0.01
        assert load.failed > 0, "the canary node's users never saw 2.2.0's errors"
        assert all(load.per_node[n].failed == 0 for n in ("node-2", "node-3", "node-4")), \
            load.failures()
        assert load.share <= 1 / AGENTS * 0.5 + SLACK, (load.failed, load.requests)
        evs = await events_of(url, rid)
        failed_at = event_time(evs, "gate.failed", wave=0)
        started_at = event_time(evs, "wave.started", wave=0)
        # The evidence counts from the wave's start, so the wave may fail before it bakes.
        baked = [e for e in evs if e["kind"] == "wave.baking"]
        if baked:
            assert failed_at < event_time(evs, "wave.baking", wave=0) + 3.0, "waited for the bake"
        step_s = event_time(evs, "rollout.rolled_back") - started_at
        caught_s = failed_at - started_at
        code, out, _ = await fleetwave("status", rid, nats_url=url)
        assert code == 0 and "sequential, alpha 0.01" in out and "e-value" in out, out
        steps_load, steps_baked = load, baked

        # Weights on every node, two at a time: the first two nodes serve 2.2.0 at 10 % while
        # the others wait, and their errors are evidence before the wave converges.
        async with load_on(fleet) as load:
            code, out, err, rid = await deploy(
                url, "2.2.0", "--strategy", "canary", "--weights", "10,50,100", "--bake", "3s",
                "--max-unavailable", "2", "--max-error-rate", "5%", "--min-requests", "20",
                "--analysis", "sequential")
        assert code == 3, f"2.2.0 should roll back, got {code}: {out}{err}"
        assert set((await versions(fleet)).values()) == {"2.0.0"}
        st = await status(url, rid)
        assert [w["state"] for w in st["waves"]] == ["failed", "waiting", "waiting"]
        assert load.failed > 0
        assert load.share <= 0.10 * 0.5 + SLACK, (load.failed, load.requests)
        evs = await events_of(url, rid)
        weights_s = event_time(evs, "gate.failed", wave=0) - event_time(evs, "wave.started",
                                                                        wave=0)
        weights_baked = [e for e in evs if e["kind"] == "wave.baking"]

    def when(baked: list[dict[str, Any]]) -> str:
        return "while baking" if baked else "while updating"

    print(f"\ncanary 2.2.0 (50% errors), --steps 1,50%,100% --analysis sequential on {AGENTS} "
          f"nodes: first step start -> rollback finished {step_s:.2f}s (first step start -> "
          f"gate failed {caught_s:.2f}s, {when(steps_baked)}); failed user requests "
          f"{steps_load.failed} of {steps_load.requests} ({steps_load.share:.2%}), all on node-1 "
          f"({steps_load.per_node['node-1'].failed} of "
          f"{steps_load.per_node['node-1'].requests})")
    print(f"canary 2.2.0 (50% errors), --weights 10,50,100 --analysis sequential on {AGENTS} "
          f"nodes: first step start -> gate failed {weights_s:.2f}s ({when(weights_baked)}); "
          f"failed user requests {load.failed} of {load.requests} ({load.share:.2%})")


async def test_latency_regression_fails_the_p99_ratio_gate(tmp_path: Path) -> None:
    """2.3.0 (+200 ms per answer) fails --max-p99-ratio 1.5 at the first step and is rolled back,
    slow but without a failed request."""
    async with fleet_of(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "2.0.0", "2.3.0")
        await install(fleet, "2.0.0")
        async with load_on(fleet) as load:
            code, out, err, rid = await deploy(
                url, "2.3.0", "--strategy", "canary", "--steps", "1,100%", "--bake", "4s",
                "--max-p99-ratio", "1.5", "--min-requests", "10")
        assert code == 3, f"2.3.0 should roll back, got {code}: {out}{err}"
        assert load.failed == 0, load.failures()
        assert set((await versions(fleet)).values()) == {"2.0.0"}
        st = await status(url, rid)
        assert "max-p99-ratio" in st["reason"], st["reason"]
        g = st["waves"][0]["gates"]
        assert g["p99_new_ms"] >= 200 and g["p99_ratio"] > 1.5, g
        assert g["thresholds"]["max_p99_ratio"] == 1.5


async def test_no_traffic_is_inconclusive_and_the_operator_drives_the_steps(
    tmp_path: Path,
) -> None:
    """Without traffic a gated canary pauses as inconclusive (exit 4), never succeeds; promote
    skips one step's bake, promote --full every remaining one; pause holds a step, resume releases
    it; steps the fleet cannot have are refused with one line (exit 2)."""
    async with fleet_of(tmp_path) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")

        for bad, why in ((["--steps", "1,50"], "more than the 4 selected"),
                         (["--steps", "1,3"], "must end at 100%"),
                         (["--steps", "0,100%"], "never move a node"),
                         (["--steps", "50%,10%,100%"], "strictly increase"),
                         (["--steps", "1,101%"], "out of range"),
                         (["--weights", "50,5,100"], "strictly increase"),
                         (["--weights", "5,50"], "must end at 100")):
            code, _, err = await fleetwave("deploy", "hello", "2.0.0", "--strategy", "canary",
                                           *bad, "--detach", nats_url=url)
            assert code == 2 and why in one_line(err), (bad, code, err)
        assert (await fleetwave("rollouts", "-o", "json", nats_url=url))[1].count('"id"') == 1

        code, out, err, rid = await deploy(
            url, "2.0.0", "--strategy", "canary", "--steps", "1,50%,100%", "--bake", "1s",
            "--max-error-rate", "1%", "--min-requests", "10")
        assert code == 4, f"a canary without traffic must pause, got {code}: {out}{err}"
        last = err.strip().splitlines()[-1]
        assert "paused" in last and "inconclusive" in last and "min-requests 10" in last, err
        st = await status(url, rid)
        assert st["state"] == "paused" and st["current_wave"] == 0
        assert st["waves"][0]["state"] == "inconclusive"
        assert st["waves"][0]["gates"]["requests"] == 0
        code, out, err = await fleetwave("status", rid, nats_url=url)
        assert "inconclusive" in out and "min 10" in out, out

        # promote: this step passes without its gates; the next one bakes and pauses again.
        code, out, err = await fleetwave("promote", rid, nats_url=url)
        assert code == 0, err
        st = await wait_until(lambda: status(url, rid),
                              lambda s: s["current_wave"] == 1 and s["state"] == "paused",
                              timeout=60, what="the second step to pause as inconclusive")
        assert st["waves"][0]["gates"]["outcome"] == "promoted"
        assert st["waves"][1]["state"] == "inconclusive"
        # promote --full: every remaining step passes without its gates.
        code, out, err = await fleetwave("promote", rid, "--full", nats_url=url)
        assert code == 0, err
        st = await wait_until(lambda: status(url, rid), lambda s: s["state"] != "paused"
                              and s["state"] != "running", timeout=60, what="the rollout to end")
        assert st["state"] == "succeeded", st
        assert [w["gates"]["outcome"] for w in st["waves"]] == ["promoted"] * 3
        await wait_until(lambda: versions(fleet), lambda v: set(v.values()) == {"2.0.0"},
                         timeout=30, what="every node serving 2.0.0")

        # A bake of an hour holds each step until promoted; pause and resume hold and release.
        code, out, err = await fleetwave("deploy", "hello", "1.0.0", "--strategy", "canary",
                                         "--steps", "1,100%", "--bake", "1h", "--detach",
                                         nats_url=url)
        assert code == 0, err
        rid = out.strip()
        await wait_until(lambda: status(url, rid), lambda s: s["waves"][0]["state"] == "baking",
                         timeout=60, what="the first step to bake")
        assert (await fleetwave("pause", rid, nats_url=url))[0] == 0
        st = await status(url, rid)
        assert st["state"] == "paused" and st["waves"][0]["state"] == "baking"
        assert (await fleetwave("resume", rid, nats_url=url))[0] == 0
        st = await status(url, rid)
        assert st["state"] == "running" and st["current_wave"] == 0, st
        assert st["waves"][1]["state"] == "waiting"
        assert (await fleetwave("promote", rid, nats_url=url))[0] == 0
        st = await wait_until(lambda: status(url, rid),
                              lambda s: s["waves"][1]["state"] == "baking",
                              timeout=60, what="the second step to bake")
        assert st["state"] == "running"
        assert (await fleetwave("pause", rid, nats_url=url))[0] == 0
        code, out, err = await fleetwave("promote", rid, "--full", nats_url=url)
        assert code == 0, err
        st = await wait_until(lambda: status(url, rid), lambda s: s["state"] != "running",
                              timeout=60, what="the rollout to end")
        assert st["state"] == "succeeded", st
        await wait_until(lambda: versions(fleet), lambda v: set(v.values()) == {"1.0.0"},
                         timeout=30, what="every node serving 1.0.0")
