"""The benchmark scripts as an operator runs them (real processes on 127.0.59.x): bench_router's
relay survives its open-loop run; bench_agent stopped with SIGTERM stops everything it started,
a later run reaps what a SIGKILLed one left, and a 0-minute soak reports no soak; bench_history
reads as a leader and as a standby; bench_reread, bench_rest and bench_broker run through a
small fleet and print their figures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import psutil

from tests.integration.procs import wait_until

SUBNET = "127.0.59"
PERF = Path(__file__).resolve().parents[1] / "perf"
ENV = {**os.environ, "FLEETWAVE_PERF_SUBNET": SUBNET}


async def run(*argv: str, timeout: float = 240) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_bench_history_reads_as_leader_and_as_standby() -> None:
    """A small run of bench_history: every verb timed for both roles and both sizes (its
    standby is the daemon's own reading side; a copy of it in the bench had fallen behind the
    verbs' signature and crashed the run), and retention shrank the store."""
    code, out, err = await run(str(PERF / "bench_history.py"), "--rollouts", "120",
                               "--services", "2", "--keep", "5", "--repeat", "1", "--no-scan",
                               "--json")
    assert code == 0, err[-3000:]
    r = json.loads(out)
    verbs = {"rollouts", "rollouts_service", "status_latest", "status_oldest", "rollback_lookup"}
    for role in ("leader", "standby"):
        for size in ("small", "big"):
            figures = r[role][size]
            assert verbs <= set(figures), (role, size, figures)
            assert all(figures[v] > 0 for v in verbs), (role, size, figures)
        assert r[role]["big"]["oldest_summarised"] is True, r[role]
    assert r["store_mib_after"] < r["store_mib_before"], r


async def test_bench_router_relay_survives_the_open_loop_run() -> None:
    """--relay with the example upstream completes its open-loop run: no TimeoutError out of a
    TaskGroup, and no request waits out a dropped SYN (a second or more) in the relay."""
    code, out, err = await run(
        str(PERF / "bench_router.py"), "--relay", "--duration", "1", "--concurrency", "1",
        "--no-wrk", "--upstream", "example", "--host", f"{SUBNET}.2", "--json")
    assert code == 0, err[-3000:]
    rows = json.loads(out)["results"]
    relayed = [r["relay"] for r in rows if r["load"].endswith("/s")]
    assert relayed and all(r["requests"] > 0 and r["p99_ms"] < 900 for r in relayed), relayed


def under_run_of(pid: int) -> list[psutil.Process]:
    """Every process the benchmark ``pid`` started (its descendants, detached ones too: they
    work under its run dir)."""
    procs: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        procs = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    for d in Path(tempfile.gettempdir()).glob("fw-perf-agent-*"):
        with contextlib.suppress(OSError):
            if (d / "bench-run.pid").read_text().split()[0] == str(pid):
                procs |= {p.pid: p for p in psutil.process_iter(["cwd", "cmdline"])
                          if str(d) in (p.info.get("cwd") or "")
                          or any(str(d) in a for a in p.info.get("cmdline") or [])}
    return list(procs.values())


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def agent_bench_serving(*args: str) -> tuple[asyncio.subprocess.Process,
                                                   list[psutil.Process]]:
    """bench_agent started and in its idle window (hello 1.0.0 runs behind its router), and
    every process it started by then."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PERF / "bench_agent.py"), *args, env=ENV,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def started() -> list[psutil.Process]:
        return under_run_of(proc.pid)

    def serving(ps: list[psutil.Process]) -> bool:
        try:
            argvs = [" ".join(p.cmdline()) for p in alive(ps)]
        except psutil.Error:  # one ended between the listing and the reading: look again
            return False
        return any("app.py" in a for a in argvs) and any("agent.router" in a for a in argvs)

    try:
        procs = await wait_until(started, serving, timeout=120,
                                 what="the benchmark's agent to serve hello through its router")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):  # the test does not get it: reaped here
            proc.kill()
        await proc.wait()
        raise
    return proc, procs


async def test_bench_agent_stopped_with_sigterm_stops_everything_it_started() -> None:
    """SIGTERM ends bench_agent like Ctrl-C: its broker, coordinator, agent, router and
    service all stop, and it exits 143 (128 + SIGTERM)."""
    proc, procs = await agent_bench_serving("--idle", "120", "--soak-minutes", "0")
    try:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            code = await proc.wait()
        left = await wait_until(lambda: asyncio.sleep(0, alive(procs)), lambda ps: not ps,
                                timeout=15, what="every process of the benchmark to stop")
        assert code == 128 + signal.SIGTERM and left == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for p in alive(procs + under_run_of(proc.pid)):
            p.kill()


async def test_a_killed_runs_leftovers_are_reaped_and_no_soak_says_so() -> None:
    """What a SIGKILLed bench_agent left running (its router among them) is stopped by the next
    run, which, with --soak-minutes 0, reports no soak rather than growth from nothing."""
    proc, procs = await agent_bench_serving("--idle", "120", "--soak-minutes", "0")
    try:
        proc.kill()
        await proc.wait()
        assert alive(procs), "SIGKILL leaves the started processes running"
        code, out, err = await run(str(PERF / "bench_agent.py"), "--idle", "1",
                                   "--soak-minutes", "0", "--json", timeout=180)
        assert code == 0, err[-3000:]
        assert alive(procs) == [] and "reaped" in err, err[-3000:]
        figures = json.loads(out)
        assert figures["soak_rollouts"] == 0 and figures["soak_rss_growth_mb"] is None, figures
    finally:
        for p in alive(procs + under_run_of(proc.pid)):
            p.kill()


async def test_bench_reread_and_bench_rest_run_small() -> None:
    """Small runs of the two at-rest benchmarks: every figure there, the policies' rates as
    their arithmetic says (at 200 nodes a re-read every 30 s, a report at every read)."""
    # 400 reads: 40 (~4 ms of the server's CPU) read 0.0 once, below psutil's 10 ms tick.
    code, out, err = await run(str(PERF / "bench_reread.py"), "--nodes", "200", "--reads", "400",
                               "--watches", "20", "--json")
    assert code == 0, err[-3000:]
    got = json.loads(out)
    (r,) = got["rereads"]
    assert r["nodes"] == 200 and r["paced_interval_s"] == 30.0, r
    assert r["server_ms_per_read"] > 0 and r["fixed_server_cores"] == r["paced_server_cores"], r
    w = got["watches"]
    assert w["watches"] == 20 and w["server_pct_at_1s"] > 0, w
    assert w["fleets"]["200"]["now_hb_s"] == 1.0, w
    code, out, err = await run(str(PERF / "bench_rest.py"), "--nodes", "200", "--seconds", "1",
                               "--rollout", "--json")
    assert code == 0, err[-3000:]
    r = json.loads(out)
    assert r["every_read"]["rate"] == r["paced"]["rate"] == 100, r
    assert r["paced"]["achieved"] > 0 and r["paced"]["coordinator_pct"] > 0, r
    for policy in ("alone", "every_read", "paced"):
        assert r[f"rollout_{policy}"]["total_s"] > 0, r


async def test_bench_restart_runs_small() -> None:
    """A small run of the broker-restart benchmark: both ways every watch comes back, with
    the spread the rate says, and the figures are there."""
    code, out, err = await run(str(PERF / "bench_restart.py"), "--nodes", "40", "--rate",
                               "20,0", "--connections", "4", "--give-up", "60", "--json")
    assert code == 0, err[-3000:]
    spread, at_once = json.loads(out)["restarts"]
    assert spread["spread_s"] == 2.0 and at_once["spread_s"] == 0.0, (spread, at_once)
    for r in (spread, at_once):
        assert r["converged"] and r["back"] == 40 and r["connections"] == 4, r
        # The server's CPU is read from its restart on (its own start excluded): 40 watches
        # can take less than psutil's 10 ms tick, and read 0.0 (it did once, in session 28).
        assert r["last_s"] >= r["p50_s"] > 0 and r["server_cpu_s"] >= 0, r


async def test_bench_restart_runs_small_with_a_leader() -> None:
    """``--cold --leader``: a real coordinator, agents that register, wait for its pace and are
    told a burst is under way (every client), then every first watch reads within the spread."""
    code, out, err = await run(str(PERF / "bench_restart.py"), "--nodes", "40", "--rate",
                               "20", "--connections", "4", "--give-up", "60", "--cold",
                               "--leader", "--json")
    assert code == 0, err[-3000:]
    (r,) = json.loads(out)["restarts"]
    assert r["converged"] and r["back"] == 40 and r["leader"], r
    assert r["clients_paced"] == r["clients_told_burst"] == 4, r


async def test_bench_broker_runs_small() -> None:
    """A small run of the broker-sizing benchmark: every step is measured with its agents
    (raw connections answered, watches made), and the sizing follows from the figures."""
    code, out, err = await run(str(PERF / "bench_broker.py"), "--agents", "60", "--fleets",
                               "100,1000", "--idle", "1", "--json")
    assert code == 0, err[-3000:]
    r = json.loads(out)
    assert r["agents"] == 60 and r["server_base_mib"] > 0 and r["disk_bytes_per_agent"] > 0, r
    # Go's heap grows in steps: a small step can read as no growth, never as a failure.
    assert r["watch_made_ms"] >= 0 and r["idle_cores"] >= 0, r
    small, large = r["fleets"]["100"], r["fleets"]["1000"]
    assert large["disk_mib"] > small["disk_mib"] > 0, r["fleets"]
    assert large["memory_gib"] >= small["memory_gib"] > 0, r["fleets"]
    assert (small["restart_s"], large["restart_s"]) == (0.2, 2.0), r["fleets"]  # N / 500 a second


async def test_bench_fetch_runs_small() -> None:
    """A small run of the fleet-wide fetch benchmark: both ways every fetch is done, whole, and
    only the consumer way made consumers on the server."""
    code, out, err = await run(str(PERF / "bench_fetch.py"), "--nodes", "40", "--connections",
                               "4", "--give-up", "60", "--json")
    assert code == 0, err[-3000:]
    direct, consumer = json.loads(out)["fetches"]
    assert (direct["way"], consumer["way"]) == ("direct", "consumer")
    for r in (direct, consumer):
        assert r["converged"] and r["done"] == 40 and r["chunks"] == 3, r
        assert r["last_s"] >= r["p50_s"] > 0 and r["server_cpu_s"] >= 0, r
    assert direct["peak_consumers"] == 0 < consumer["peak_consumers"], (direct, consumer)
