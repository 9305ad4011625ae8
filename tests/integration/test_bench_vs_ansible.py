"""bench_vs_ansible as an operator runs it, at N=2 (real processes on 127.0.69.x): both sides
run in one go and print sane figures, and nothing it started is left running, whether it ends
by itself or is stopped with SIGTERM in the middle of the Ansible side."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.integration.procs import wait_until

SUBNET = "127.0.69"
PERF = Path(__file__).resolve().parents[1] / "perf"
BENCH = PERF / "bench_vs_ansible.py"
PREFIX = "fw-perf-vs-ansible-"
ENV = {**os.environ, "FLEETWAVE_PERF_SUBNET": SUBNET}
RUN_TIMEOUT = 300.0  # seven real rolling updates and a dev fleet: ~70 s here, more on a busy box
# pytest's own limit above the run's, so that the run's timeout is what reports a slow run
pytestmark = pytest.mark.timeout(RUN_TIMEOUT + 60)


Seen = dict[int, tuple[psutil.Process, str]]  # pid -> (process, command line when seen)


def started_by(pid: int) -> Seen:
    """Every process the benchmark ``pid`` started so far: its descendants, and the detached
    ones (Ansible's services, the agents' routers) working under its run dir."""
    procs: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        procs = psutil.Process(pid).children(recursive=True)
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        with contextlib.suppress(OSError, IndexError):
            if (d / "bench-run.pid").read_text().split()[0] != str(pid):
                continue
            procs += [p for p in psutil.process_iter(["cwd", "cmdline"])
                      if str(d) in (p.info.get("cwd") or "")
                      or any(str(d) in a for a in p.info.get("cmdline") or [])]
    return {p.pid: (p, argv(p)) for p in procs}


def argv(p: psutil.Process) -> str:
    """The process's command line ("" once it is gone)."""
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline())
    return ""


def alive(procs: Seen) -> list[psutil.Process]:
    out = []
    for p, _ in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


@contextlib.asynccontextmanager
async def bench(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process,
                                                   Seen]]:
    """The benchmark running with ``args``, and every process it has started (collected every
    0.2 s while the block runs); whatever is left at the end is killed (the test has failed
    by then if it asserted on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH), *args, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    seen: Seen = {}
    stop = asyncio.Event()

    async def collect() -> None:
        while not stop.is_set():
            seen.update(await asyncio.to_thread(started_by, proc.pid))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await stop.wait()

    collector = asyncio.create_task(collect())
    try:
        yield proc, seen
    finally:
        stop.set()
        await collector
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for p in alive(seen):
            with contextlib.suppress(psutil.Error):
                p.kill()


async def gone(seen: Seen) -> None:
    left = await wait_until(lambda: asyncio.sleep(0, alive(seen)), lambda ps: not ps,
                            timeout=15, what="every process of the benchmark to stop")
    assert left == []


async def test_bench_vs_ansible_at_two_nodes_prints_sane_figures_and_leaves_nothing() -> None:
    """Both sides update 2 hosts (2 batches, 2 waves) under load: Ansible's hosts are down
    between stop and start (failed requests), fleetwave's routers never are (0), the ratio is
    the two wall times', the head-to-head pair runs twice (--repeat 2), and every process it
    started has stopped when it exits."""
    async with bench("--nodes", "2", "--repeat", "2", "--json") as (proc, seen):
        assert proc.stdout is not None and proc.stderr is not None
        async with asyncio.timeout(RUN_TIMEOUT):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        r = json.loads(out)
        a, f = r["ansible"], r["fleetwave"]
        assert r["nodes"] == 2 and a["batches"] == 2 and len(f["waves"]) == 2, r
        assert a["seconds"] > 0 and f["seconds"] > 0, r
        assert abs(r["ratio"] - a["seconds"] / f["seconds"]) < 0.02, r
        assert r["ratio_work"] > 0 and r["ratio_work_if_prestaged"] > r["ratio_work"], r
        assert a["requests"] > 50 and f["requests"] > 20, r
        assert a["versions"].get("2.0.0", 0) > 0 and f["versions"].get("2.0.0", 0) > 0, r
        assert a["failed"] > 0, f"no router in front of Ansible's hosts: a restart is seen {r}"
        assert f["failed"] == 0, f["failures"]
        for task in ("stop the old process", "start the new version", "wait for its health check"):
            assert a["tasks_s"][task] > 0, a["tasks_s"]
        for w in f["waves"]:
            assert w["nodes"] == 1, w
            assert 0 < w["started_s"] <= w["healthy_s"] <= w["done_s"] <= w["next_s"], w
        assert 0 < f["engine_s"] < f["seconds"], f
        assert 0 < f["prestageable_s"] < f["engine_s"], f
        # The same fleet again with --prestage 1 and all (issue 17): the same update, no
        # request lost, its ratios beside the others.
        assert set(f["prestaged"]) == {"1", "all"}, f["prestaged"]
        for ahead, p in f["prestaged"].items():
            assert len(p["waves"]) == 2 and p["failed"] == 0, (ahead, p)
            assert 0 < p["engine_s"] < p["seconds"] and p["requests"] > 20, (ahead, p)
            assert r["ratio_prestaged"][ahead] == round(a["seconds"] / p["seconds"], 2), r
        # And with Ansible's health check (one pass every 0.1 s) on both sides.
        same = f["same_check"]
        assert len(same["waves"]) == 2 and same["failed"] == 0, same
        assert same["versions"].get("2.0.1", 0) > 0, same
        assert r["ratio_same_check"] == round(a["seconds"] / same["seconds"], 2), r
        # --repeat 2: the pair ran twice each; the figures are each side's lower run of the two
        # (a median that happened), and the ratio run by run is given too.
        assert r["repeat"] == 2 and len(a["runs_s"]) == len(same["runs_s"]) == 2, r
        assert a["seconds"] == min(a["runs_s"]) and same["seconds"] == min(same["runs_s"]), r
        assert r["ratio_same_check_runs"] == [
            round(x / y, 2) for x, y in zip(a["runs_s"], same["runs_s"], strict=True)], r
        assert sum("app.py" in cmd for _, cmd in seen.values()) >= 4, "Ansible's + agents'"
        # The example's ``python3`` is this Python's interpreter on both sides, not a shim.
        assert Path(r["python3"]).parent == Path(sys.executable).parent, r["python3"]
        # the floors: the loaded start floor and the CLI's start against its libraries
        assert r["start_floor_s"] > 0 and f["start_floor_loaded_s"] > 0, r
        assert 0 < r["cli_libraries_s"] < r["cli_start_s"] * 2 < 10, r
        # Where each side's CPU went: every role that must work in a deploy is seen working
        # (new services start on both sides; fleetwave's agents, routers, broker, coordinator
        # and CLI; Ansible's playbook and its workers, reaped), nothing negative.
        # (every process is seen; a small one may round to 0 at two nodes)
        for run in (f, *f["prestaged"].values(), same):
            cpu = run["cpu_s"]
            assert {"routers", "broker", "coordinator", "bench (load, events)"} <= set(cpu), cpu
            assert min(cpu["services"], cpu["agents"], cpu["cli (reaped)"]) > 0, cpu
            assert min(cpu.values()) >= 0, cpu
        assert a["cpu_s"]["ansible-playbook (reaped)"] > a["cpu_s"]["services"] > 0, a["cpu_s"]
        assert min(a["cpu_s"].values()) >= 0, a["cpu_s"]
        await gone(seen)


async def test_bench_vs_ansible_stopped_with_sigterm_stops_everything_it_started() -> None:
    """SIGTERM while Ansible's hosts serve (before fleetwave's side starts): the benchmark
    exits 143, and its Ansible hosts' services, detached from it, are stopped too."""
    async with bench("--nodes", "2") as (proc, seen):

        def serving() -> list[psutil.Process]:
            return [p for p in alive(seen) if "app.py" in argv(p)]

        await wait_until(lambda: asyncio.sleep(0, serving()), lambda ps: len(ps) >= 2,
                         timeout=120, what="Ansible's two hosts to serve hello")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            code = await proc.wait()
        assert code == 128 + signal.SIGTERM
        await gone(seen)
